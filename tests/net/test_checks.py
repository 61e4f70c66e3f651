"""What Caffe would abort on is refused first, in Python, with a message naming file and field."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from caffe_layers.net import checks, prototxt, training
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter

REPO_ROOT = Path(__file__).resolve().parents[2]

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('type: "Softmax"', 'type: "SoftMaks"'), r"layer 'prob' has unknown type 'SoftMaks'"),
    (lambda t: t.replace('bottom: "score" top: "prob"', 'bottom: "scores" top: "prob"'),
     r"layer 'prob' reads bottom 'scores', which no earlier layer produces"),
    (lambda t: t.replace("dim: 1 dim: 3", "dim: 0 dim: 3"), r"Input layer 'data' has shape \[0, 3, 8, 8\]"),
    (lambda t: t.replace("num_output: 2", "num_output: 0"), r"num_output must be >= 1"),
    (lambda t: t.replace("layer { name: \"prob\"", "layer { name: \"prob\" type: \"Python\" "
                         "python_param { module: \"no_such_module_here\" layer: \"X\" } bottom: \"score\" "
                         "top: \"prob2\" } layer { name: \"prob_\""),
     r"cannot import module 'no_such_module_here'"),
    (lambda t: t + "layer { this is not protobuf", r"net\.prototxt is not a valid prototxt"),
])
def test_bad_nets_are_refused(caffe, tmp_path, change, message):
    path = write(tmp_path / "net.prototxt", change(NET))
    with pytest.raises(ValueError, match=message):
        checks.check_net_param(prototxt.read_net_prototxt(path), str(path))


def test_binary_file_as_prototxt_names_it(tmp_path):
    path = tmp_path / "weights_by_mistake.prototxt"
    path.write_bytes(b"\x08\x96\x01\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"weights_by_mistake\.prototxt is not a text prototxt"):
        prototxt.read_net_prototxt(path)


def test_missing_database_is_refused(caffe, tmp_path):
    path = write(tmp_path / "net.prototxt", """
        layer { name: "data" type: "Data" top: "data" top: "label"
          data_param { source: "no_such_lmdb" backend: LMDB batch_size: 2 } }
        """)
    with pytest.raises(FileNotFoundError, match=r"LMDB database 'no_such_lmdb', which does not exist"):
        checks.check_net_param(prototxt.read_net_prototxt(path), str(path), caffe.TRAIN)


SOLVER = 'net: "{net}"\nbase_lr: 0.01\nmax_iter: 2\nsolver_mode: CPU\nlr_policy: "fixed"\n'


@pytest.mark.parametrize("extra, message", [
    ('type: "Adamm"\n', r"unknown solver type 'Adamm'"),
    ('lr_policy: "stepp"\n', r"unknown lr_policy 'stepp'"),
    ('lr_policy: "step"\ngamma: 0.1\n', r"lr_policy 'step' needs stepsize"),
    ('lr_policy: "inv"\ngamma: 0.1\n', r"lr_policy 'inv' needs power"),
    ('lr_policy: "multistep"\ngamma: 0.1\n', r"needs stepvalue"),
    ('solver_mode: GPU\n', r"solver_mode GPU, but this Caffe is built CPU-only"),
    ('base_lr: nan\n', r"base_lr must be a finite number"),
    ('iter_size: 0\n', r"iter_size and average_loss must be >= 1"),
    (None, r'no lr_policy; set one, e.g. lr_policy: "fixed"'),
])
def test_bad_solvers_are_refused_before_caffe(caffe, tmp_path, extra, message):
    net = write(tmp_path / "net.prototxt", NET)
    solver = tmp_path / "solver.prototxt"
    text = SOLVER.format(net=net)
    solver.write_text(text.replace('lr_policy: "fixed"\n', "") if extra is None else text + extra)
    with pytest.raises(ValueError, match=message):
        training.train(solver, progress=False)


def test_solver_with_a_broken_net_is_refused(caffe, tmp_path):
    net = write(tmp_path / "net.prototxt", NET.replace('type: "Softmax"', 'type: "Sofmax"'))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER.format(net=net))
    with pytest.raises(ValueError, match=r"net\.prototxt: layer 'prob' has unknown type 'Sofmax'"):
        training.train(solver, progress=False)


def _weights(caffe, tmp_path, text, name):
    net = caffe.Net(str(write(tmp_path / f"{name}.prototxt", text)), caffe.TEST)
    path = tmp_path / f"{name}.caffemodel"
    net.save(str(path))
    return path


def test_segmenter_refuses_foreign_garbage_and_nan_weights(caffe, tmp_path):
    deploy = write(tmp_path / "deploy.prototxt", NET)
    good = _weights(caffe, tmp_path, NET, "good")
    CaffeSegmenter(deploy, good)  # fits
    foreign = _weights(caffe, tmp_path, NET.replace('name: "conv"', 'name: "other_conv"'), "foreign")
    with pytest.raises(ValueError, match=r"foreign\.caffemodel shares no learnable layer"):
        CaffeSegmenter(deploy, foreign)
    wider = _weights(caffe, tmp_path, NET.replace("num_output: 2", "num_output: 4"), "wider")
    with pytest.raises(ValueError, match=r"wider\.caffemodel does not fit the net: layer 'conv' blob 0"):
        CaffeSegmenter(deploy, wider)
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"garbage\.caffemodel"):
        CaffeSegmenter(deploy, garbage)
    net = caffe.Net(str(deploy), str(good), caffe.TEST)
    net.params["conv"][0].data[...] = np.nan
    nan_path = tmp_path / "nan.caffemodel"
    net.save(str(nan_path))
    with pytest.raises(ValueError, match=r"nan\.caffemodel does not fit the net: layer 'conv' blob 0 holds NaN"):
        CaffeSegmenter(deploy, nan_path)


def _run_python(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                                        str(REPO_ROOT / "tests" / "net")]),
               GLOG_minloglevel="2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_max_pooling_over_nan_propagates_nan_and_does_not_corrupt_memory(caffe, tmp_path):
    # Before the build's pooling patch, an all-NaN window left the mask at -1, the output at
    # -FLT_MAX, and Backward wrote before bottom_diff: "double free or corruption" at exit.
    result = _run_python("""
        import numpy as np, caffe
        open("net.prototxt", "w").write('''force_backward: true
        layer { name: "data" type: "Input" top: "data" top: "label"
          input_param { shape { dim: 2 dim: 2 dim: 8 dim: 8 } shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
        layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" }''')
        net = caffe.Net("net.prototxt", caffe.TRAIN)
        net.blobs["data"].data[...] = np.nan
        net.blobs["label"].data[...] = 0
        for _ in range(3):
            net.forward(); net.backward()
        assert np.isnan(net.blobs["pool"].data).all(), net.blobs["pool"].data.ravel()[:4]
        del net
        print("survived")
        """, tmp_path)
    assert result.returncode == 0 and "survived" in result.stdout, result.stderr[-2000:]


def test_diverging_training_stops_at_the_first_nan_loss_and_saves_no_nan(caffe, tmp_path):
    # In a subprocess: a memory corruption (the old failure) must fail this test, not the suite.
    result = _run_python("""
        from pathlib import Path
        from test_loop import write_run
        from caffe_layers.net import training
        solver, _ = write_run(Path("."), base_lr=1e4, max_iter=60, snapshot=1)
        try:
            training.train(solver, progress=False, validate_every=10)
        except training.TrainingDiverged as error:
            print("DIVERGED:", error)
        snapshots = sorted(p.name for p in Path("snapshots").glob("*.caffemodel"))
        print("SNAPSHOTS:", snapshots)
        from caffe_layers.net.checks import read_weights
        import numpy as np
        for name in snapshots:
            layers = read_weights(Path("snapshots") / name).layer
            assert all(np.isfinite(np.asarray(b.data)).all() for l in layers for b in l.blobs), name
        print("ALL FINITE")
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "DIVERGED:" in out and "ALL FINITE" in out, out
    # Either the loss went NaN first, or the weights did just before a snapshot.
    assert ("the loss is nan at iteration" in out and "stopped without saving the non-finite weights" in out) \
        or "the weights are NaN or infinite at iteration" in out, out


