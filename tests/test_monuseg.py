"""The MoNuSeg loader on the real shared copy and on the official download's other layouts."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from caffe_layers.monuseg import DEFAULT_MPP, MonusegTile, find_tiles

MONUSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg"


def test_shared_copy_tiles_splits_and_organs():
    tiles = find_tiles(MONUSEG)
    assert [t.name for t in tiles] == sorted(t.name for t in tiles)
    train = [t for t in tiles if t.split == "train"]
    test = [t for t in tiles if t.split == "test"]
    assert (len(train), len(test)) == (30, 14)
    assert sum(t.annotation.suffix == ".xml" for t in train) == 13
    assert sum(t.annotation.suffix == ".xml" for t in test) == 14
    # The README's composition, with the documented "liver" group as lung.
    assert Counter(t.organ for t in train) == dict(breast=6, kidney=6, lung=6, prostate=6, bladder=2,
                                                   colon=2, stomach=2)
    assert Counter(t.organ for t in test) == dict(breast=2, kidney=3, lung=2, prostate=2, bladder=2,
                                                  colon=1, brain=2)
    by_name = {t.name: t for t in tiles}
    assert by_name["TCGA-21-5784-01Z-00-DX1"].site == "21"
    assert by_name["TCGA-21-5784-01Z-00-DX1"].mpp == pytest.approx(0.2527)
    assert by_name["TCGA-NH-A8F7-01A-01-TS1"].mpp == DEFAULT_MPP  # its XML states none
    assert by_name["TCGA-18-5592-01Z-00-DX1"].annotation.name == "TCGA-18-5592-01Z-00-DX1.png"


@pytest.mark.parametrize("name, count", [("TCGA-HT-8564-01Z-00-DX1", 249),   # test XML
                                         ("TCGA-DK-A2I6-01A-01-TS1", 342)])  # instance image
def test_shared_tile_loads(name, count):
    tile = {t.name: t for t in find_tiles(MONUSEG)}[name]
    rgb, labels = tile.load()
    assert rgb.shape == (1000, 1000, 3) and rgb.dtype == np.uint8
    assert labels.shape == (1000, 1000) and labels.dtype == np.int32
    assert len(np.unique(labels)) - 1 == count  # the README's count


def make_tile(folder, name, xml=True):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}.tif", np.full((6, 8, 3), 200, np.uint8), photometric="rgb")
    if xml:
        (folder / f"{name}.xml").write_text(
            '<Annotations MicronsPerPixel="0.5"><Annotation><Regions><Region><Vertices>'
            '<Vertex X="1" Y="1"/><Vertex X="3" Y="1"/><Vertex X="3" Y="3"/><Vertex X="1" Y="3"/>'
            '</Vertices></Region></Regions></Annotation></Annotations>')


def test_official_download_layout(tmp_path):
    train = tmp_path / "MoNuSeg 2018 Training Data"
    make_tile(train / "Tissue Images", "TCGA-G9-0001-01Z", xml=False)
    make_tile(train / "Annotations", "TCGA-G9-0001-01Z")
    (train / "Annotations" / "TCGA-G9-0001-01Z.tif").unlink()
    make_tile(train / "Tissue Images", "TCGA-ZZ-0002-01Z", xml=False)
    (train / "Instances").mkdir()
    Image.fromarray(np.eye(6, 8, dtype=np.uint16) * 300).save(train / "Instances" / "TCGA-ZZ-0002-01Z.png")
    make_tile(tmp_path / "MoNuSegTestData", "TCGA-FG-0003-01Z")
    tiles = find_tiles(tmp_path)
    assert [(t.name, t.split, t.organ, t.site, t.mpp) for t in tiles] == [
        ("TCGA-FG-0003-01Z", "test", "brain", "FG", 0.5),
        ("TCGA-G9-0001-01Z", "train", "prostate", "G9", 0.5),
        ("TCGA-ZZ-0002-01Z", "train", "unknown", "ZZ", DEFAULT_MPP)]
    rgb, labels = tiles[1].load()
    assert rgb.shape == (6, 8, 3) and np.count_nonzero(labels == 1) == 4  # rows/cols 1..2
    rgb, labels = tiles[2].load()
    assert np.count_nonzero(labels) == 6 and set(np.unique(labels)) == {0, 300}


def test_underscore_image_folder_and_missing_annotation(tmp_path):
    make_tile(tmp_path / "MoNuSegTrainingData" / "Tissue_Images", "TCGA-A7-0001", xml=False)
    with pytest.raises(ValueError, match=r"'TCGA-A7-0001'.*neither Annotations/TCGA-A7-0001\.xml"):
        find_tiles(tmp_path)


def test_test_tile_without_xml_and_empty_folder(tmp_path):
    make_tile(tmp_path / "MoNuSegTestData", "TCGA-A7-0001", xml=False)
    with pytest.raises(ValueError, match="TCGA-A7-0001.*no TCGA-A7-0001.xml"):
        find_tiles(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no tiles"):
        find_tiles(tmp_path / "MoNuSegTestData")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_tiles(tmp_path / "nothing")


def test_tile_is_frozen():
    tile = MonusegTile("a", "train", Path("a.tif"), Path("a.xml"), "unknown", "", None)
    with pytest.raises(AttributeError):
        tile.name = "b"
