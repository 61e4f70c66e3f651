"""Shared fixtures.

Tests that need Caffe take the ``caffe`` fixture. Run through ``scripts/run_tests.sh`` (the
README's command), ``CAFFE_STAIN_REQUIRE_CAFFE=1`` is set and a missing Caffe is a test
failure, not a skip; a bare ``pytest`` on a machine without Caffe skips those tests.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Caffe's glog output would drown pytest's; must be set before caffe is imported.
os.environ.setdefault("GLOG_minloglevel", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _missing(what, detail):
    message = f"{what} is not available ({detail}); run `bash scripts/install_caffe.sh`"
    if os.environ.get("CAFFE_STAIN_REQUIRE_CAFFE"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def caffe():
    """The real pycaffe module, in CPU mode."""
    try:
        import caffe as caffe_module
    except ImportError as error:
        _missing("pycaffe", error)
    caffe_module.set_mode_cpu()
    return caffe_module


@pytest.fixture(scope="session")
def caffe_tool():
    """Path of the `caffe` command-line tool (CAFFE_TOOL, .venv/bin/caffe, or on PATH)."""
    candidates = [os.environ.get("CAFFE_TOOL"), str(REPO_ROOT / ".venv" / "bin" / "caffe"),
                  shutil.which("caffe")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    _missing("the caffe command-line tool", "not in CAFFE_TOOL, .venv/bin/caffe or PATH")


@pytest.fixture(scope="session")
def run_caffe_tool(caffe_tool):
    """Run the caffe tool; return CompletedProcess, with its log shown on failure."""

    def run(*args, cwd=None, timeout=600, check=True):
        env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
        result = subprocess.run([caffe_tool, *map(str, args)], cwd=cwd, env=env, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"caffe {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 + result.stderr[-4000:])
        return result

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module that imports pycaffe tooling at its top (``caffe_layers.net``, the layers,
    ...) is skipped like the ``caffe`` fixture's tests when Caffe is missing, not a collection
    error; with CAFFE_STAIN_REQUIRE_CAFFE set it stays an error."""
    outcome = yield
    report = outcome.get_result()
    if (report.failed and isinstance(collector, pytest.Module)
            and not os.environ.get("CAFFE_STAIN_REQUIRE_CAFFE")
            and "No module named 'caffe'" in str(report.longrepr)):
        reason = ("Skipped: pycaffe is not available (No module named 'caffe'); "
                  "run `bash scripts/install_caffe.sh`")
        outcome.force_result(pytest.CollectReport(report.nodeid, "skipped",
                                                  (str(collector.path), None, reason), []))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (or fixture) that needs a data package which is not installed is skipped, naming
    it; with CAFFE_STAIN_REQUIRE_DATA set (scripts/run_tests.sh) it stays a failure."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or os.environ.get("CAFFE_STAIN_REQUIRE_DATA"):
        return
    from caffe_layers.sample_data import DataPackageMissing

    if call.excinfo.errisinstance(DataPackageMissing):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
