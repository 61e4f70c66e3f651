"""The project's Caffe-to-ONNX converter and the onnxruntime engine, against real Caffe.

Nets: the U-Net deploy templates (mean-file centring with a non-flat mean, so both branches of
the mean-subtract conversion run, and per-patch MVN centring), a classic patch classifier
(conv/pool/InnerProduct/Dropout/Softmax) and a net of the remaining layer types (BatchNorm,
Scale, PReLU, Eltwise, Deconvolution, Crop, Concat, Power, MVN with variance), all with seeded
random weights.
"""
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from caffe_layers.net.inference import engines  # noqa: E402
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter  # noqa: E402
from caffe_layers.net.inference.onnx_engine import OnnxSegmenter, session  # noqa: E402
from caffe_layers.net.inference.onnx_export import OnnxUnsupported, caffe_to_onnx  # noqa: E402

from test_engines import build_template, spec_net  # noqa: E402

TOLERANCE = 1e-5


def _onnx_forward(deploy, weights, batch):
    model = session(caffe_to_onnx(deploy, weights).SerializeToString())
    return model.run(None, {model.get_inputs()[0].name: batch})[0]


def _caffe_forward(caffe, deploy, weights, batch):
    net = caffe.Net(str(deploy), str(weights), caffe.TEST)
    net.blobs["data"].reshape(*batch.shape)
    net.blobs["data"].data[...] = batch
    return np.array(net.forward()["prob"])


@pytest.mark.parametrize("centring", ["meanfile", "patchmean"])
def test_unet_templates_match_caffe(caffe, tmp_path, centring):
    deploy, weights = build_template(caffe, tmp_path, centring, mean_side=128)
    reference = CaffeSegmenter(deploy, weights)
    for side in (96, 128):  # 128: the mean file's size (its pixel-by-pixel branch)
        probe = engines.probe_tile(side, side, batch=2)
        got = OnnxSegmenter(deploy, weights)(probe)
        assert got.shape == (2, 2, side, side)
        assert np.abs(got - reference(probe)).max() <= TOLERANCE


def test_classic_patch_classifier_matches_caffe(caffe, tmp_path):
    def build(n, L):
        n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=5, weight_filler=dict(type="xavier"))
        n.pool1 = L.Pooling(n.conv1, pool=0, kernel_size=3, stride=2)  # MAX, Caffe's ceil rounding
        n.relu1 = L.ReLU(n.pool1, in_place=True)
        n.conv2 = L.Convolution(n.relu1, num_output=8, kernel_size=3, pad=1)
        n.pool2 = L.Pooling(n.conv2, pool=1, kernel_size=2, stride=2)  # AVE
        n.fc1 = L.InnerProduct(n.pool2, num_output=16)
        n.relu2 = L.ReLU(n.fc1, in_place=True, negative_slope=0.1)
        n.drop = L.Dropout(n.relu2, in_place=True, dropout_ratio=0.5)
        n.score = L.InnerProduct(n.drop, num_output=2)

    deploy, weights = spec_net(caffe, tmp_path, "classic", build)
    batch = engines.probe_tile(32, 32, batch=3)
    got = _onnx_forward(deploy, weights, batch)
    expected = _caffe_forward(caffe, deploy, weights, batch)
    assert got.shape == expected.shape == (3, 2)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_other_layer_types_match_caffe(caffe, tmp_path):
    def build(n, L):
        n.scaled = L.Power(n.data, power=1, scale=1 / 128.0, shift=-1)
        n.norm = L.MVN(n.scaled)  # with variance
        n.conv = L.Convolution(n.norm, num_output=6, kernel_size=3, pad=2, dilation=2)
        n.bn = L.BatchNorm(n.conv)
        n.sc = L.Scale(n.bn, bias_term=True)
        n.act = L.PReLU(n.sc)
        n.pool = L.Pooling(n.act, pool=0, kernel_size=2, stride=2)
        n.up = L.Deconvolution(n.pool, convolution_param=dict(num_output=6, kernel_size=4, stride=2, pad=1))
        n.crop = L.Crop(n.up, n.act, axis=2, offset=0)
        n.sum = L.Eltwise(n.crop, n.act, operation=1, coeff=[0.5, 2.0])
        n.most = L.Eltwise(n.sum, n.act, operation=2)
        n.cat = L.Concat(n.most, n.sc)
        n.sq = L.Power(n.cat, power=2, scale=0.5, shift=1)
        n.score = L.Convolution(n.sq, num_output=2, kernel_size=1)

    deploy, weights = spec_net(caffe, tmp_path, "others", build)
    net = caffe.Net(str(deploy), str(weights), caffe.TEST)
    rng = np.random.default_rng(5)
    for name in ("bn",):  # non-trivial statistics: mean, variance, scale factor
        blobs = net.params[name]
        blobs[0].data[...] = rng.normal(0, 0.3, blobs[0].data.shape)
        blobs[1].data[...] = rng.uniform(0.5, 2, blobs[1].data.shape)
        blobs[2].data[...] = 2.0
    for name in ("sc", "act"):
        net.params[name][0].data[...] = rng.uniform(0.2, 1.5, net.params[name][0].data.shape)
    net.save(str(weights))
    batch = engines.probe_tile(32, 32, batch=2)
    got = _onnx_forward(deploy, weights, batch)
    expected = _caffe_forward(caffe, deploy, weights, batch)
    assert got.shape == expected.shape == (2, 2, 32, 32)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_a_layer_without_conversion_is_named(caffe, tmp_path):
    def build(n, L):
        n.conv = L.Convolution(n.data, num_output=2, kernel_size=1)
        n.score = L.LRN(n.conv, local_size=3)

    deploy, weights = spec_net(caffe, tmp_path, "lrn", build)
    with pytest.raises(OnnxUnsupported, match="layer 'score' of type LRN has no ONNX conversion"):
        caffe_to_onnx(deploy, weights)


