"""The inference engines (caffe_layers.net.inference.engines, net.inference.opencv_engine): OpenCV against Caffe, the reference.

Every equality is measured on real H&E (``sample_data.load_hgsc_nest``) through the U-Net deploy
templates (mean file and per-patch MVN centring) with seeded random weights, Caffe's output
being the reference; the tolerance is the engines' own, 1e-4 on the probabilities.
"""
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import caffe_layers.net.inference.engines as engines
import caffe_layers.net.inference.opencv_engine as opencv_net
from caffe_layers import sample_data
from caffe_layers.cli import ENGINE_CHOICES
from caffe_layers.tiling import segment_tiled

from test_tiling import box_predict

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def auto_tries_opencv_only(monkeypatch):
    """These tests are about OpenCV against Caffe: ``auto`` tries OpenCV alone here (its choice
    among OpenCV and ONNX Runtime is tested in test_onnx_export.py)."""
    monkeypatch.setattr(engines, "FAST_ENGINES", ("opencv",))


@pytest.fixture(scope="module")
def he():
    rgb, _ = sample_data.load_hgsc_nest()
    return np.ascontiguousarray(rgb[300:620, 500:884])  # 320×384, nuclei and stroma


def random_weights(caffe, deploy, path, seed=0):
    """Seeded He-scaled normal weights and small random biases for every learnable layer."""
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        weights = blobs[0].data
        weights[...] = rng.normal(0, np.sqrt(2.0 / np.prod(weights.shape[1:])), weights.shape)
        if len(blobs) > 1:
            blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
    net.save(str(path))
    return path


def build_template(caffe, directory, centring, mean_side=128, seed=0):
    """(deploy, weights) of a U-Net deploy template (depth 2, width 16); a non-flat mean file."""
    from caffe_layers.net import meanfile
    from caffe_layers.net.training import templates as unet

    directory.mkdir(parents=True, exist_ok=True)
    mean_file = None
    if centring == "meanfile":
        # Not flat: the pre-step must subtract it pixel by pixel for inputs of its size.
        rng = np.random.default_rng(seed + 10)
        mean = np.float32([200, 150, 180])[:, None, None] + rng.uniform(-20, 20, (3, mean_side, mean_side))
        mean_file = directory / "mean.binaryproto"
        meanfile.write_mean_binaryproto(mean_file, mean.astype(np.float32))
    deploy = directory / f"unet_{centring}_deploy.prototxt"
    deploy.write_text(unet.net_to_text(unet.unet_deploy(centring=centring, mean_file=mean_file,
                                                        input_shape=(1, 3, 96, 96))))
    return deploy, random_weights(caffe, deploy, directory / f"unet_{centring}.caffemodel", seed)


def spec_net(caffe, directory, name, build):
    """A small net written with NetSpec (``build(n, L)``) and seeded random weights."""
    from caffe import layers as L

    directory.mkdir(parents=True, exist_ok=True)
    spec = caffe.NetSpec()
    spec.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    build(spec, L)
    spec.prob = L.Softmax(spec.score)
    deploy = directory / f"{name}.prototxt"
    deploy.write_text(str(spec.to_proto()))
    return deploy, random_weights(caffe, deploy, directory / f"{name}.caffemodel", seed=3)


def as_batch(rgb):
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)


# ---------------------------------------------------------------- equality on the templates

