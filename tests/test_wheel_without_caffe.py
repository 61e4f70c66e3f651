"""The wheel on a machine without pycaffe: built from the working tree, installed into a fresh virtual
environment that has the dependencies (those of .venv, on its path) but no Caffe, every console script
answers --help from the environment's bin/, and caffe-stain-segment and caffe-stain-compare run the
benchmark's kind of exported model on real MoNuSeg H&E through OpenCV with the pycaffe machine's
result (mask identical, probabilities within 1e-4)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monuseg_model import TEST_TILES, monuseg_model, monuseg_test_tile  # noqa: F401 - the fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("experiment", "prepare", "train", "segment", "compare", "meanfile", "normalize", "estimate", "lmdb",
            "retrofit", "export")
TOLERANCE = 1e-4
#: What the wheel is built from (the working tree as it is, not a commit).
SOURCES = ("caffe_layers", "prototxt", "setup.py", "pyproject.toml", "README.md", "LICENSE")


def _run(command, **options):
    result = subprocess.run(command, capture_output=True, text=True, **options)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(bin folder, environment) of a venv with the wheel installed and no pycaffe."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, source / name)
    # An isolated build: pip brings the build backend pyproject.toml asks for.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder / "dist"),
          str(source)])
    wheel = next((folder / "dist").glob("caffe_stain_augment-*.whl"))
    env_dir = folder / "env"
    _run([sys.executable, "-m", "venv", str(env_dir)])
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    # The dependencies are .venv's: its site-packages as a plain path entry, so that its .pth
    # files (the pycaffe build's path, the editable source checkout) are not processed.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CAFFE_TOOL")}
    env["GLOG_minloglevel"] = "2"
    check = _run([str(python), "-c", "import caffe_layers, importlib.util; print(caffe_layers.__file__); "
                                     "print(importlib.util.find_spec('caffe'))"], env=env, cwd=folder)
    installed, caffe_spec = check.stdout.split()
    assert installed.startswith(str(env_dir)) and caffe_spec == "None"
    return env_dir / "bin", env


def test_every_console_script_answers_help(venv, tmp_path):
    bin_dir, env = venv
    for command in COMMANDS:
        result = _run([str(bin_dir / f"caffe-stain-{command}"), "--help"], env=env, cwd=tmp_path)
        assert result.stdout.startswith(f"usage: caffe-stain-{command}")


def test_segment_and_compare_from_the_wheel_give_pycaffes_result(venv, monuseg_model, tmp_path):
    from caffe_layers.cli.compare import main as compare
    from caffe_layers.cli.segment import main as segment

    bin_dir, env = venv
    image, xml = monuseg_test_tile(TEST_TILES[1])
    model = ["--model", str(monuseg_model.deploy), "--weights", str(monuseg_model.weights), "--card",
             str(monuseg_model.card)]
    args = [str(image), *model, "--image-mpp", "0.25", "--prob-format", "npy", "--tile", "256", "--no-progress"]
    result = _run([str(bin_dir / "caffe-stain-segment"), *args, "--out", str(tmp_path / "wheel")], env=env)
    assert "pycaffe is not installed, so not checked against Caffe" in result.stderr
    assert segment([*args, "--out", str(tmp_path / "caffe"), "--engine", "caffe"]) == 0
    name = image.stem
    probs = [np.load(tmp_path / side / f"{name}_prob.npy") for side in ("caffe", "wheel")]
    assert probs[0].shape == (1000, 1000) and np.abs(probs[1] - probs[0]).max() <= TOLERANCE
    masks = [np.asarray(Image.open(tmp_path / side / f"{name}_pred.png")) for side in ("caffe", "wheel")]
    np.testing.assert_array_equal(masks[1], masks[0])

    entry = ["--model", "m", str(monuseg_model.deploy), str(monuseg_model.weights), str(monuseg_model.card),
             "--image", str(image), "--mask", str(xml), "--no-figures", "--tile", "256"]
    _run([str(bin_dir / "caffe-stain-compare"), *entry, "--out", str(tmp_path / "cmp_wheel")], env=env)
    assert compare([*entry, "--out", str(tmp_path / "cmp_caffe"), "--engine", "caffe"]) == 0
    scores = [json.loads((tmp_path / side / "summary.json").read_text())["results"]["m"]["original"]
              for side in ("cmp_caffe", "cmp_wheel")]
    assert scores[1]["instance_images"] == 1
    for key in ("dice", "aji", "pq"):
        assert scores[1][key] == scores[0][key]
