"""The numpy core and the tools import without Caffe; only the layer modules need it."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = ["params", "transforms", "stain", "stain_cli", "imageio", "patches", "metrics", "segment",
        "compare", "prepare", "datasets", "meanfile", "training", "unet", "experiment"]
LAYERS = ["augmentation", "data", "mean_subtract"]


def _import_without_caffe(tmp_path, module):
    (tmp_path / "caffe.py").write_text("raise ImportError('no caffe on this machine')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-c", f"import caffe_layers.{module}"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


def test_core_modules_import_without_caffe(tmp_path):
    for module in CORE:
        result = _import_without_caffe(tmp_path, module)
        assert result.returncode == 0, f"caffe_layers.{module}: {result.stderr}"


def test_layer_modules_need_caffe(tmp_path):
    for module in LAYERS:
        result = _import_without_caffe(tmp_path, module)
        assert result.returncode != 0 and "no caffe on this machine" in result.stderr, module
