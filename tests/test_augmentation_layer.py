"""AugmentationLayer in a real Caffe: through pycaffe and through the `caffe` command-line tool.

(Training a few iterations with the seed param_str through `caffe train` is in
test_caffe_build.py; here the tool runs the JSON form with a TEST phase and bad param_strs.)
"""
import json
import re

import numpy as np
import pytest

from caffe_layers.params import ParamError

SEED_PARAM_STR = '{"rotate": True, "color": True, "color_a_max":1.5, "color_a_min": .3}'
JSON_PARAM_STR = json.dumps({"rotate": True, "color": True, "color_a_max": 1.5, "color_a_min": 0.3})
YAML_PARAM_STR = "{rotate: true, color: true, color_a_max: 1.5, color_a_min: 0.3}"
GEOMETRY_PARAM_STR = '{"rotate": true, "flip": true, "color": false}'

N, C, H, W = 6, 3, 16, 16


def _shape(dims):
    return "shape { " + " ".join(f"dim: {d}" for d in dims) + " }"


def net_text(param_str, *, image_shape=(N, C, H, W), label_shape=(N, 1, H, W), bottoms=("data", "label"),
             tops=None, in_place=False):
    """A net: Input blobs -> AugmentationLayer. ``label_shape=None`` gives a 1-blob net."""
    inputs = [("data", image_shape)] + ([("label", label_shape)] if label_shape is not None else [])
    input_layer = ('layer { name: "input" type: "Input" '
                   + " ".join(f'top: "{name}"' for name, _ in inputs)
                   + " input_param { " + " ".join(_shape(s) for _, s in inputs) + " } }")
    bottoms = [b for b in bottoms if b in dict(inputs)] if tops is None else list(bottoms)
    if tops is None:
        tops = list(bottoms) if in_place else ["aug_" + b for b in bottoms]
    quoted = param_str.replace("\\", "\\\\").replace("'", "\\'")
    layer = ('layer { name: "augment" type: "Python" '
             + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
             + " ".join(f'top: "{t}"' for t in tops)
             + ' python_param { module: "caffe_layers.augmentation" layer: "AugmentationLayer" '
             + f"param_str: '{quoted}' }} }}")
    return f'name: "augment_test"\n{input_layer}\n{layer}\n'


def make_net(caffe, tmp_path, param_str, phase=None, name="net.prototxt", **kwargs):
    path = tmp_path / name
    path.write_text(net_text(param_str, **kwargs))
    return caffe.Net(str(path), caffe.TRAIN if phase is None else phase)


def batch(seed=0, n=N, channels=C):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, channels, H, W)).astype(np.float32)
    labels = rng.integers(0, 5, (n, 1, H, W)).astype(np.float32)
    return images, labels


def run(net, images, labels=None, tops=("aug_data", "aug_label")):
    net.blobs["data"].data[...] = images
    if labels is not None:
        net.blobs["label"].data[...] = labels
    net.forward()
    return [net.blobs[t].data.copy() for t in tops[: 1 if labels is None else 2]]


def augment_layer(net):
    return net.layers[list(net._layer_names).index("augment")]


# --- configuration by param_str ---------------------------------------------------------------


@pytest.mark.parametrize("param_str", [SEED_PARAM_STR, JSON_PARAM_STR, YAML_PARAM_STR],
                         ids=["python-literal", "json", "yaml"])
def test_param_str_forms_configure_colour(caffe, tmp_path, param_str):
    net = make_net(caffe, tmp_path, param_str)
    layer = augment_layer(net)
    assert layer.params["rotate"] and layer.params["color"]
    assert (layer.params["color_a_min"], layer.params["color_a_max"]) == (0.3, 1.5)
    images = np.full((N, C, H, W), 100, np.float32)  # constant: the geometry is invisible
    out, out_labels = run(net, images, batch()[1])
    draws = layer.augmenter.last_draws
    assert np.all((draws.a >= 0.3) & (draws.a <= 1.5)) and np.all(np.abs(draws.b) <= 10)
    assert draws.a.std() > 0.05  # really drawn over the wide range, not the 0.9-1.1 default
    expected = np.clip(100 * draws.a + draws.b, 0, 255).astype(np.float32)[:, :, None, None]
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-6, atol=1e-4)
    # Each sample and channel is one constant a*100 + b, within the configured range.
    assert out.min() >= 0.3 * 100 - 10 and out.max() <= 1.5 * 100 + 10
    assert np.all(np.isin(out_labels, np.arange(5)))


@pytest.mark.parametrize("param_str", [GEOMETRY_PARAM_STR, "{rotate: true, flip: true}",
                                       '{"rotate": True, "flip": True, "color": False}'])
