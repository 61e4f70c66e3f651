"""caffe_layers.wsi.pipeline (no Caffe): glass skipping, outputs, merging across blocks, resuming."""
import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from caffe_layers.tiling import segment_tiled
from caffe_layers.wsi import LocalExecutor, SlideSettings, iter_nuclei, open_slide, plan_slide, run_slides
from caffe_layers.wsi.pipeline import compute_block

from slide_images import SETTINGS, Counting, dark, slide  # noqa: F401 - fixture


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
