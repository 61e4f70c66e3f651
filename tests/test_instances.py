"""The probability-to-instances step: hand-made shapes and a real MoNuSeg tile."""
from pathlib import Path

import numpy as np
import pytest

from caffe_layers.instances import instances_from_probability, label_components, remove_small, split_touching

MONUSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg"


def disc(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def two_touching_discs():
    # Two radius-8 discs whose centres are 14 px apart: one component, a neck 8 px wide.
    return disc((30, 44), (15, 14), 8) | disc((30, 44), (15, 28), 8)


def test_touching_discs_are_split_and_components_are_not():
    mask = two_touching_discs()
    assert label_components(mask, 1).max() == 1
    labels = instances_from_probability(mask.astype(float) * 0.9, 0.5, min_distance=3, min_size=10, sigma=1.0, h=1.0)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert np.array_equal(labels > 0, mask)
    # Each half goes to the marker of its own disc; the middle column (col 21, rows 12..18:
    # 7 px) lies at equal distance from both and goes whole to one of them.
    assert labels[15, 10] != labels[15, 32]
    assert abs(np.count_nonzero(labels == 1) - np.count_nonzero(labels == 2)) <= 7


def test_shallow_neck_is_kept_whole_with_a_large_h():
    mask = two_touching_discs()
    # The saddle between the two distance peaks (about 8.5 px high) is about 4 px below them.
    assert split_touching(mask, min_distance=3, sigma=1.0, h=1.0).max() == 2
    assert split_touching(mask, min_distance=3, sigma=1.0, h=6.0).max() == 1
    # Unequal discs (radius 8 and 6, centres 13 px apart): a window wider than that
    # distance keeps only the higher peak, a narrow one both.
    unequal = disc((30, 44), (15, 14), 8) | disc((30, 44), (15, 27), 6)
    assert split_touching(unequal, min_distance=3, sigma=1.0, h=0).max() == 2
    assert split_touching(unequal, min_distance=14, sigma=1.0, h=0).max() == 1


def test_small_objects_removed_holes_filled_and_numbered_1_to_n():
    prob = np.zeros((20, 30))
    prob[2:12, 2:12] = 0.8
    prob[6:8, 6:8] = 0.1           # a hole inside the first object
    prob[15, 25] = 0.9             # a 1-pixel speck
    prob[3:9, 18:24] = 0.7
    labels = instances_from_probability(prob, 0.5, min_size=10)
    # Numbered 1..2 in marker order: the second square's centre (row 5.5) comes first.
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert np.count_nonzero(labels == labels[2, 2]) == 100  # hole filled
    assert labels[15, 25] == 0
    assert np.count_nonzero(labels == labels[3, 18]) == 36
    kept_hole = instances_from_probability(prob, 0.5, min_size=10, fill_holes=False)
    assert np.count_nonzero(kept_hole == kept_hole[2, 2]) == 96


def test_object_without_its_own_peak_keeps_one_label():
    # A 3×3 square 3 px from a big disc: its distance maximum (1) lies in the window of the
    # disc's higher values, so it has no peak; it still becomes one object.
    mask = disc((40, 40), (20, 15), 10)
    mask[19:22, 28:31] = True
    labels = split_touching(mask, min_distance=5, sigma=0, h=0)
    assert labels.max() == 2
    assert len(np.unique(labels[19:22, 28:31])) == 1


def test_remove_small_and_label_components():
    labels = np.array([[5, 5, 0, 9],
                       [5, 0, 0, 0],
                       [0, 0, 2, 2]])
    # Areas: 5 -> 3 px, 9 -> 1 px, 2 -> 2 px; min 2 keeps 2 and 5 as 1 and 2 (label order).
    np.testing.assert_array_equal(remove_small(labels, 2), [[2, 2, 0, 0], [2, 0, 0, 0], [0, 0, 1, 1]])
    # 8-connectivity: the diagonal pair is one component.
    np.testing.assert_array_equal(label_components(np.eye(3), 1), np.eye(3, dtype=np.int32))


def test_deterministic_and_bad_input():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    prob = ndimage.gaussian_filter(rng.random((120, 140)), 3)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    first = instances_from_probability(prob, 0.55)
    assert first.max() > 3
    np.testing.assert_array_equal(first, instances_from_probability(prob.copy(), 0.55))
    with pytest.raises(ValueError, match="2-D"):
        instances_from_probability(np.zeros((4, 4, 3)))


def test_real_tile_watershed_separates_touching_nuclei_better_than_components():
    from caffe_layers.annotations import read_imagescope_xml
    from caffe_layers.metrics import aggregated_jaccard_index

    truth = read_imagescope_xml(MONUSEG / "MoNuSegTestData/TCGA-44-2665-01B-06-BS6.xml", (1000, 1000))
    mask = (truth > 0).astype(np.float32)
    components = aggregated_jaccard_index(label_components(mask, 10), truth)
    watershed = aggregated_jaccard_index(instances_from_probability(mask, 0.5), truth)
    # The truth's own foreground: touching nuclei are merged by components (AJI about 0.68)
    # and mostly separated by the watershed (about 0.94).
    assert components < 0.8 < watershed < 1.0
