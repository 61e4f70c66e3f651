"""Segmentation scores: pixel Dice/IoU and object F1 of binary nucleus masks, and the
instance scores of label images (aggregated Jaccard index, panoptic quality).

Conventions (chosen so that blank images, which are normal input, never give NaN):

* A mask is foreground where it is nonzero (``True`` for boolean masks).
* Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found).
* Object precision is 1.0 when nothing was predicted and recall is 1.0 when there is
  nothing to find; object F1 is ``2 TP / (2 TP + FP + FN)``, 1.0 when both are empty and
  0.0 when exactly one of them is.

Scores over several images are *pooled*: the pixel and object counts are summed over the
images and the ratio is taken once (:func:`pool_scores`). A per-condition Dice is therefore
the Dice of all pixels of that condition, so a tiny or blank image cannot swing it the way
it would an average of per-image ratios.
"""
import numpy as np
from scipy import ndimage

__all__ = [
    "confusion",
    "dice",
    "dice_from_counts",
    "iou",
    "object_counts",
    "object_f1",
    "segmentation_scores",
    "pool_scores",
    "pooled_segmentation_scores",
    "aggregated_jaccard_index",
    "panoptic_quality",
    "instance_scores",
]

# Above this many cells the label-pair contingency table is counted sparsely (np.unique)
# instead of densely (np.bincount): 10,000 x 10,000 objects would be 800 MB dense.
_DENSE_TABLE_LIMIT = 1 << 22


def _binary_pair(pred, truth):
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pred.shape} vs {truth.shape}")
    return pred != 0, truth != 0


def _ratio(numerator, denominator):
    # 0/0 only happens when both masks (or object sets) are empty: a perfect score.
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def confusion(pred, truth):
    """Pixel counts of true positives, false positives and false negatives.

    Parameters
    ----------
    pred, truth : (..., ) array
        Binary masks of the same shape; nonzero is foreground.

    Returns
    -------
    tp, fp, fn : int
    """
    pred, truth = _binary_pair(pred, truth)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn


