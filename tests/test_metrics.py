import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from caffe_layers import metrics
from caffe_layers.metrics import (confusion, dice, iou, object_counts, object_f1, pool_scores,
                                  pooled_segmentation_scores, segmentation_scores)


def masks(*rows_per_mask):
    return [np.array([[c == "#" for c in row] for row in rows]) for rows in rows_per_mask]


def test_pixel_scores_hand_computed():
    pred, truth = masks(["##..",
                         "##..",
                         "....",
                         "...#"],
                        [".#..",
                         ".##.",
                         "....",
                         "...."])
    # TP: (0,1),(1,1) = 2; FP: (0,0),(1,0),(3,3) = 3; FN: (1,2) = 1
    assert confusion(pred, truth) == (2, 3, 1)
    assert dice(pred, truth) == pytest.approx(4 / 8)
    assert iou(pred, truth) == pytest.approx(2 / 6)


def test_nonzero_is_foreground_for_any_dtype():
    pred = np.array([[0, 3], [255, 0]], dtype=np.uint8)
    truth = np.array([[0.0, 0.5], [0.0, 0.0]])
    assert confusion(pred, truth) == (1, 1, 0)


def test_both_empty_is_perfect():
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert object_f1(empty, empty) == (1.0, 1.0, 1.0)
    scores = segmentation_scores(empty, empty)
    assert scores["pixels"] == 16 and scores["true_objects"] == scores["pred_objects"] == 0


