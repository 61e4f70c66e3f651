"""Segmentation scores for binary nucleus masks: pixel Dice/IoU and object-level F1.

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