# Mistakes no Python-side check lists: Caffe's own CHECKs at layer setup or reshape. The net is
# first built in a forked child, so they are ValueErrors here, not an abort of the test process.
@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("kernel_size: 3 pad: 1", "pad: 1"), r"kernel_size must be specified once"),
    (lambda t: t.replace("kernel_size: 3 pad: 1", "kernel_size: 64"), r"Check failed: shape\[i\] >= 0"),
])
def test_caffe_checks_at_setup_are_value_errors(caffe, tmp_path, change, message):
    good = _weights(caffe, tmp_path, NET, "good")
    path = write(tmp_path / "net.prototxt", change(NET))
    with pytest.raises(checks.CaffeAborted, match=r"net\.prototxt: Caffe cannot build the net: .*" + message):
        CaffeSegmenter(path, good)


def test_a_tile_too_small_for_the_net_is_a_value_error(caffe, tmp_path):
    # A strided 7×7 convolution without padding: a 2×2 input makes a negative blob shape.
    text = NET.replace("kernel_size: 3 pad: 1", "kernel_size: 7 stride: 2")
    weights = _weights(caffe, tmp_path, text, "valid")
    segmenter = CaffeSegmenter(write(tmp_path / "net.prototxt", text), weights)
    with pytest.raises(checks.CaffeAborted, match=r"net\.prototxt: Caffe cannot run the net on a 1×3×2×2 input"):
        segmenter(np.zeros((1, 3, 2, 2), np.float32))
    assert segmenter(np.full((1, 3, 32, 32), 128, np.float32)).shape == (1, 2, 32, 32)  # still usable