def test_label_geometry_matches_image(caffe, tmp_path, param_str):
    net = make_net(caffe, tmp_path, param_str)
    images, labels = batch(1)
    images[:, 0] = labels[:, 0]  # channel 0 carries the label values
    changed = 0
    for _ in range(3):
        out, out_labels = run(net, images, labels)
        np.testing.assert_array_equal(out[:, 0], out_labels[:, 0])
        np.testing.assert_array_equal(np.sort(out.reshape(N, C, -1), -1), np.sort(images.reshape(N, C, -1), -1))
        changed += int(np.sum(np.any(out != images, axis=(1, 2, 3))))
    assert changed > 0  # the geometry did something


# --- bottoms, tops, in place ------------------------------------------------------------------


def test_one_bottom(caffe, tmp_path):
    net = make_net(caffe, tmp_path, '{"rotate": true, "color": true, "seed": 3}', label_shape=None)
    images, _ = batch(2)
    (out,) = run(net, images)
    assert out.shape == images.shape and not np.array_equal(out, images)
    assert "aug_label" not in net.blobs


@pytest.mark.parametrize("two_bottoms", [False, True], ids=["1-bottom", "2-bottoms"])
def test_in_place_equals_not_in_place(caffe, tmp_path, two_bottoms):
    param_str = '{"rotate": true, "flip": true, "color": true, "seed": 11}'
    label_shape = (N, 1, H, W) if two_bottoms else None
    separate = make_net(caffe, tmp_path, param_str, label_shape=label_shape, name="separate.prototxt")
    in_place = make_net(caffe, tmp_path, param_str, label_shape=label_shape, in_place=True,
                        name="in_place.prototxt")
    images, labels = batch(3)
    labels = labels if two_bottoms else None
    for _ in range(2):  # the random streams stay in step over several batches
        expected = run(separate, images, labels)
        got = run(in_place, images, labels, tops=("data", "label"))
        assert len(got) == len(expected) == (2 if two_bottoms else 1)
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e)
        assert not np.array_equal(expected[0], images)


# --- phases -----------------------------------------------------------------------------------


def test_train_augments_test_is_exact_identity(caffe, tmp_path):
    images, labels = batch(4)
    train = make_net(caffe, tmp_path, SEED_PARAM_STR, caffe.TRAIN, name="train.prototxt")
    out, out_labels = run(train, images, labels)
    assert not np.array_equal(out, images)
    test = make_net(caffe, tmp_path, SEED_PARAM_STR, caffe.TEST, name="test.prototxt")
    out, out_labels = run(test, images, labels)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_labels, labels)
    in_place = make_net(caffe, tmp_path, SEED_PARAM_STR, caffe.TEST, in_place=True, name="test_ip.prototxt")
    out, out_labels = run(in_place, images, labels, tops=("data", "label"))
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_labels, labels)


def test_test_augment_true_augments_in_test(caffe, tmp_path):
    images, labels = batch(5)
    net = make_net(caffe, tmp_path, '{"rotate": true, "color": true, "test_augment": true, "seed": 1}', caffe.TEST)
    out, out_labels = run(net, images, labels)
    assert not np.array_equal(out, images)


# --- seeds ------------------------------------------------------------------------------------


def test_seed_reproducible_whatever_caffe_seed(caffe, tmp_path):
    param_str = '{"rotate": true, "flip": true, "color": true, "seed": 42}'
    images, labels = batch(6)
    outputs = []
    for caffe_seed in (1, 2):
        caffe.set_random_seed(caffe_seed)
        net = make_net(caffe, tmp_path, param_str, name=f"seed_{caffe_seed}.prototxt")
        outputs.append([run(net, images, labels) for _ in range(2)])
    for first, second in zip(*outputs):
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outputs[0][0][0], outputs[0][1][0])  # successive batches differ

    other = make_net(caffe, tmp_path, param_str.replace("42", "43"), name="seed_43.prototxt")
    assert not np.array_equal(run(other, images, labels)[0], outputs[0][0][0])


def test_no_seed_nets_differ(caffe, tmp_path):
    images, labels = batch(7)
    a = run(make_net(caffe, tmp_path, SEED_PARAM_STR, name="a.prototxt"), images, labels)[0]
    b = run(make_net(caffe, tmp_path, SEED_PARAM_STR, name="b.prototxt"), images, labels)[0]
    assert not np.array_equal(a, b)


# --- bad parameters ---------------------------------------------------------------------------