@pytest.mark.parametrize("centring", ["meanfile", "patchmean"])
def test_opencv_equals_caffe_on_the_templates_on_real_he(caffe, tmp_path, he, centring, monkeypatch):
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    monkeypatch.chdir(tmp_path)  # mean files are read relative to the working directory, as Caffe does
    deploy, weights = build_template(caffe, Path(centring), centring)
    reference = CaffeSegmenter(deploy, weights)
    fast = opencv_net.OpenCVSegmenter(deploy, weights)
    # The centring OpenCV cannot run is a numpy pre-step; the net OpenCV reads has no such layer.
    assert [text for text, _ in fast.plan.input_steps] and not fast.plan.custom_layers
    assert fast.plan.input_name == "centred"
    assert not re.search(r'type: "(Python|MVN)"', fast.plan.prototxt())

    # Tiles of the mean file's size (pixel-by-pixel mean) and the whole crop in one pass
    # (per-channel mean; the whole crop's own mean for MVN).
    expected = segment_tiled(reference, he, tile=128, overlap=64)
    got = segment_tiled(fast, he, tile=128, overlap=64)
    assert expected.std() > 0.01  # the random net is not constant
    assert np.abs(got - expected).max() <= TOLERANCE
    whole_expected, whole = reference(as_batch(he)), fast(as_batch(he))
    assert whole.shape == whole_expected.shape == (1, 2) + he.shape[:2]
    assert np.abs(whole - whole_expected).max() <= TOLERANCE
    np.testing.assert_allclose(whole.sum(axis=1), 1, atol=1e-5)

    # Batched tiles give the same map (each sample is centred on its own).
    batched = segment_tiled(fast, he, tile=128, overlap=64, batch_size=4)
    assert np.abs(batched - got).max() <= 1e-6


@pytest.mark.parametrize("centring", ["meanfile", "patchmean"])
def test_pre_steps_give_caffes_centred_input_to_the_bit(caffe, tmp_path, he, centring, monkeypatch):
    """The numpy pre-step equals Caffe's own centring layer exactly, for any tile size (the MVN
    mean through the same float32 BLAS call as Caffe's)."""
    from caffe import layers as L

    monkeypatch.chdir(tmp_path)
    deploy, weights = build_template(caffe, Path(centring), centring, mean_side=96)
    (description, step), = opencv_net.OpenCVSegmenter(deploy, weights).plan.input_steps
    assert opencv_net._CAFFE_SGEMV is not None  # this Caffe is linked to OpenBLAS
    spec = caffe.NetSpec()
    spec.data = L.Input(shape=dict(dim=[1, 3, 96, 96]))
    if centring == "meanfile":
        spec.centred = L.Python(spec.data, module="caffe_layers.mean_subtract", layer="MeanSubtractLayer",
                                param_str=json.dumps({"mean_file": f"{centring}/mean.binaryproto"}))
    else:
        spec.centred = L.MVN(spec.data, normalize_variance=False)
    Path("centre.prototxt").write_text(str(spec.to_proto()))
    net = caffe.Net("centre.prototxt", caffe.TEST)
    for rows, cols in ((96, 96), (2, 3), (96, 200), (256, 256), (320, 384)):
        batch = np.concatenate([as_batch(he[:rows, :cols]), as_batch(he[-rows:, -cols:])])
        net.blobs["data"].reshape(*batch.shape)
        net.reshape()
        net.blobs["data"].data[...] = batch
        net.forward()
        np.testing.assert_array_equal(step(batch), net.blobs["centred"].data, err_msg=f"{rows}x{cols}")


def test_opencv_segmenter_leaves_its_input_alone_and_returns_fresh_arrays(caffe, tmp_path, he):
    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    fast = opencv_net.OpenCVSegmenter(deploy, weights)
    first_input = as_batch(he[:96, :96])
    kept = first_input.copy()
    first = fast(first_input)
    np.testing.assert_array_equal(first_input, kept)
    first_copy = first.copy()
    fast(as_batch(he[96:192, 96:192]))
    np.testing.assert_array_equal(first, first_copy)  # not a view of OpenCV's output blob