def test_solver_whose_net_caffe_checks_is_refused(caffe, tmp_path):
    net = write(tmp_path / "net.prototxt", """
        layer { name: "data" type: "DummyData" top: "data" top: "label"
          dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
          convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
        """)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER.format(net=net))
    with pytest.raises(checks.CaffeAborted, match=r"solver\.prototxt: Caffe cannot build the solver's nets: "
                                                  r"Check failed: .*Number of labels must match"):
        training.train(solver, progress=False)


def test_segment_cli_with_a_net_caffe_aborts_on_exits_2(caffe, tmp_path):
    good = _weights(caffe, tmp_path, NET, "good")
    path = write(tmp_path / "net.prototxt", NET.replace("kernel_size: 3 pad: 1", "pad: 1"))
    from PIL import Image
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "x.png")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), GLOG_minloglevel="2")
    for engine in ("caffe", "opencv", "auto"):
        result = subprocess.run([sys.executable, "-m", "caffe_layers.cli.segment", "--model", str(path), "--weights",
                                 str(good), "--out", str(tmp_path / "out"), "--engine", engine, "--no-progress",
                                 str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("caffe-stain-segment: error: "), result.stderr
        assert "kernel_size must be specified once" in result.stderr and "Check failure stack" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_input_larger_than_memory_is_refused_before_it_is_made(caffe, tmp_path, monkeypatch):
    from caffe_layers.net.inference import caffe_engine as predictor
    weights = _weights(caffe, tmp_path, NET, "good")
    segmenter = CaffeSegmenter(write(tmp_path / "net.prototxt", NET), weights)
    monkeypatch.setattr(predictor, "available_memory", lambda: 2 ** 20)  # 1 MiB left
    with pytest.raises(checks.CaffeAborted, match=r"a 4×3×256×256 input needs at least .* GiB for the net's blobs, "
                                                  r"more than the 0\.0 GiB of memory available; use a smaller --tile"):
        segmenter.check_input_shape((4, 3, 256, 256))
    segmenter.check_input_shape((1, 3, 16, 16))  # 5 kB: fine


def test_segment_probes_no_larger_than_the_largest_image(caffe, tmp_path):
    # --tile 4096 on a small image: the engine probed a 4096×4096 tile (--tile 16384 with 4 tiles a batch: 13 GB).
    weights = _weights(caffe, tmp_path, NET, "good")
    from PIL import Image
    Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(tmp_path / "x.png")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, "-m", "caffe_layers.cli.segment", "--model", str(tmp_path / "good.prototxt"),
                             "--weights", str(weights), "--out", str(tmp_path / "out"), "--tile", "4096",
                             "--batch-tiles", "1", "--no-progress", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "1×3×40×40 probe tile" in result.stderr


def test_survival_trial_of_a_hanging_child_gives_up(monkeypatch):
    import time
    monkeypatch.setattr(checks, "SURVIVAL_TIMEOUT", 0.5)
    started = time.monotonic()
    assert checks.survives_caffe(lambda: time.sleep(60), "x") is None
    assert time.monotonic() - started < 10
    assert checks.survives_caffe(lambda: 7, "x") == 7