def dice(pred, truth):
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of two binary masks; 1.0 if both empty.

    Parameters
    ----------
    pred, truth : (..., ) array
        Binary masks of the same shape; nonzero is foreground.

    Returns
    -------
    float in [0, 1]
    """
    return dice_from_counts(*confusion(pred, truth))


def dice_from_counts(tp, fp, fn):
    """Dice ``2 TP / (2 TP + FP + FN)`` from pixel counts (e.g. pooled over batches); 1.0 if all 0."""
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred, truth):
    """Intersection over union (Jaccard index) of two binary masks; 1.0 if both empty.

    Parameters
    ----------
    pred, truth : (..., ) array
        Binary masks of the same shape; nonzero is foreground.

    Returns
    -------
    float in [0, 1]
    """
    tp, fp, fn = confusion(pred, truth)
    return _ratio(tp, tp + fp + fn)


def _pair_table(pred_labels, n_pred, truth_labels, n_truth):
    """Overlap areas of every (pred label, truth label) pair that overlaps.

    Returns (pred_index, truth_index, area) arrays, labels >= 1 only.
    """
    both = (pred_labels > 0) & (truth_labels > 0)
    p = pred_labels[both].astype(np.int64)
    t = truth_labels[both].astype(np.int64)
    keys = p * (n_truth + 1) + t
    if (n_pred + 1) * (n_truth + 1) <= _DENSE_TABLE_LIMIT:
        table = np.bincount(keys, minlength=(n_pred + 1) * (n_truth + 1))
        keys = np.flatnonzero(table)
        counts = table[keys]
    else:
        keys, counts = np.unique(keys, return_counts=True)
    return keys // (n_truth + 1), keys % (n_truth + 1), counts


def object_counts(pred, truth, iou_threshold=0.5, structure=None):
    """Match connected components of ``pred`` to those of ``truth``.

    Parameters
    ----------
    pred, truth : (M, N) array
        Binary masks of the same shape; nonzero is foreground.
    iou_threshold : float
        A predicted and a true object match when their IoU is strictly greater.
    structure : array, optional
        Connectivity passed to :func:`scipy.ndimage.label` (default: 4-connectivity in 2-D).

    Returns
    -------
    matched, pred_objects, true_objects : int
        Number of one-to-one matches and number of objects in each mask.
    """
    pred, truth = _binary_pair(pred, truth)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    truth_labels, n_truth = ndimage.label(truth, structure=structure)
    if n_pred == 0 or n_truth == 0:
        return 0, int(n_pred), int(n_truth)
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    truth_area = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)
    pi, ti, inter = _pair_table(pred_labels, n_pred, truth_labels, n_truth)
    pair_iou = inter / (pred_area[pi] + truth_area[ti] - inter)
    good = pair_iou > iou_threshold
    if iou_threshold >= 0.5:
        # IoU > 0.5 means |P∩T| > |P∪T|/2 >= |P|/2 and likewise > |T|/2: the pair shares
        # more than half of each object. Objects within one mask are disjoint, so no other
        # object can also hold more than half of P (or of T): every object has at most one
        # candidate, and counting the candidate pairs is already a one-to-one matching.
        return int(np.count_nonzero(good)), int(n_pred), int(n_truth)
    # Lower thresholds allow ambiguous pairs: take a maximum one-to-one matching.
    from scipy.optimize import linear_sum_assignment
    rows, row_index = np.unique(pi[good], return_inverse=True)
    cols, col_index = np.unique(ti[good], return_inverse=True)
    weight = np.zeros((rows.size, cols.size))
    weight[row_index, col_index] = 1.0
    r, c = linear_sum_assignment(weight, maximize=True)
    return int(weight[r, c].sum()), int(n_pred), int(n_truth)


def _object_scores(matched, n_pred, n_truth):
    precision = _ratio(matched, n_pred)
    recall = _ratio(matched, n_truth)
    f1 = _ratio(2 * matched, n_pred + n_truth)
    return f1, precision, recall


def object_f1(pred, truth, iou_threshold=0.5):
    """Object-level F1, precision and recall of nucleus detection.

    Objects are connected components (:func:`scipy.ndimage.label`, 4-connectivity); a
    predicted object is a true positive when it matches a distinct true object with
    IoU > ``iou_threshold`` (see :func:`object_counts`).

    Parameters
    ----------
    pred, truth : (M, N) array
        Binary masks of the same shape; nonzero is foreground.
    iou_threshold : float

    Returns
    -------
    f1, precision, recall : float
        Each in [0, 1]; see the module docstring for the empty-mask conventions.
    """
    return _object_scores(*object_counts(pred, truth, iou_threshold))


def segmentation_scores(pred, truth, iou_threshold=0.5):
    """All scores of one image, plus the counts needed to pool them (:func:`pool_scores`).

    Parameters
    ----------
    pred, truth : (M, N) array
        Binary masks of the same shape; nonzero is foreground.
    iou_threshold : float
        For the object matching.

    Returns
    -------
    dict
        ``dice, iou, object_f1, precision, recall`` (floats), ``pixels`` (pixels measured),
        ``true_objects, pred_objects, matched_objects`` and pixel counts ``tp, fp, fn``.
    """
    tp, fp, fn = confusion(pred, truth)
    matched, n_pred, n_truth = object_counts(pred, truth, iou_threshold)
    return _scores_from_counts(dict(tp=tp, fp=fp, fn=fn, pixels=int(np.asarray(truth).size),
                                    matched_objects=matched, pred_objects=n_pred,
                                    true_objects=n_truth))


_COUNT_KEYS = ("tp", "fp", "fn", "pixels", "matched_objects", "pred_objects", "true_objects")


def _scores_from_counts(counts):
    f1, precision, recall = _object_scores(counts["matched_objects"], counts["pred_objects"],
                                           counts["true_objects"])
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    scores = dict(dice=dice_from_counts(tp, fp, fn), iou=_ratio(tp, tp + fp + fn),
                  object_f1=f1, precision=precision, recall=recall)
    scores.update({key: int(counts[key]) for key in _COUNT_KEYS})
    return scores


def pool_scores(per_image):
    """Pool per-image scores by summing their counts, then recomputing the ratios.

    Pooled Dice is ``2 ΣTP / (2 ΣTP + ΣFP + ΣFN)`` over all pixels of all images, not the
    mean of per-image Dice; object F1 likewise pools matched/predicted/true object counts.

    Parameters
    ----------
    per_image : iterable of dict
        Results of :func:`segmentation_scores`.

    Returns
    -------
    dict
        Same keys as :func:`segmentation_scores`, plus ``images`` (number pooled). An empty
        input pools nothing: all counts 0 and, by the empty conventions, all scores 1.0.
    """
    totals = dict.fromkeys(_COUNT_KEYS, 0)
    images = 0
    for scores in per_image:
        images += 1
        for key in _COUNT_KEYS:
            try:
                totals[key] += int(scores[key])
            except KeyError:
                raise KeyError(f"per-image scores lack the count {key!r}; "
                               "use the dicts returned by segmentation_scores") from None
    pooled = _scores_from_counts(totals)
    pooled["images"] = images
    return pooled


def pooled_segmentation_scores(pairs, iou_threshold=0.5):
    """Pooled scores of several (pred, truth) mask pairs; see :func:`pool_scores`.

    Parameters
    ----------
    pairs : iterable of (pred, truth)
        Binary masks; each pair of one shape, shapes may differ between pairs.
    iou_threshold : float

    Returns
    -------
    dict
    """
    return pool_scores(segmentation_scores(p, t, iou_threshold) for p, t in pairs)


# --------------------------------------------------------------------------- instance labels

def _compact_labels(labels, name):
    """Labels renumbered 1..n (0 stays background) and n; any non-negative integer ids."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64), int(labels.any())
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance labels, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative labels (minimum {labels.min()}); expected 0 = background")
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= _DENSE_TABLE_LIMIT:  # a lookup table is faster than sorting the image
        ids = np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False), minlength=1)[1:]) + 1
        lookup = np.zeros(top + 1, np.int64)
        lookup[ids] = np.arange(1, ids.size + 1)
        return lookup[labels], int(ids.size)
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)
    return inverse.astype(np.int64), int(ids.size - (ids[0] == 0))