@pytest.mark.parametrize("variant", ["mvn_inside", "mvn_across_inside", "mean_file_shared_input", "mvn_in_place"])
def test_centring_inside_the_net_runs_as_registered_layers(caffe, tmp_path, he, variant, monkeypatch):
    """Centring layers that are not the first step on the input become registered OpenCV layers."""
    from caffe_layers.net import meanfile
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    monkeypatch.chdir(tmp_path)
    meanfile.write_mean_binaryproto("mean.binaryproto", np.float32([190, 140, 170])[:, None, None]
                                    + np.zeros((3, 32, 32), np.float32))

    def build(n, L):
        if variant == "mean_file_shared_input":
            # The raw input also feeds a second branch, so it cannot be centred before the net.
            n.centred = L.Python(n.data, name="centre", module="caffe_layers.mean_subtract", layer="MeanSubtractLayer",
                                 param_str=json.dumps({"mean_file": "mean.binaryproto"}))
            n.scaled = L.Power(n.centred, scale=1 / 64)
            n.raw = L.Power(n.data, scale=1 / 255)
            n.both = L.Concat(n.scaled, n.raw)
            n.conv = L.Convolution(n.both, num_output=4, kernel_size=3, pad=1)
        elif variant == "mvn_in_place":
            n.data2 = L.MVN(n.data, name="centre", normalize_variance=False, in_place=True)
            n.conv = L.Convolution(n.data2, num_output=4, kernel_size=3, pad=1)
        else:
            n.first = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
            n.mvn = L.MVN(n.first, normalize_variance=False, across_channels=variant == "mvn_across_inside")
            n.conv = L.Convolution(n.mvn, num_output=4, kernel_size=3, pad=1)
        n.score = L.Convolution(n.conv, num_output=2, kernel_size=1)

    deploy, weights = spec_net(caffe, Path("."), variant, build)
    fast = opencv_net.OpenCVSegmenter(deploy, weights)
    if variant == "mvn_in_place":
        assert fast.plan.input_name == "data" and len(fast.plan.input_steps) == 1
    else:
        assert fast.plan.custom_layers and "registered OpenCV layer type CaffeStain" in fast.notes[0]
    batch = np.concatenate([as_batch(he[:64, :80]), as_batch(he[64:128, 80:160])])
    expected = CaffeSegmenter(deploy, weights)(batch)
    got = fast(batch)
    assert expected.std() > 1e-3
    assert np.abs(got - expected).max() <= TOLERANCE


def test_plan_keeps_test_phase_layers_and_renames_the_input(caffe):
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    param = text_format.Parse("""
        input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
        layer { name: "train_only" type: "Dropout" bottom: "data" top: "data" include { phase: TRAIN } }
        layer { name: "centre" type: "MVN" bottom: "data" top: "c" mvn_param { normalize_variance: false } }
        layer { name: "conv" type: "Convolution" bottom: "c" top: "score" convolution_param { num_output: 2 kernel_size: 1 } }
        layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" include { phase: TEST } }
    """, caffe_pb2.NetParameter())
    plan = opencv_net.plan_opencv_net(param, "test.prototxt")
    assert [layer.name for layer in plan.net_param.layer] == ["conv", "prob"]
    assert list(plan.net_param.input) == ["c"] and plan.input_name == "c"
    assert not any(layer.include for layer in plan.net_param.layer)
    assert "'centre' (MVN, normalize_variance: false) done as a numpy pre-step" in plan.notes[0]
    param.layer.add(name="odd", type="Python", bottom=["score"], top=["x"]).python_param.module = "my.layers"
    with pytest.raises(opencv_net.OpenCVUnsupported, match="'odd' is a Caffe Python layer"):
        opencv_net.plan_opencv_net(param, "test.prototxt")


# ---------------------------------------------------------------- the choice