BAD_PARAMS = [
    ("unknown-key", '{"rotat": true}', r"unknown key 'rotat' in AugmentationLayer param_str; did you mean 'rotate'\?"),
    ("wrong-type-bool", '{"rotate": 1}', r"rotate=1 has type int; expected a bool"),
    ("wrong-type-float", '{"color_a_min": "low"}', r"color_a_min='low' has type str; expected a float"),
    ("wrong-type-bool-str", '{"rotate": "yes"}', r"rotate='yes' has type str; expected a bool"),
    ("min-above-max", '{"color": true, "color_a_min": 1.5, "color_a_max": 1.2}',
     r"color_a_min=1.5 > color_a_max=1.2; color_a_min must not exceed color_a_max"),
    ("non-positive-scale", '{"color_a_min": 0}', r"color_a_min=0 is out of range; allowed range: > 0"),
    ("negative-scale", '{"color": true, "color_a_min": -0.5}',
     r"color_a_min=-0\.5 is out of range; allowed range: > 0"),
    ("non-positive-max-value", '{"max_value": -1}', r"max_value=-1 is out of range; allowed range: > 0"),
    ("probability-above-1", '{"color_p": 1.5}', r"color_p=1.5 is out of range; allowed range: \[0, 1\]"),
    ("probability-below-0", '{"hed_p": -0.1}', r"hed_p=-0.1 is out of range; allowed range: \[0, 1\]"),
    ("unparsable", '{"rotate": tru', r"cannot parse AugmentationLayer param_str"),
]


@pytest.mark.parametrize("param_str, message", [case[1:] for case in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS])
def test_bad_param_str_clear_error_from_net(caffe, tmp_path, param_str, message):
    with pytest.raises(ParamError, match=message):
        make_net(caffe, tmp_path, param_str)


# --- shape errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(bottoms=("data", "label", "data"), tops=("a", "b", "c")), r"takes 1 or 2 bottoms .*got 3"),
    (dict(tops=("aug_data",)), r"needs as many tops as bottoms: 2 bottoms, 1 tops"),
    (dict(bottoms=("data",), tops=("a", "b")), r"needs as many tops as bottoms: 1 bottoms, 2 tops"),
    (dict(label_shape=(N + 1, 1, H, W)), r"AugmentationLayer .*different batch sizes"),
    (dict(label_shape=(N, 1, H, W + 1)), r"AugmentationLayer .*different H×W"),
    (dict(label_shape=(N, 2, H, W)), r"AugmentationLayer .*labels must be N×1×H×W or N×H×W"),
], ids=["3-bottoms", "2-bottoms-1-top", "1-bottom-2-tops", "batch-mismatch", "spatial-mismatch",
        "2-channel-label"])