def test_pred_empty_truth_not_is_zero():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    truth[1:3, 1:3] = True
    assert dice(pred, truth) == 0.0
    assert iou(pred, truth) == 0.0
    f1, precision, recall = object_f1(pred, truth)
    assert (f1, recall) == (0.0, 0.0)
    assert precision == 1.0  # nothing predicted, nothing wrong (documented convention)
    f1, precision, recall = object_f1(truth, pred)
    assert (f1, precision, recall) == (0.0, 0.0, 1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_two_objects_one_matched():
    pred, truth = masks(["##....",
                         "##....",
                         "......",
                         "....#.",
                         "......"],
                        ["##....",
                         "#.....",
                         "......",
                         "...###",
                         "...###"])
    # Top-left: IoU 3/4 > 0.5, matched. Bottom-right: IoU 1/6, not matched.
    assert object_counts(pred, truth) == (1, 2, 2)
    f1, precision, recall = object_f1(pred, truth)
    assert (f1, precision, recall) == (0.5, 0.5, 0.5)
    scores = segmentation_scores(pred, truth)
    assert scores["true_objects"] == 2 and scores["pred_objects"] == 2
    assert scores["object_f1"] == 0.5
    assert scores["dice"] == pytest.approx(2 * 4 / (5 + 9))


def test_iou_exactly_at_threshold_does_not_match():
    pred, truth = masks(["##", ".."], ["#.", ".."])  # IoU 1/2
    assert object_counts(pred, truth)[0] == 0
    assert object_counts(pred, truth, iou_threshold=0.4)[0] == 1


def test_split_prediction_matches_once():
    # One true nucleus split into two predictions: at most one can match.
    pred, truth = masks(["###.###"], ["#######"])
    assert object_counts(pred, truth, iou_threshold=0.5) == (0, 2, 1)  # IoU 3/7 each
    assert object_counts(pred, truth, iou_threshold=0.3) == (1, 2, 1)  # one-to-one


def test_sparse_contingency_table_agrees(monkeypatch):
    rng = np.random.default_rng(1)
    truth = rng.random((60, 60)) < 0.3
    pred = truth.copy()
    pred[rng.random((60, 60)) < 0.1] ^= True
    dense = [object_counts(pred, truth, t) for t in (0.5, 0.2)]
    assert dense[0][0] > 0
    monkeypatch.setattr(metrics, "_DENSE_TABLE_LIMIT", 0)
    assert [object_counts(pred, truth, t) for t in (0.5, 0.2)] == dense


def test_pooling_sums_counts_not_ratios():
    big_t = np.zeros((10, 10), bool)
    big_t[:5] = True
    big_p = big_t.copy()  # perfect on 50 pixels
    small_t = np.zeros((2, 2), bool)
    small_t[0, 0] = True
    small_p = np.zeros((2, 2), bool)  # misses 1 pixel
    pooled = pooled_segmentation_scores([(big_p, big_t), (small_p, small_t)])
    assert pooled["dice"] == pytest.approx(100 / 101)  # mean of per-image Dice would be 0.5
    assert pooled["iou"] == pytest.approx(50 / 51)
    assert pooled["images"] == 2 and pooled["pixels"] == 104
    assert (pooled["true_objects"], pooled["pred_objects"], pooled["matched_objects"]) == (2, 1, 1)
    assert pooled["object_f1"] == pytest.approx(2 / 3)
    # Blank images pool in without changing the pixel scores.
    blank = np.zeros((8, 8), bool)
    with_blank = pooled_segmentation_scores([(big_p, big_t), (small_p, small_t), (blank, blank)])
    assert with_blank["dice"] == pooled["dice"] and with_blank["images"] == 3


def test_pool_of_nothing_and_bad_input():
    pooled = pool_scores([])
    assert pooled["images"] == 0 and pooled["dice"] == 1.0
    with pytest.raises(KeyError, match="tp"):
        pool_scores([{"dice": 1.0}])


mask_pairs = st.integers(1, 12).flatmap(lambda h: st.integers(1, 12).flatmap(
    lambda w: st.tuples(arrays(bool, (h, w)), arrays(bool, (h, w)))))


@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_properties(pair):
    pred, truth = pair
    d, j = dice(pred, truth), iou(pred, truth)
    assert d == dice(truth, pred) and j == iou(truth, pred)
    assert 0.0 <= j <= d <= 1.0
    assert d == pytest.approx(2 * j / (1 + j))
    f1, precision, recall = object_f1(pred, truth)
    f1_swapped, precision_swapped, recall_swapped = object_f1(truth, pred)
    assert f1 == pytest.approx(f1_swapped)
    assert (precision, recall) == (recall_swapped, precision_swapped)
    scores = segmentation_scores(pred, truth)
    assert all(0.0 <= scores[k] <= 1.0 and not math.isnan(scores[k])
               for k in ("dice", "iou", "object_f1", "precision", "recall"))
    assert object_f1(truth, truth) == (1.0, 1.0, 1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(mask_pairs, min_size=1, max_size=4))
def test_pooled_equals_concatenation(pairs):
    # Pooling = scoring one image made of all images side by side (objects kept apart by
    # a blank column).
    pooled = pooled_segmentation_scores(pairs)
    height = max(p.shape[0] for p, _ in pairs)
    pieces_p, pieces_t = [], []
    for p, t in pairs:
        pad = ((0, height - p.shape[0]), (0, 1))
        pieces_p.append(np.pad(p, pad))
        pieces_t.append(np.pad(t, pad))
    whole = segmentation_scores(np.hstack(pieces_p), np.hstack(pieces_t))
    for key in ("dice", "iou", "object_f1", "precision", "recall"):
        assert pooled[key] == pytest.approx(whole[key])


# --------------------------------------------------------------------------- instance scores

from pathlib import Path  # noqa: E402

from scipy import ndimage  # noqa: E402

from caffe_layers.metrics import aggregated_jaccard_index, instance_scores, panoptic_quality  # noqa: E402


def labels(*rows):
    return np.array([[int(c) if c != "." else 0 for c in row] for row in rows])


def test_merged_prediction_hand_computed():
    truth = labels("1122",
                   "1122",
                   "....")
    pred = labels("5555",
                  "5555",
                  "....")
    # Each true object (4 px) pairs with the merged prediction (8 px): IoU 4/8 each.
    # AJI = (4 + 4) / (8 + 8) = 0.5: the merged object's area counts against both.
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(0.5)
    # IoU 0.5 is not > 0.5: no match; TP 0, FP 1, FN 2, DQ = SQ = PQ = 0.
    assert panoptic_quality(pred, truth) == dict(dq=0.0, sq=0.0, pq=0.0, tp=0, fp=1, fn=2)
    scores = instance_scores(pred, truth)
    assert scores["dice"] == 1.0 and scores["f1"] == 0.0 and scores["aji"] == pytest.approx(0.5)


def test_mixed_case_hand_computed():
    truth = labels("111...",
                   "111...",
                   "....2.",
                   "......",
                   "33....")
    pred = labels("77....",
                  "77....",
                  "......",
                  ".....9",
                  "4.....")
    # Pairs: G1 (6 px) ~ S7 (4 px): ∩ 4, ∪ 6, IoU 2/3.  G3 (2 px) ~ S4 (1 px): ∩ 1, ∪ 2, IoU 1/2.
    # G2 (1 px) overlaps nothing: adds 1 to the union.  S9 (1 px) is unused: adds 1.
    # AJI = (4 + 1) / (6 + 2 + 1 + 1) = 5 / 10.
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(0.5)
    # PQ: only G1~S7 has IoU > 0.5. TP 1, FP 2 (S4, S9), FN 2 (G2, G3).
    # DQ = 1 / (1 + 2/2 + 2/2) = 1/3, SQ = 2/3, PQ = 2/9.
    pq = panoptic_quality(pred, truth)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 2, 2)
    assert (pq["dq"], pq["sq"], pq["pq"]) == pytest.approx((1 / 3, 2 / 3, 2 / 9))
    # Dice of the foregrounds: |P| = 6, |T| = 9, |P∩T| = 5: 2·5 / 15 = 2/3.
    # Object F1 = 2·1 / (2·1 + 2 + 2) = 1/3 (= DQ).
    scores = instance_scores(pred, truth)
    assert scores == pytest.approx(dict(dice=2 / 3, aji=0.5, pq=2 / 9, dq=1 / 3, sq=2 / 3, f1=1 / 3))


