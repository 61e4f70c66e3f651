"""The Caffe build is real: Python layers from caffe_layers run in pycaffe and in the caffe tool."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_PARAM_STR = '{"rotate": True, "color": True, "color_a_max":1.5, "color_a_min": .3}'

NET_WITH_PYTHON_LAYER = """
name: "tiny"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } shape { dim: 2 dim: 1 dim: 16 dim: 16 } } }
layer { name: "augment" type: "Python" bottom: "data" bottom: "label" top: "aug" top: "aug_label"
  python_param { module: "caffe_layers.augmentation" layer: "AugmentationLayer"
                 param_str: '%s' } }
layer { name: "conv" type: "Convolution" bottom: "aug" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "aug_label" top: "loss" }
"""


def test_pycaffe_runs_python_layer_forward_and_backward(caffe, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET_WITH_PYTHON_LAYER % SEED_PARAM_STR)
    net = caffe.Net(str(path), caffe.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.uniform(0, 255, (2, 3, 16, 16))
    net.blobs["label"].data[...] = rng.integers(0, 2, (2, 1, 16, 16))
    loss = float(net.forward()["loss"])
    assert np.isfinite(loss) and loss > 0
    # The Python layer really ran: TRAIN-phase colour scaling changed the data.
    assert not np.allclose(net.blobs["aug"].data, net.blobs["data"].data)
    net.backward()
    weight_grad = net.params["conv"][0].diff
    assert np.isfinite(weight_grad).all() and np.abs(weight_grad).sum() > 0


def test_caffe_tool_trains_net_with_python_layer(run_caffe_tool, tmp_path):
    (tmp_path / "net.prototxt").write_text(textwrap.dedent("""
        name: "tiny_train"
        layer { name: "data" type: "DummyData" top: "data" top: "label"
          dummy_data_param {
            data_filler { type: "uniform" min: 0 max: 255 } data_filler { type: "constant" value: 1 }
            shape { dim: 2 dim: 3 dim: 16 dim: 16 } shape { dim: 2 dim: 1 dim: 16 dim: 16 } } }
        layer { name: "augment" type: "Python" bottom: "data" bottom: "label" top: "data" top: "label"
          python_param { module: "caffe_layers.augmentation" layer: "AugmentationLayer"
                         param_str: '%s' } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
          convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
        """ % SEED_PARAM_STR))
    (tmp_path / "solver.prototxt").write_text(textwrap.dedent("""
        net: "net.prototxt"
        base_lr: 0.0001
        lr_policy: "fixed"
        momentum: 0.9
        max_iter: 5
        display: 1
        snapshot_prefix: "tiny"
        solver_mode: CPU
        random_seed: 1
        """))
    result = run_caffe_tool("train", "--solver=solver.prototxt", cwd=tmp_path)
    assert "Iteration 5" in result.stderr or "Optimization Done" in result.stderr
    assert (tmp_path / "tiny_iter_5.caffemodel").exists()


def test_missing_caffe_fails_when_required(tmp_path):
    """Through the README command a missing Caffe is a failure, not a skip."""
    (tmp_path / "caffe.py").write_text("raise ImportError('simulated: no caffe here')\n")
    (tmp_path / "test_needs_caffe.py").write_text("def test_it(caffe):\n    pass\n")
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "tests" / "conftest.py").read_text())
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    required = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tmp_path)], env=dict(env, CAFFE_STAIN_REQUIRE_CAFFE="1"),
                              capture_output=True, text=True, cwd=tmp_path)
    assert required.returncode == 1, required.stdout
    assert "install_caffe.sh" in required.stdout
    env.pop("CAFFE_STAIN_REQUIRE_CAFFE", None)
    optional = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tmp_path)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert optional.returncode == 0 and "skipped" in optional.stdout, optional.stdout


def _fake_python(directory, version, libpython):
    """A stand-in interpreter answering install_caffe.sh's version and libpython queries."""
    fake = directory / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$*" in
          *LDLIBRARY*) echo "{libpython}" ;;
          *version_info*) echo "{version}" ;;
          *) exit 3 ;;
        esac
        """))
    fake.chmod(0o755)
    return fake


def _run_install(tmp_path, python):
    env = dict(os.environ, PYTHON=str(python), CAFFE_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install_caffe.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_install_script_refuses_another_python_version(tmp_path):
    result = _run_install(tmp_path, _fake_python(tmp_path, "3.10", "/usr/lib/libpython3.10.so"))
    assert result.returncode == 1
    assert "is Python 3.10; this build needs Python 3.11" in result.stderr
    assert not (tmp_path / "cache" / "downloads").exists()  # it stopped before doing anything


def test_install_script_refuses_a_python_without_shared_libpython(tmp_path):
    result = _run_install(tmp_path, _fake_python(tmp_path, "3.11", ""))
    assert result.returncode == 1
    assert "no shared libpython" in result.stderr and "libpython3.11.so" in result.stderr