def _instance_pairs(pred_labels, true_labels):
    """Areas and the overlapping pairs of two label images.

    Returns ``pred_area (n_pred + 1,)``, ``true_area (n_true + 1,)`` and per overlapping pair
    ``(pred index, true index, intersection, IoU)`` arrays, indices 1-based.
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pred_labels.shape} vs {true_labels.shape}")
    pred, n_pred = _compact_labels(pred_labels, "prediction")
    true, n_true = _compact_labels(true_labels, "ground truth")
    pred_area = np.bincount(pred.ravel(), minlength=n_pred + 1)
    true_area = np.bincount(true.ravel(), minlength=n_true + 1)
    pi, ti, inter = _pair_table(pred, n_pred, true, n_true)
    pair_iou = inter / (pred_area[pi] + true_area[ti] - inter)
    return pred_area, true_area, (pi, ti, inter, pair_iou)


def _aji(pred_area, true_area, pairs):
    pi, ti, inter, pair_iou = pairs
    if pred_area.size == 1 and true_area.size == 1:
        return 1.0  # nothing to find, nothing found
    # Best prediction of each true object: highest IoU, ties to the lowest prediction label.
    order = np.lexsort((pi, -pair_iou, ti))
    first = np.ones(order.size, bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    best = order[first]
    matched_true = ti[best]
    used = np.zeros(pred_area.size, bool)
    used[pi[best]] = True
    union_pairs = pred_area[pi[best]] + true_area[matched_true] - inter[best]
    unmatched_true = np.ones(true_area.size, bool)
    unmatched_true[0] = False
    unmatched_true[matched_true] = False
    used[0] = True
    intersection = int(inter[best].sum())
    union = int(union_pairs.sum()) + int(true_area[unmatched_true].sum()) + int(pred_area[~used].sum())
    return _ratio(intersection, union)


def aggregated_jaccard_index(pred_labels, true_labels):
    """Aggregated Jaccard index (AJI) of Kumar et al. 2017.

    Each true object ``G`` is paired with the predicted object ``S`` of highest IoU with it
    (ties: the lowest predicted label; a prediction may serve several true objects). Then
    ``AJI = Σ|G ∩ S| / (Σ|G ∪ S| + Σ|unused S|)``: the areas of predicted objects paired with
    no true object are added to the union. A true object that overlaps no prediction adds its
    own area to the union (the published code would pair it with an arbitrary prediction;
    this follows the corrected version used since, e.g. HoVer-Net's ``get_fast_aji``).
    AJI penalises both missed/extra pixels and wrong splits and merges: a merged pair of
    nuclei counts the merged object's whole area against each.

    Parameters
    ----------
    pred_labels, true_labels : (H, W) integer array
        Instance label images of the same shape; 0 background, any other value one object
        (ids need not be consecutive; a bool mask is one object).

    Returns
    -------
    float in [0, 1]
        1.0 when both are empty, 0.0 when exactly one is.
    """
    return _aji(*_instance_pairs(pred_labels, true_labels))


def _panoptic(pred_area, true_area, pairs):
    pi, ti, inter, pair_iou = pairs
    # IoU > 0.5 makes a match unique (see object_counts): no assignment problem to solve.
    matched = pair_iou > 0.5
    tp = int(np.count_nonzero(matched))
    fp = pred_area.size - 1 - tp
    fn = true_area.size - 1 - tp
    if tp + fp + fn == 0:
        return dict(dq=1.0, sq=1.0, pq=1.0, tp=0, fp=0, fn=0)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(pair_iou[matched].sum()) / tp if tp else 0.0
    return dict(dq=dq, sq=sq, pq=dq * sq, tp=tp, fp=fp, fn=fn)


def panoptic_quality(pred_labels, true_labels):
    """Panoptic quality of Kirillov et al. 2019 for one class (nuclei), PQ = DQ × SQ.

    A predicted and a true object match when their IoU is > 0.5 (each object matches at
    most one other). Detection quality ``DQ = TP / (TP + FP/2 + FN/2)`` (the object F1),
    segmentation quality ``SQ`` = mean IoU of the matched pairs (0 without matches).

    Parameters
    ----------
    pred_labels, true_labels : (H, W) integer array
        Instance label images of the same shape (see :func:`aggregated_jaccard_index`).

    Returns
    -------
    dict
        ``dq, sq, pq`` (floats in [0, 1]; all 1.0 when both images are empty) and the counts
        ``tp, fp, fn``.
    """
    return _panoptic(*_instance_pairs(pred_labels, true_labels))


def instance_scores(pred_labels, true_labels):
    """Pixel Dice, AJI and PQ of one pair of instance label images, from one contingency table.

    Parameters
    ----------
    pred_labels, true_labels : (H, W) integer array
        Instance label images of the same shape (see :func:`aggregated_jaccard_index`).

    Returns
    -------
    dict
        ``dice`` (of the foregrounds, labels > 0), ``aji``, ``pq``, ``dq``, ``sq`` and ``f1``,
        the object F1 at IoU > 0.5 from the PQ matching (equal to ``dq`` by definition).
    """
    pred_area, true_area, pairs = _instance_pairs(pred_labels, true_labels)
    panoptic = _panoptic(pred_area, true_area, pairs)
    overlap = int(pairs[2].sum())  # foreground pixels in both
    dice_score = dice_from_counts(overlap, int(pred_area[1:].sum()) - overlap, int(true_area[1:].sum()) - overlap)
    f1, _, _ = _object_scores(panoptic["tp"], pred_area.size - 1, true_area.size - 1)
    return dict(dice=dice_score, aji=_aji(pred_area, true_area, pairs),
                pq=panoptic["pq"], dq=panoptic["dq"], sq=panoptic["sq"], f1=f1)