def test_auto_picks_the_preferred_engine_that_matches_and_records_why(caffe, tmp_path, capsys):
    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    segmenter = engines.make_segmenter(deploy, weights, tile=96, multiple=4)
    record = json.loads(json.dumps(segmenter.engine_choice.as_dict()))
    tried = {candidate["engine"]: candidate for candidate in record["candidates"]}
    assert set(tried) == {"opencv", "onnxruntime"}
    assert all(c["max_abs_diff"] <= engines.PROBE_TOLERANCE and c["probe_seconds"] > 0 for c in tried.values())
    # The first that matches in the order of preference (deterministic), not a timing race.
    assert record["engine"] == engines.FAST_ENGINES[0] == "onnxruntime"
    assert "preferred of the engines that match Caffe" in record["reason"]
    assert record["onnxruntime_version"]
    err = capsys.readouterr().err
    assert "ONNX Runtime" in err and "OpenCV" in err
    requested = engines.make_segmenter(deploy, weights, "onnxruntime", log=None)
    assert isinstance(requested, OnnxSegmenter) and requested.engine_choice.reason.startswith("requested")


def test_export_command_fp32_and_int8(caffe, tmp_path, capsys):
    from PIL import Image

    from caffe_layers.cli.export import main
    from caffe_layers.sample_data import load_hgsc_nest

    deploy, weights = build_template(caffe, tmp_path, "patchmean")
    rgb, _ = load_hgsc_nest()
    image = tmp_path / "calibration.png"
    Image.fromarray(rgb[:192, :192]).save(image)
    fp32 = tmp_path / "net.onnx"
    assert main(["--model", str(deploy), "--weights", str(weights), "--out", str(fp32), "--probe", "64"]) == 0
    assert "max |Δp|" in capsys.readouterr().out and fp32.stat().st_size > 0
    assert main(["--model", str(deploy), "--weights", str(weights), "--out", str(fp32), "--probe", "64"]) == 2
    assert "already exists" in capsys.readouterr().err
    int8 = tmp_path / "net_int8.onnx"
    report = tmp_path / "int8.json"
    assert main(["--model", str(deploy), "--weights", str(weights), "--out", str(int8), "--int8", "--calibrate",
                 str(image), "--probe", "64", "--tile", "96", "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    row, = record["calibration"]
    assert record["kind"] == "int8" and 0 <= row["mask_dice"] <= 1 and row["max_abs_diff"] < 1
    assert "mask Dice" in capsys.readouterr().out
    quantised = OnnxSegmenter(deploy, weights, onnx_model=int8)
    ops = {node.op_type for node in __import__("onnx").load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert quantised(engines.probe_tile(64, 64)).shape == (1, 2, 64, 64)