def test_aji_best_pairing_and_ties():
    truth = labels("1111",
                   "....")
    pred = labels("2233",
                  "....")
    # G1 ~ S2 and G1 ~ S3 both have IoU 2/4: the lower label (S2) is taken, S3 is unused.
    # AJI = 2 / (4 + 2) = 1/3.
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(1 / 3)
    assert aggregated_jaccard_index(pred[:, ::-1], truth[:, ::-1]) == pytest.approx(1 / 3)


def test_instance_scores_of_empty_images():
    empty = np.zeros((3, 3), int)
    one = empty.copy()
    one[1, 1] = 4
    assert instance_scores(empty, empty) == dict(dice=1.0, aji=1.0, pq=1.0, dq=1.0, sq=1.0, f1=1.0)
    for pred, truth in [(one, empty), (empty, one)]:
        assert instance_scores(pred, truth) == dict(dice=0.0, aji=0.0, pq=0.0, dq=0.0, sq=0.0, f1=0.0)


def test_label_values_do_not_matter():
    rng = np.random.default_rng(0)
    truth = ndimage.label(rng.random((40, 50)) > 0.6)[0]
    pred = ndimage.label(ndimage.binary_dilation(truth > 0) & (rng.random((40, 50)) > 0.1))[0]
    reference = instance_scores(pred, truth)
    # Renumbered with gaps and huge ids (the sparse path), and as other dtypes.
    big = np.where(truth > 0, truth.astype(np.uint64) * 7919 + 3_000_000_000, 0).astype(np.uint64)
    shuffled = np.concatenate([[0], rng.permutation(pred.max()) + 1])[pred].astype(np.uint16)
    assert instance_scores(shuffled, big) == pytest.approx(reference)
    assert instance_scores(pred.astype(np.uint64), truth.astype(np.uint32)) == pytest.approx(reference)
    assert 0 < reference["aji"] < reference["dice"] < 1


def test_instance_scores_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        instance_scores(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integer instance labels"):
        instance_scores(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="negative"):
        aggregated_jaccard_index(np.full((2, 2), -1), np.zeros((2, 2), int))


def test_instance_scores_on_a_real_tile():
    from caffe_layers.annotations import read_imagescope_xml

    path = Path(__file__).resolve().parents[1].parent / "shared/data/monuseg/MoNuSegTestData/TCGA-44-2665-01B-06-BS6.xml"
    truth = read_imagescope_xml(path, (1000, 1000))
    assert instance_scores(truth, truth) == dict(dice=1.0, aji=1.0, pq=1.0, dq=1.0, sq=1.0, f1=1.0)
    # One pixel eroded from every nucleus (and from the borders between touching ones).
    eroded = ndimage.grey_erosion(truth, size=3)
    eroded[ndimage.grey_dilation(truth, size=3) != eroded] = 0
    scores = instance_scores(eroded, truth)
    assert 0.75 < scores["dice"] < 0.95
    assert 0.6 < scores["aji"] < 0.9 and scores["aji"] < scores["dice"]
    assert 0.5 < scores["pq"] < 0.9 and scores["sq"] < 1
    assert scores["f1"] == scores["dq"] > 0.8