def test_auto_uses_opencv_after_checking_it_once_per_model(caffe, tmp_path, monkeypatch, capsys):
    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    segmenter = engines.make_segmenter(deploy, weights, tile=126, multiple=4)  # probe: rounded to 128
    choice = segmenter.engine_choice
    assert isinstance(segmenter, opencv_net.OpenCVSegmenter)
    assert choice.engine == "opencv" and choice.requested == "auto"
    assert choice.probe_shape == (1, 3, 128, 128) and choice.tolerance == TOLERANCE
    assert 0 < choice.max_abs_diff <= TOLERANCE
    record = json.loads(json.dumps(choice.as_dict()))
    assert record["engine"] == "opencv" and record["opencv_version"] == cv2.__version__
    assert any("numpy pre-step" in note for note in record["notes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"engine auto: OpenCV {cv2.__version__} for {deploy} (preferred of "
                                                "the engines that match Caffe")
    assert "OpenCV |Δp|" in err[0]

    # Checked once: the same model again builds no Caffe net and runs no probe.
    def no_caffe(*args, **kwargs):
        raise AssertionError("Caffe built again")

    monkeypatch.setattr(engines, "CaffeSegmenter", no_caffe)
    again = engines.make_segmenter(deploy, weights, tile=128, log=None)
    assert again.engine_choice is choice
    assert capsys.readouterr().err == ""


def test_auto_falls_back_to_caffe_when_opencv_cannot_run_the_net(caffe, tmp_path, capsys):
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    def build(n, L):
        # The augmentation layer is the identity in TEST: Caffe runs it, OpenCV cannot.
        n.augmented = L.Python(n.data, name="augment", module="caffe_layers.augmentation",
                               layer="AugmentationLayer", param_str='{"flip": true}')
        n.score = L.Convolution(n.augmented, num_output=2, kernel_size=3, pad=1)

    deploy, weights = spec_net(caffe, tmp_path, "python_layer", build)
    segmenter = engines.make_segmenter(deploy, weights, tile=32)
    assert isinstance(segmenter, CaffeSegmenter)
    choice = segmenter.engine_choice
    assert choice.engine == "caffe" and choice.max_abs_diff is None
    assert "OpenCV cannot run it" in choice.reason and "'augment' is a Caffe Python layer" in choice.reason
    assert capsys.readouterr().err.startswith(f"engine auto: Caffe for {deploy} (no faster engine matches Caffe: "
                                              "OpenCV cannot run it: layer")
    with pytest.raises(opencv_net.OpenCVUnsupported, match="augmentation.AugmentationLayer"):
        engines.make_segmenter(deploy, weights, "opencv")


def test_auto_falls_back_to_caffe_when_the_results_differ(caffe, tmp_path, monkeypatch):
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    forward = opencv_net.OpenCVSegmenter.__call__
    monkeypatch.setattr(opencv_net.OpenCVSegmenter, "__call__",
                        lambda self, batch: np.clip(forward(self, batch) + 3e-4, 0, 1))
    segmenter = engines.make_segmenter(deploy, weights, tile=64, log=None)
    assert isinstance(segmenter, CaffeSegmenter)
    choice = segmenter.engine_choice
    assert choice.engine == "caffe" and choice.max_abs_diff > TOLERANCE
    assert re.search(r"OpenCV differs: \|Δp\| 3\.0e-04 > 1e-04", choice.reason)


def test_auto_falls_back_without_a_caffe_importer(caffe, tmp_path, monkeypatch):
    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    monkeypatch.setattr(opencv_net, "opencv_has_caffe_importer", lambda: False)
    choice = engines.make_segmenter(deploy, weights, tile=64, log=None).engine_choice
    assert choice.engine == "caffe" and "removed in OpenCV 5" in choice.reason
    with pytest.raises(ValueError, match="opencv-python-headless<5"):
        engines.make_segmenter(deploy, weights, "opencv", log=None)


def test_requested_engines_and_bad_names(caffe, tmp_path):
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    caffe_engine = engines.make_segmenter(deploy, weights, "caffe", log=None)
    assert isinstance(caffe_engine, CaffeSegmenter) and caffe_engine.engine_choice.reason == "requested"
    opencv_engine = engines.make_segmenter(deploy, weights, "opencv", log=None)
    assert isinstance(opencv_engine, opencv_net.OpenCVSegmenter)
    assert opencv_engine.engine_choice.max_abs_diff is None  # requested: no check
    with pytest.raises(ValueError, match="engine must be one of auto, caffe, opencv, onnxruntime; got 'gpu'"):
        engines.make_segmenter(deploy, weights, "gpu")
    # The OpenCV engine refuses what Caffe would: weights of another architecture.
    other_deploy, other_weights = build_template(caffe, tmp_path / "other", "patchmean")
    wrong = tmp_path / "wrong.prototxt"
    wrong.write_text(other_deploy.read_text().replace("num_output: 16", "num_output: 8"))
    with pytest.raises(ValueError, match="does not fit the net"):
        opencv_net.OpenCVSegmenter(wrong, other_weights)
    assert ENGINE_CHOICES == engines.ENGINES


# ---------------------------------------------------------------- the commands

def test_segment_command_engines_agree(caffe, tmp_path, he, capsys):
    from caffe_layers.cli.segment import main as segment_main

    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    Image.fromarray(he).save(tmp_path / "he.png")
    probs = {}
    for engine in ("caffe", "opencv", "auto"):
        out = tmp_path / engine
        assert segment_main(["--model", str(deploy), "--weights", str(weights), "--out", str(out), "--engine", engine,
                             "--tile", "128", "--prob-format", "npy", "--no-progress", str(tmp_path / "he.png")]) == 0
        probs[engine] = np.load(out / "he_prob.npy")
        err = capsys.readouterr().err
        assert f"caffe-stain-segment: engine {engine}: " in err
    assert "OpenCV" in err and "match Caffe on a 4×3×128×128 probe tile" in err
    assert np.abs(probs["opencv"] - probs["caffe"]).max() <= TOLERANCE
    np.testing.assert_array_equal(probs["auto"], probs["opencv"])
    with pytest.raises(SystemExit) as stop:
        segment_main(["--model", str(deploy), "--weights", str(weights), "--out", str(tmp_path / "x"),
                      "--engine", "gpu", str(tmp_path / "he.png")])
    assert stop.value.code == 2


def test_compare_records_the_engine_of_each_model(caffe, tmp_path, he):
    from caffe_layers.net.inference.compare import ModelSpec, compare_models

    models = [ModelSpec(centring, *build_template(caffe, tmp_path / centring, centring))
              for centring in ("patchmean",)]
    lines = []
    images = [("he", he[:128, :160], None)]
    summary = compare_models(models, images, tmp_path / "cmp", tile=64, overlap=16, figures=False,
                             engine_log=lines.append)
    record = json.loads((tmp_path / "cmp" / "summary.json").read_text())["engines"]["patchmean"]
    assert record == json.loads(json.dumps(summary["engines"]["patchmean"]))
    assert record["engine"] == "opencv" and record["max_abs_diff"] <= TOLERANCE
    assert len(lines) == 1 and lines[0].startswith("engine auto: OpenCV")
    summary = compare_models(models, images, tmp_path / "cmp2", tile=64, overlap=16, figures=False,
                             engine="caffe", engine_log=None)
    assert summary["engines"]["patchmean"]["engine"] == "caffe"


# ---------------------------------------------------------------- batching and the pin

def test_segment_tiled_batches_give_the_same_map():
    rgb = np.random.default_rng(2).integers(0, 256, (101, 150, 3), dtype=np.uint8)
    single = segment_tiled(box_predict(), rgb, tile=32, overlap=8)
    for batch in (2, 3, 7, 100):
        calls = []
        batched = segment_tiled(box_predict(calls=calls), rgb, tile=32, overlap=8, batch_size=batch)
        np.testing.assert_array_equal(batched, single)
        assert max(shape[0] for shape in calls) == min(batch, sum(shape[0] for shape in calls))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        segment_tiled(box_predict(), rgb, batch_size=0)


def test_opencv_is_pinned_below_5_which_has_no_caffe_importer():
    [opencv] = re.findall(r'"opencv-python-headless([^"]*)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert opencv.endswith(",<5"), opencv
    assert int(cv2.__version__.split(".")[0]) == 4, f"OpenCV {cv2.__version__} installed; pyproject.toml pins <5"
    assert opencv_net.opencv_has_caffe_importer()



def test_a_model_folder_with_a_relative_mean_file_runs_from_any_working_directory(caffe, tmp_path, he, monkeypatch):
    """An exported model folder names its mean file relative to itself (``mean.binaryproto``):
    both engines find it there whatever the working directory, and agree."""
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

    folder = tmp_path / "model"
    deploy, weights = build_template(caffe, folder, "meanfile")
    deploy.write_text(deploy.read_text().replace(str(folder / "mean.binaryproto"), "mean.binaryproto"))
    assert '\\"mean.binaryproto\\"' in deploy.read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = CaffeSegmenter(deploy, weights)(as_batch(he[:96, :96]))
    got = opencv_net.OpenCVSegmenter(deploy, weights)(as_batch(he[:96, :96]))
    assert np.abs(got - expected).max() <= TOLERANCE
