"""Annotation readers on hand-made files and on the real MoNuSeg XMLs and instance images."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_layers.annotations import (imagescope_regions, read_imagescope_xml, read_instance_image,
                                      xml_microns_per_pixel)

MONUSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg"


def write_xml(path, regions, mpp="0.25"):
    attribute = "" if mpp is None else f' MicronsPerPixel="{mpp}"'
    body = "".join("<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
                   + "</Vertices></Region>" for vertices in regions)
    path.write_text(f"<Annotations{attribute}><Annotation Id=\"1\"><Regions>{body}</Regions>"
                    f"</Annotation></Annotations>")
    return path


def test_vertices_are_pixel_corners(tmp_path):
    # The square with corners (1, 2) and (4, 5) covers columns 1..3 and rows 2..4 exactly:
    # after the -0.5 shift its edges lie on pixel borders, and the 3×3 centres inside fill.
    path = write_xml(tmp_path / "a.xml", [[(1, 2), (4, 2), (4, 5), (1, 5)]])
    labels = read_imagescope_xml(path, (8, 8))
    expected = np.zeros((8, 8), np.int32)
    expected[2:5, 1:4] = 1
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)


def test_first_region_keeps_overlap_and_degenerate_regions_are_empty(tmp_path):
    path = write_xml(tmp_path / "a.xml", [
        [(0, 0), (4, 0), (4, 4), (0, 4)],     # label 1: rows/cols 0..3
        [(3, 9), (3.5, 9.5)],                 # label 2: a line, no area
        [(2, 2), (6, 2), (6, 6), (2, 6)],     # label 3: rows/cols 2..5, overlaps 1 on 2..3
        [(0, 0), (4, 0), (4, 4), (0, 4)],     # label 4: lies wholly under label 1
    ])
    labels = read_imagescope_xml(path, (8, 8))
    assert (labels[0:4, 0:4] == 1).all()
    assert np.count_nonzero(labels == 3) == 16 - 4
    assert not np.isin([2, 4], labels).any()
    assert len(imagescope_regions(path)) == 4


def test_regions_are_clipped_to_the_image(tmp_path):
    path = write_xml(tmp_path / "a.xml", [[(-5, -5), (3, -5), (3, 3), (-5, 3)]])
    labels = read_imagescope_xml(path, (4, 4))
    assert np.count_nonzero(labels) == 9  # rows/cols 0..2


def test_microns_per_pixel(tmp_path):
    assert xml_microns_per_pixel(write_xml(tmp_path / "a.xml", [], mpp="0.2527")) == pytest.approx(0.2527)
    assert xml_microns_per_pixel(write_xml(tmp_path / "b.xml", [], mpp=None)) is None
    assert xml_microns_per_pixel(write_xml(tmp_path / "c.xml", [], mpp="")) is None


@pytest.mark.parametrize("text, message", [
    ("<Annotations><Region>", "not well-formed XML"),
    ("<Other/>", "expected <Annotations>"),
    ('<Annotations><Region><Vertex X="1" Y="a"/></Region></Annotations>', "Y='a'"),
    ('<Annotations><Region><Vertex X="1"/></Region></Annotations>', "Y=None"),
])
def test_malformed_xml_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.xml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_imagescope_xml(path, (4, 4))
    assert "broken.xml" in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_instance_image_16_bit_and_8_bit(tmp_path):
    labels = np.zeros((5, 6), np.uint16)
    labels[1:3, 1:3] = 700  # beyond 8 bits
    labels[4, 5] = 3
    Image.fromarray(labels).save(tmp_path / "a.png")
    read = read_instance_image(tmp_path / "a.png")
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels)
    Image.fromarray(labels.astype(np.uint8) // 4).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_instance_image(tmp_path / "b.png"), labels.astype(np.uint8) // 4)
    with pytest.raises(ValueError, match="does not match"):
        read_instance_image(tmp_path / "a.png", shape=(6, 5))


def test_instance_image_refuses_colour(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png.*3 colour channels"):
        read_instance_image(tmp_path / "rgb.png")


# --------------------------------------------------------------------------- real MoNuSeg files

def all_xmls():
    return sorted(MONUSEG.glob("MoNuSegTrainingData/Annotations/*.xml")) + sorted(MONUSEG.glob("MoNuSegTestData/*.xml"))


def inside_even_odd(x, y, vertices):
    """Points (x, y) inside a closed polygon or on its outline: a crossing-number test plus an
    exact on-segment test (its own code, not skimage's)."""
    xi, yi = vertices[:, 0], vertices[:, 1]
    xj, yj = np.roll(xi, 1), np.roll(yi, 1)
    x, y = x[:, None], y[:, None]
    crosses = (yi > y) != (yj > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = xi + (y - yi) * (xj - xi) / (yj - yi)
    inside = (np.count_nonzero(crosses & (x < x_at), axis=1) % 2) == 1
    # Coordinates are halves of integers here, so the cross product is exact.
    on_line = (xj - xi) * (y - yi) - (yj - yi) * (x - xi) == 0
    between = (np.minimum(xi, xj) <= x) & (x <= np.maximum(xi, xj)) & (np.minimum(yi, yj) <= y) & (y <= np.maximum(yi, yj))
    return inside | (on_line & between).any(axis=1)


def independent_rasterisation(regions, shape):
    labels = np.zeros(shape, np.int32)
    for number, vertices in enumerate(regions, start=1):
        if len(vertices) < 3:
            continue
        # Pixel (r, c) covers [c, c+1) x [r, r+1) in the XML's corner coordinates: test its centre.
        c0, r0 = np.maximum(np.floor(vertices.min(axis=0)).astype(int) - 1, 0)
        c1, r1 = np.minimum(np.ceil(vertices.max(axis=0)).astype(int) + 1, shape[::-1])
        rows, cols = np.mgrid[r0:r1, c0:c1]
        inside = inside_even_odd(cols.ravel() + 0.5, rows.ravel() + 0.5, vertices).reshape(rows.shape)
        window = labels[r0:r1, c0:c1]
        window[inside & (window == 0)] = number
    return labels


def test_real_xmls_one_instance_per_region():
    xmls = all_xmls()
    assert len(xmls) == 27, f"the shared MoNuSeg copy should hold 27 XMLs under {MONUSEG}"
    for path in xmls:
        regions = imagescope_regions(path)
        labels = read_imagescope_xml(path, (1000, 1000))
        present = set(np.unique(labels)) - {0}
        # Every region with an area is present; the only absent ones are degenerate
        # (TCGA-50-5931 and TCGA-E2-A1B5 each have one region of fewer than 3 vertices).
        missing = set(range(1, len(regions) + 1)) - present
        assert all(len(regions[k - 1]) < 3 for k in missing), (path.name, sorted(missing))
        assert len(present) == sum(len(r) >= 3 for r in regions), path.name


@pytest.mark.parametrize("name", ["MoNuSegTrainingData/Annotations/TCGA-21-5784-01Z-00-DX1.xml",
                                  "MoNuSegTrainingData/Annotations/TCGA-B0-5710-01Z-00-DX1.xml",
                                  "MoNuSegTestData/TCGA-FG-A4MU-01B-01-TS1.xml",
                                  "MoNuSegTestData/TCGA-HC-7209-01A-01-TS1.xml"])
def test_real_xml_fill_agrees_with_an_independent_rasterisation(name):
    path = MONUSEG / name
    labels = read_imagescope_xml(path, (1000, 1000))
    other = independent_rasterisation(imagescope_regions(path), (1000, 1000))
    union = np.count_nonzero((labels > 0) | (other > 0))
    same = np.count_nonzero((labels == other) & (labels > 0))
    # Without the on-outline rule the two differ by 0.2-2 % of the pixels: the centres that
    # diagonal edges between MoNuSeg's integer vertices pass through exactly.
    assert same / union > 0.999, (name, same / union)


def test_real_instance_image():
    labels = read_instance_image(MONUSEG / "MoNuSegTrainingData/Instances/TCGA-18-5592-01Z-00-DX1.png")
    assert labels.shape == (1000, 1000) and labels.dtype == np.int32
    assert len(np.unique(labels)) - 1 == 479  # the README's count for this tile
