"""The commands without pycaffe, beside the pycaffe of .venv in one test run.

A command "without pycaffe" runs in a subprocess whose ``import caffe`` fails
(``tests/without_caffe/sitecustomize.py``); the same command "with pycaffe" runs in this process
with ``--engine caffe``. On real MoNuSeg H&E and a U-Net trained here and exported as the
benchmark exports its models, the two give the same mask and probabilities within 1e-4; the
instance labels, the resampling to the card's mpp and the AJI/PQ of ``caffe-stain-compare`` are
checked on the way.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_layers.annotations import read_imagescope_xml, read_instance_image
from caffe_layers.instances import instances_from_probability
from caffe_layers.metrics import instance_scores

from monuseg_model import TEST_TILES, monuseg_model, monuseg_test_tile  # noqa: F401 - the fixture
from slide_images import make_pyramid_tiff

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK_CAFFE = REPO_ROOT / "tests" / "without_caffe"
TOLERANCE = 1e-4
COMMANDS = ("experiment", "prepare", "train", "segment", "compare", "meanfile", "normalize", "estimate", "lmdb",
            "retrofit", "export")
NEED_CAFFE = {"train": ["--solver", "solver.prototxt"], "experiment": ["--tiny", "--out", "out"],
              "prepare": ["--out", "out"], "retrofit": ["net.prototxt", "--out", "out.prototxt"],
              "lmdb": ["segmentation", "--list", "list.txt", "--output", "out"]}


def without_caffe(command, *args, cwd=None):
    """``caffe-stain-<command> args`` in a Python where ``import caffe`` fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BLOCK_CAFFE), str(REPO_ROOT)]), GLOG_minloglevel="2")
    return subprocess.run([sys.executable, "-m", f"caffe_layers.cli.{command}", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)


def test_the_block_hides_caffe(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BLOCK_CAFFE), str(REPO_ROOT)]))
    result = subprocess.run([sys.executable, "-c", "import caffe"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "No module named 'caffe'" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_without_pycaffe(command, tmp_path):
    result = without_caffe(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: caffe-stain-{command}" in result.stdout and not result.stderr


@pytest.mark.parametrize("command", sorted(NEED_CAFFE))
def test_commands_that_need_caffe_say_so_in_one_line_before_any_work(command, tmp_path):
    result = without_caffe(command, *NEED_CAFFE[command], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"caffe-stain-{command}: error: caffe-stain-{command} needs "
                                                   "pycaffe"), result.stderr
    assert "scripts/install_caffe.sh" in lines[0] and "No module named 'caffe'" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_engine_caffe_without_pycaffe_is_one_line(monuseg_model, tmp_path):
    image, _ = monuseg_test_tile(TEST_TILES[0])
    result = without_caffe("segment", image, "--model", monuseg_model.deploy, "--weights", monuseg_model.weights,
                           "--card", monuseg_model.card, "--out", tmp_path / "out", "--engine", "caffe",
                           "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "caffe-stain-segment: error: the Caffe engine needs pycaffe"), result.stderr


def _segment_args(model, image, out, *extra):
    return [str(image), "--model", str(model.deploy), "--weights", str(model.weights), "--card", str(model.card),
            "--out", str(out), "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def segmented(monuseg_model, tmp_path_factory):
    """One MoNuSeg test tile (0.25 µm/px, 1000×1000) segmented with pycaffe and without it."""
    from caffe_layers.cli.segment import main

    image, _ = monuseg_test_tile(TEST_TILES[0])
    folder = tmp_path_factory.mktemp("segmented")
    extra = ("--image-mpp", "0.25", "--instances", "--prob-format", "npy", "--tile", "256")
    assert main(_segment_args(monuseg_model, image, folder / "caffe", *extra, "--engine", "caffe")) == 0
    result = without_caffe("segment", *_segment_args(monuseg_model, image, folder / "opencv", *extra))
    assert result.returncode == 0, result.stderr
    return image.stem, folder / "caffe", folder / "opencv", result.stderr


def test_segment_without_pycaffe_gives_pycaffes_result(segmented):
    name, with_caffe, without, log = segmented
    assert "engine auto: OpenCV" in log and "pycaffe is not installed, so not checked against Caffe" in log
    reference = np.load(with_caffe / f"{name}_prob.npy")
    prob = np.load(without / f"{name}_prob.npy")
    assert prob.shape == reference.shape == (1000, 1000)  # the input's size, segmented at half of it
    assert np.abs(prob - reference).max() <= TOLERANCE
    mask = np.asarray(Image.open(without / f"{name}_pred.png"))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(with_caffe / f"{name}_pred.png")))
    assert 0.05 < (mask > 0).mean() < 0.9  # a briefly trained net: nuclei, not all or nothing


def test_segment_writes_instances_at_the_input_size(segmented):
    name, with_caffe, without, _ = segmented
    prob = np.load(without / f"{name}_prob.npy")
    labels = read_instance_image(without / f"{name}_instances.png", (1000, 1000))
    assert Image.open(without / f"{name}_instances.png").mode.startswith("I")  # 16-bit
    # The documented step with the library's defaults, on the probability map as written.
    np.testing.assert_array_equal(labels, instances_from_probability(prob, 0.5))
    assert labels.max() > 20
    truth = read_imagescope_xml(monuseg_test_tile(name)[1], (1000, 1000))
    assert 0 < instance_scores(labels, truth)["aji"] < 1  # scored against the tile's outlines (a briefly trained net)


def test_segment_resamples_by_the_card_mpp_and_the_files_resolution(monuseg_model, segmented, tmp_path):
    """The tile re-written as a TIFF whose tags say 0.25 µm/px is segmented as with --image-mpp
    0.25; its own 72 dpi tag (a screen default) is not taken for a scan's resolution."""
    import tifffile

    from caffe_layers.cli.segment import main

    name, with_caffe, _, _ = segmented
    image, _ = monuseg_test_tile(name)
    rgb = tifffile.imread(image)
    tagged = tmp_path / f"{name}_tagged.tif"
    tifffile.imwrite(tagged, rgb, photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    args = ("--prob-format", "npy", "--tile", "256", "--engine", "caffe")
    assert main(_segment_args(monuseg_model, tagged, tmp_path / "tagged", *args)) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "tagged" / f"{tagged.stem}_prob.npy"),
                                  np.load(with_caffe / f"{name}_prob.npy"))
    assert main(_segment_args(monuseg_model, image, tmp_path / "native", *args)) == 0  # 72 dpi: as it is
    native = np.load(tmp_path / "native" / f"{name}_prob.npy")
    assert native.shape == (1000, 1000) and np.abs(native - np.load(with_caffe / f"{name}_prob.npy")).max() > 0.05


def test_segment_logs_the_scale(monuseg_model, tmp_path, capsys):
    from caffe_layers.cli.segment import main

    image, _ = monuseg_test_tile(TEST_TILES[0])
    assert main(_segment_args(monuseg_model, image, tmp_path, "--engine", "caffe", "--tile", "256")) == 0
    log = capsys.readouterr().err
    assert re.search(r"segmented as it is: the file records 352\.8 µm/px \(72 dpi\), a screen or print default", log)
    assert main(_segment_args(monuseg_model, image, tmp_path / "b", "--engine", "caffe", "--tile", "256",
                              "--image-mpp", "0.25")) == 0
    assert "segmented resampled ×0.5 to the model's 0.5 µm/px (0.25 µm/px as given)" in capsys.readouterr().err
    assert main(_segment_args(monuseg_model, image, tmp_path / "c", "--image-mpp", "0")) == 2
    assert "--image-mpp must be a positive number" in capsys.readouterr().err


def test_slides_with_workers_without_pycaffe_give_pycaffes_mask(monuseg_model, tmp_path):
    """A pyramidal TIFF of two MoNuSeg tiles at 0.25 µm/px: level 1 (0.5 µm/px) is segmented, by two
    dask workers without pycaffe and in this process with it."""
    import tifffile

    from caffe_layers.cli.segment import main

    tiles = [tifffile.imread(monuseg_test_tile(name)[0]) for name in TEST_TILES]
    slide = make_pyramid_tiff(tmp_path / "case.tif", np.concatenate(tiles, axis=1), mpp=0.25, smallest=500)
    args = ("--block", "256", "--tile", "256")
    assert main(_segment_args(monuseg_model, slide, tmp_path / "caffe", *args, "--engine", "caffe")) == 0
    result = without_caffe("segment", *_segment_args(monuseg_model, slide, tmp_path / "opencv", *args,
                                                     "--workers", "2"))
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(next((tmp_path / side).glob("*_slide.json")).read_text()) for side in ("caffe", "opencv")]
    assert summaries[0]["level"] == summaries[1]["level"] == 1
    masks = [tifffile.imread(next((tmp_path / side).glob("*_pred.tif"))) for side in ("caffe", "opencv")]
    assert masks[0].shape == (500, 1000)  # the mask of the level segmented (level 1, at the card's 0.5 µm/px)
    np.testing.assert_array_equal(masks[1], masks[0])
    assert 0.05 < (masks[0] > 0).mean() < 0.9


def test_compare_reports_aji_and_pq_without_pycaffe_as_with_it(monuseg_model, tmp_path):
    """Ground truth as ImageScope XML and as a 16-bit instance image: AJI and PQ beside Dice, the
    predicted instances written, and the same scores with and without pycaffe."""
    from caffe_layers.annotations import write_instance_image
    from caffe_layers.cli.compare import main
    from caffe_layers.experiment.monuseg_data import resample_labels, resample_rgb
    from caffe_layers.image_io import write_image

    entries = []
    for name in TEST_TILES:  # at the model's 0.5 µm/px: compare segments images as they are
        image, xml = monuseg_test_tile(name)
        rgb = resample_rgb(np.asarray(Image.open(image).convert("RGB")), 0.5)
        write_image(tmp_path / f"{name}.png", rgb)
        truth = resample_labels(read_imagescope_xml(xml, (1000, 1000)), rgb.shape[:2])
        write_instance_image(tmp_path / f"{name}_labels.png", truth)
        entries += ["--image", tmp_path / f"{name}.png", "--mask", tmp_path / f"{name}_labels.png"]
    model = ["--model", "m", monuseg_model.deploy, monuseg_model.weights, monuseg_model.card]
    common = [*model, *entries, "--instances", "--no-figures", "--tile", "256"]
    assert main([*map(str, common), "--out", str(tmp_path / "caffe"), "--engine", "caffe"]) == 0
    result = without_caffe("compare", *common, "--out", tmp_path / "opencv")
    assert result.returncode == 0, result.stderr
    summaries = [json.loads((tmp_path / side / "summary.json").read_text()) for side in ("caffe", "opencv")]
    pooled = summaries[1]["results"]["m"]["original"]
    assert pooled["instance_images"] == 2 and 0 < pooled["aji"] < 1 and 0 <= pooled["pq"] < 1
    for key in ("dice", "aji", "pq"):
        assert pooled[key] == summaries[0]["results"]["m"]["original"][key]
    table = (tmp_path / "opencv" / "table.md").read_text()
    assert "| AJI | PQ |" in table
    for name in TEST_TILES:
        labels = read_instance_image(tmp_path / "opencv" / "instances" / f"{name}_original_m.png")
        truth = read_instance_image(tmp_path / f"{name}_labels.png")
        scored = [s for s in summaries[1]["per_image"] if s["image"] == name][0]
        assert scored["aji"] == pytest.approx(instance_scores(labels, truth)["aji"])


def test_compare_takes_imagescope_xml_as_ground_truth(monuseg_model, tmp_path):
    from caffe_layers.cli.compare import main

    image, xml = monuseg_test_tile(TEST_TILES[1])
    args = ["--model", "m", monuseg_model.deploy, monuseg_model.weights, monuseg_model.card, "--image", image,
            "--mask", xml, "--no-figures", "--tile", "256", "--engine", "caffe", "--out", tmp_path / "xml"]
    assert main(list(map(str, args))) == 0
    scored = json.loads((tmp_path / "xml" / "summary.json").read_text())["per_image"][0]
    assert {"dice", "aji", "pq", "dq", "sq"} <= set(scored)


def test_choices_repeated_for_help_are_the_librarys(caffe):
    from caffe_layers.cli import lmdb, retrofit
    from caffe_layers.net.retrofit import CENTRINGS, LABEL_KINDS
    from caffe_layers.net.training.datum_lmdb import CHANNEL_ORDERS

    assert (retrofit.CENTRINGS, retrofit.LABEL_KINDS, lmdb.CHANNEL_ORDERS) == (CENTRINGS, LABEL_KINDS, CHANNEL_ORDERS)


def test_estimate_and_normalize_run_without_pycaffe(tmp_path):
    """On two MoNuSeg test tiles of different hospitals: the range estimate and a Reinhard
    normalisation, in a process where ``import caffe`` fails."""
    first, _ = monuseg_test_tile(TEST_TILES[0])
    second, _ = monuseg_test_tile(TEST_TILES[1])
    result = without_caffe("estimate", "--train", first, "--test", second, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "color_a_min" in result.stdout
    result = without_caffe("normalize", second, "--template", first, "--method", "reinhard", "--output",
                           tmp_path / "normalised.png", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(tmp_path / "normalised.png")).shape == (1000, 1000, 3)
