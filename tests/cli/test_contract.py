"""The commands' one error contract: a user error is one line naming the problem, exit code 2."""
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("command", ["compare", "estimate", "experiment", "meanfile", "normalize", "prepare",
                                     "retrofit", "segment", "train"])
def test_help_runs(caffe, command, tmp_path):
    result = _run(command, ["--help"], tmp_path)
    assert result.returncode == 0 and f"caffe-stain-{command}" in result.stdout, result.stderr