def test_shape_errors(caffe, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_net(caffe, tmp_path, '{"rotate": true}', **kwargs)


def test_hed_needs_three_channels(caffe, tmp_path):
    with pytest.raises(ValueError, match=r"AugmentationLayer .*hed stain jitter needs 3-channel RGB/BGR images, got C=1"):
        make_net(caffe, tmp_path, '{"hed": true}', image_shape=(N, 1, H, W))
    make_net(caffe, tmp_path, '{"hed": true}', name="ok.prototxt")  # 3 channels are fine


def test_reshape_to_mismatched_label_is_rejected(caffe, tmp_path):
    net = make_net(caffe, tmp_path, '{"rotate": true}')
    net.blobs["label"].reshape(N, 1, H + 2, W)
    with pytest.raises(ValueError, match="AugmentationLayer .*different H×W"):
        net.reshape()


# --- the caffe command-line tool --------------------------------------------------------------

TOOL_NET = """
name: "augment_tool"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {
    data_filler { type: "uniform" min: 0 max: 255 } data_filler { type: "constant" value: 1 }
    shape { dim: 2 dim: 3 dim: 16 dim: 16 } shape { dim: 2 dim: 1 dim: 16 dim: 16 } } }
layer { name: "augment" type: "Python" bottom: "data" bottom: "label" top: "aug" top: "aug_label"
  python_param { module: "caffe_layers.augmentation" layer: "AugmentationLayer" param_str: '%s' } }
layer { name: "diff" type: "EuclideanLoss" bottom: "aug" bottom: "data" top: "diff" }
layer { name: "label_diff" type: "EuclideanLoss" bottom: "aug_label" bottom: "label" top: "label_diff"
  loss_weight: 0 }
"""

TOOL_SOLVER = """
net: "net.prototxt"
base_lr: 0.001
lr_policy: "fixed"
max_iter: 2
display: 1
test_iter: 1
test_interval: 100
test_initialization: true
snapshot_after_train: false
solver_mode: CPU
random_seed: 1
"""


def _outputs(log, kind, name):
    """Values of '<kind> net output #i: <name> = v' lines in a caffe log."""
    return [float(v) for v in re.findall(rf"{kind} net output #\d+: {name} = ([-+0-9.eE]+)", log)]


def test_caffe_tool_json_param_str_train_augments_test_identity(run_caffe_tool, tmp_path):
    (tmp_path / "net.prototxt").write_text(TOOL_NET % JSON_PARAM_STR)
    (tmp_path / "solver.prototxt").write_text(TOOL_SOLVER)
    log = run_caffe_tool("train", "--solver=solver.prototxt", cwd=tmp_path, timeout=120).stderr
    train, test = _outputs(log, "Train", "diff"), _outputs(log, "Test", "diff")
    assert train and all(value > 0 for value in train), log[-3000:]  # TRAIN: augmented
    assert test == [0.0], log[-3000:]  # TEST: the exact identity


def _run_tool_with_bad_case(run_caffe_tool, tmp_path, command, case):
    """Run `caffe train` or `caffe time` on TOOL_NET with the BAD_PARAMS case ``case``."""
    _, param_str, message = next(c for c in BAD_PARAMS if c[0] == case)
    (tmp_path / "net.prototxt").write_text(TOOL_NET % param_str.replace("'", "\\'"))
    (tmp_path / "solver.prototxt").write_text(TOOL_SOLVER)
    args = ["--solver=solver.prototxt"] if command == "train" else ["--model=net.prototxt", "--iterations=1"]
    return run_caffe_tool(command, *args, cwd=tmp_path, timeout=120, check=False), message


@pytest.mark.parametrize("command, case", [("train", "unknown-key"), ("time", "min-above-max"),
                                           ("time", "unparsable")])
def test_caffe_tool_bad_param_str_fails_with_message(run_caffe_tool, tmp_path, command, case):
    result, message = _run_tool_with_bad_case(run_caffe_tool, tmp_path, command, case)
    output = result.stdout + result.stderr
    assert result.returncode > 0, result.returncode  # a clean failure exit, not killed by SIGABRT
    assert "Check failure" not in output and "terminate called" not in output
    assert re.search(message, output), output[-3000:]
    assert "ParamError" in output
    assert "Optimization Done" not in output and "Average Forward pass" not in output


TOOL_BAD_VALUES = [  # (command, BAD_PARAMS case, key, repr of the offending value)
    ("train", "wrong-type-bool-str", "rotate", "'yes'"),
    ("time", "wrong-type-bool", "rotate", "1"),
    ("train", "wrong-type-float", "color_a_min", "'low'"),
    ("time", "non-positive-scale", "color_a_min", "0"),
    ("train", "negative-scale", "color_a_min", "-0.5"),
    ("time", "non-positive-max-value", "max_value", "-1"),
    ("train", "probability-above-1", "color_p", "1.5"),
    ("time", "probability-below-0", "hed_p", "-0.1"),
]


@pytest.mark.parametrize("command, case, key, value", TOOL_BAD_VALUES, ids=[f"{c[0]}-{c[1]}" for c in TOOL_BAD_VALUES])
def test_caffe_tool_bad_value_names_key_and_value_on_stderr(run_caffe_tool, tmp_path, command, case, key, value):
    """Wrong types, non-positive scales and probabilities outside [0, 1] stop the tool, and its
    stderr names the key and the offending value."""
    result, message = _run_tool_with_bad_case(run_caffe_tool, tmp_path, command, case)
    stderr = result.stderr
    assert result.returncode > 0, result.returncode  # a clean failure exit, not killed by a signal
    assert "Check failure" not in stderr and "terminate called" not in stderr
    assert f"ParamError: invalid value for '{key}' in AugmentationLayer param_str: {key}={value} " in stderr, \
        stderr[-3000:]
    assert re.search(message, stderr), stderr[-3000:]
    assert "Optimization Done" not in stderr and "Average Forward pass" not in stderr


# The exact param_str of the module docstring through `caffe train`, with a probe layer (a module
# written to tmp_path) saving the blobs around the augmentation layer of the TRAIN and TEST nets.

PROBE_LAYER = """
import os
import numpy as np
import caffe


class BlobProbe(caffe.Layer):
    def setup(self, bottom, top):
        self.directory, self.count = self.param_str, 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        phase = "train" if self.phase == caffe.TRAIN else "test"
        np.savez(os.path.join(self.directory, "%s_%d.npz" % (phase, self.count)),
                 *[bottom[i].data.copy() for i in range(len(bottom))])  # pycaffe: index, not iterate
        self.count += 1

    def backward(self, top, propagate_down, bottom):
        pass
"""

PROBE_NET = """
name: "augment_probe"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {
    data_filler { type: "uniform" min: 50 max: 150 } data_filler { type: "uniform" min: 0 max: 5 }
    shape { dim: 8 dim: 3 dim: 16 dim: 16 } shape { dim: 8 dim: 1 dim: 16 dim: 16 } } }
layer { name: "augment" type: "Python" bottom: "data" bottom: "label" top: "aug" top: "aug_label"
  python_param { module: "caffe_layers.augmentation" layer: "AugmentationLayer" param_str: '%s' } }
layer { name: "probe" type: "Python" bottom: "data" bottom: "label" bottom: "aug" bottom: "aug_label"
  python_param { module: "augment_probe" layer: "BlobProbe" param_str: '%s' } }
layer { name: "diff" type: "EuclideanLoss" bottom: "aug" bottom: "data" top: "diff" }
"""


def _fit_quarter_turn_and_colour(image, augmented):
    """The k (np.rot90) and per-channel a, b of ``augmented = a * rot90(image, k) + b`` that fit best."""
    fits = []
    for k in range(4):
        turned = np.rot90(image, k, axes=(1, 2)).reshape(image.shape[0], -1).astype(np.float64)
        target = augmented.reshape(augmented.shape[0], -1).astype(np.float64)
        a = np.array([np.polyfit(x, y, 1)[0] for x, y in zip(turned, target)])
        b = (target - a[:, None] * turned).mean(axis=1)
        residual = np.abs(a[:, None] * turned + b[:, None] - target).max()
        fits.append((residual, k, a, b))
    return min(fits, key=lambda fit: fit[0])


def test_caffe_tool_seed_param_str_train_augments_test_identity(run_caffe_tool, tmp_path, monkeypatch):
    (tmp_path / "augment_probe.py").write_text(PROBE_LAYER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the tool's wrapper appends it to its own path
    dump = tmp_path / "dump"
    dump.mkdir()
    assert "'" not in SEED_PARAM_STR  # goes verbatim into the prototxt
    (tmp_path / "net.prototxt").write_text(PROBE_NET % (SEED_PARAM_STR, dump))
    (tmp_path / "solver.prototxt").write_text(TOOL_SOLVER.replace("max_iter: 2", "max_iter: 3"))
    log = run_caffe_tool("train", "--solver=solver.prototxt", cwd=tmp_path, timeout=120).stderr
    assert "Optimization Done" in log, log[-3000:]

    train = [np.load(path) for path in sorted(dump.glob("train_*.npz"))]
    assert len(train) >= 3  # one TRAIN forward per iteration (Caffe adds a final one)
    turns, factors, offsets = [], [], []
    for arrays in train:
        data, label, aug, aug_label = (arrays[f"arr_{i}"] for i in range(4))
        assert aug.shape == data.shape and not np.array_equal(aug, data)  # TRAIN: augmented
        for i in range(len(data)):
            residual, k, a, b = _fit_quarter_turn_and_colour(data[i], aug[i])
            assert residual < 1e-2, (residual, k, a, b)  # exactly a quarter turn and x*a + b
            np.testing.assert_array_equal(aug_label[i], np.rot90(label[i], k, axes=(1, 2)))  # same turn
            turns.append(k)
            factors.append(a)
            offsets.append(b)
    factors, offsets = np.array(factors), np.array(offsets)
    assert np.all((factors >= 0.3 - 1e-4) & (factors <= 1.5 + 1e-4)), factors
    assert np.all(np.abs(offsets) <= 10 + 1e-3), offsets
    assert factors.min() < 0.8 and factors.max() > 1.2  # the 0.3-1.5 range, not the 0.9-1.1 default
    assert len(set(turns)) > 1  # rotate: true really turned the patches

    (test_file,) = dump.glob("test_*.npz")  # test_initialization: one TEST forward
    arrays = np.load(test_file)
    data, label, aug, aug_label = (arrays[f"arr_{i}"] for i in range(4))
    assert data.std() > 10  # a real, non-constant batch
    np.testing.assert_array_equal(aug, data)  # TEST: the exact identity
    np.testing.assert_array_equal(aug_label, label)
    assert _outputs(log, "Test", "diff") == [0.0] and all(v > 0 for v in _outputs(log, "Train", "diff"))


def test_empty_batch_is_refused_at_setup(caffe, tmp_path):
    with pytest.raises(ValueError, match=r"AugmentationLayer: bottom 0 is empty \(shape \(0, 3,"):
        make_net(caffe, tmp_path, '{"rotate": true}', image_shape=(0, C, H, W), label_shape=(0, 1, H, W))
