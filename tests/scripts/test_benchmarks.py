"""The speed benchmarks cannot rot: each runs its smoke mode (tiny sizes) with real Caffe.

No timing is asserted (the machine is shared); the tests check that the scripts run end to end
and print their side-by-side ratios, and that the engines they compare agree.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1200


def _run(script, *args):
    env = dict(os.environ, GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *args], capture_output=True,
                            text=True, timeout=TIMEOUT, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_segment_smoke(caffe):
    out = _run("benchmark_segment.py", "--smoke")
    speedups = re.findall(r"opencv / caffe speed-up: ([\d.]+)–([\d.]+)×; max \|Δp\| ([\d.e+-]+)", out)
    assert speedups, out
    assert float(speedups[0][2]) <= 1e-4, out  # the engines agree on the image
    for engine in ("caffe", "opencv"):
        assert re.search(rf"{engine}: segment_tiled / forwards alone [\d.]+–[\d.]+×", out), out
    # One row per template model, each with both engines' seconds per megapixel side by side.
    rows = [line for line in out.splitlines() if "(random weights)" in line]
    assert len(rows) == 2 and all(len(re.findall(r"\d+\.\d+", row)) >= 8 for row in rows), out


def test_benchmark_slides_smoke(caffe):
    out = _run("benchmark_slides.py", "--smoke")
    assert re.search(r"masks of process, workers=1 identical: True", out), out
    for config in ("process", "workers=1"):
        assert re.search(rf"{re.escape(config)}: +[\d.]+ s, [\d.]+ s per tissue MP", out), out
