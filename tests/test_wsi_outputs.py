"""Slide nucleus GeoJSON: valid polygons, no specks, the tile instance step, whole across strips."""
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from caffe_layers.instances import DEFAULT_MIN_SIZE, instances_from_probability
from caffe_layers.wsi.outputs import iter_nuclei, nucleus_polygon, write_geojson


def _orientation(a, b, c):
    value = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return (value > 0) - (value < 0)


def _on_segment(a, b, p):
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def _segments_meet(a, b, c, d):
    """Whether closed segments ab and cd share any point (touching counts)."""
    o1, o2, o3, o4 = _orientation(a, b, c), _orientation(a, b, d), _orientation(c, d, a), _orientation(c, d, b)
    if o1 != o2 and o3 != o4:
        return True
    return ((o1 == 0 and _on_segment(a, b, c)) or (o2 == 0 and _on_segment(a, b, d))
            or (o3 == 0 and _on_segment(c, d, a)) or (o4 == 0 and _on_segment(c, d, b)))


def ring_problem(ring):
    """Why a GeoJSON exterior ring is not a valid simple polygon (OGC rules), or None."""
    if len(ring) < 4 or ring[0] != ring[-1]:
        return "not a closed ring of at least 4 positions"
    points = [tuple(p) for p in ring[:-1]]
    if len(set(points)) != len(points):
        return "a repeated vertex (self-touching ring)"
    n = len(points)
    area = sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n))
    if area == 0:
        return "zero area"
    edges = [(points[i], points[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):  # neighbours share one vertex only
                a, b = edges[i]
                c, d = edges[j]
                shared = b if j == i + 1 else a
                other_i, other_j = (a, d) if j == i + 1 else (b, c)
                if _orientation(a, b, other_j) == 0 and _on_segment(*edges[i], other_j) and other_j != shared:
                    return "adjacent edges fold back"
                if _orientation(c, d, other_i) == 0 and _on_segment(*edges[j], other_i) and other_i != shared:
                    return "adjacent edges fold back"
            elif _segments_meet(*edges[i], *edges[j]):
                return f"edges {i} and {j} intersect"
    return None


def test_ring_check_catches_what_shapely_calls_invalid():
    assert ring_problem([[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]) is None
    assert ring_problem([[0, 0], [4, 4], [4, 0], [0, 2], [0, 0]]) == "edges 0 and 2 intersect"  # bow tie
    assert ring_problem([[0, 0], [1, 0], [1, 1], [0, 0]]) is None
    assert ring_problem([[0, 0], [2, 0], [1, 0], [1, 1], [0, 0]]) == "adjacent edges fold back"
    assert ring_problem([[0, 0], [1, 1], [2, 0], [2, 2], [1, 1], [0, 2], [0, 0]]) == "a repeated vertex (self-touching ring)"
    assert ring_problem([[0, 0], [1, 0], [2, 0], [0, 0]]) == "zero area"


def awkward_mask():
    """Shapes whose outlines through pixel centres self-intersect, and specks."""
    mask = np.zeros((90, 120), bool)
    mask[5:15, 5:15] = True                     # two blocks joined by a diagonal chain of pixels
    mask[25:35, 25:35] = True
    for k in range(15, 25):
        mask[k, k] = True
    mask[50, 5:60] = True                       # a 1-pixel-wide line
    mask[60:80, 60:80] = True                   # a block with a hole and a 1-pixel neck to another
    mask[66:70, 66:70] = False
    mask[70, 80:90] = True
    mask[65:75, 90:100] = True
    mask[5, 100] = True                         # specks of 1 and 4 pixels
    mask[10:12, 110:112] = True
    rng = np.random.default_rng(0)              # and a ragged field
    field = ndimage.gaussian_filter(rng.random((30, 120)), 1.5)
    mask[85:, :] = False
    mask[55:85, :50] |= (field > np.quantile(field, 0.6))[:, :50]
    return mask


def test_slide_geojson_polygons_are_valid_and_specks_are_not_exported(tmp_path):
    mask = awkward_mask().astype(np.uint8)
    count = write_geojson(tmp_path / "n.geojson", iter_nuclei(mask, strip=16), scale=(2.0, 2.0))
    features = json.loads((tmp_path / "n.geojson").read_text())["features"]
    assert len(features) == count > 10
    for feature in features:
        ring = feature["geometry"]["coordinates"][0]
        assert ring_problem(ring) is None, (feature["id"], ring_problem(ring), ring)
        assert feature["properties"]["area_px"] >= DEFAULT_MIN_SIZE
    shapely = pytest.importorskip("shapely.geometry")
    assert all(shapely.shape(f["geometry"]).is_valid for f in features)


def separated_nuclei():
    """Single and touching discs far apart (more than the instance step's reach), some tall."""
    rows, cols = np.ogrid[:200, :160]
    mask = np.zeros((200, 160), bool)
    for cy, cx, r in [(12, 12, 7), (12, 60, 5), (50, 20, 8), (50, 33, 8), (100, 100, 9), (113, 100, 8),
                      (160, 40, 6), (170, 120, 3)]:
        mask |= (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
    mask[20:180, 140:146] = True  # a tall object across many strips
    return mask


@pytest.mark.parametrize("strip", [7, 32, 1000])
def test_slide_nuclei_are_the_tile_instance_step_whole_across_strips(strip):
    mask = separated_nuclei()
    expected = instances_from_probability(mask, 0.5)
    assert expected.max() >= 8  # the touching pairs are split
    objects = list(iter_nuclei(mask.astype(np.uint8), strip=strip, chunk=50))
    found = []
    for area, ring in objects:
        # Pixel centres inside the ring are exactly the nucleus's pixels.
        rows, cols = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=mask.shape)
        assert len(rows) == area
        labels = np.unique(expected[rows, cols])
        assert len(labels) == 1 and labels[0] > 0 and np.count_nonzero(expected == labels[0]) == area
        found.append(labels[0])
    assert sorted(found) == list(range(1, expected.max() + 1))


def test_instance_options_reach_the_step():
    mask = separated_nuclei().astype(np.uint8)
    kept = [area for area, _ in iter_nuclei(mask, min_size=40)]
    assert min(kept) >= 40 and len(kept) < len(list(iter_nuclei(mask)))


def test_polygon_scaling():
    ring = np.array([[1.5, 2.0], [3.0, 2.0], [3.0, 4.5]])
    assert nucleus_polygon(ring, (2.0, 4.0)) == [[6.0, 4.0], [12.0, 4.0], [12.0, 9.0], [6.0, 4.0]]


def test_a_nucleus_with_a_hole_is_exported_by_its_outline():
    mask = np.zeros((20, 20), np.uint8)
    mask[3:15, 3:15] = 1
    mask[7:10, 7:10] = 0
    (area, ring), = iter_nuclei(mask, fill_holes=False, h=50)
    assert area == 144 - 9
    rows, _ = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=mask.shape)
    assert len(rows) == 144  # the hole is inside the outline (holes are not exported)
    assert ring_problem(nucleus_polygon(ring)) is None
