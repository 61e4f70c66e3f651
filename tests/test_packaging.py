"""Packaging: the metadata in pyproject.toml, the minimum Python version of the code, the
templates shipped as package data, and the features of the oldest dependency versions that
pyproject.toml allows. Needs no Caffe; ``scripts/test_python_versions.sh`` runs these (and the
rest of the Caffe-free suite) on Python 3.8 to 3.13 against the built wheel."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest itself depends on tomli there
    import tomli as tomllib

import caffe_layers

REPO_ROOT = Path(__file__).resolve().parents[1]
MINIMUM_PYTHON = (3, 8)
TESTED_PYTHONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]


def _project():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirement_names(requirements):
    return [re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() for requirement in requirements]


def test_vermin_finds_nothing_newer_than_python_3_8():
    """The package needs nothing newer than 3.8: no str.removeprefix, functools.cache, builtin
    generics or X | Y evaluated at run time, match, ... (the tests that run without Caffe are
    run on 3.8 itself by scripts/test_python_versions.sh)."""
    target = "%d.%d" % MINIMUM_PYTHON
    # vermin's own entry point (older vermin has no __main__ for -m)
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips", "--violations",
               f"-t={target}-", str(REPO_ROOT / "caffe_layers")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Minimum required versions: ([\d.]+)", result.stdout)
    assert found, result.stdout
    assert tuple(int(part) for part in found.group(1).split(".")) <= MINIMUM_PYTHON, result.stdout


def test_metadata_python_range_and_dependencies():
    project = _project()
    assert project["requires-python"] == ">=%d.%d" % MINIMUM_PYTHON
    classifiers = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    assert classifiers == set(TESTED_PYTHONS)
    names = _requirement_names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names += _requirement_names(extra)
    assert not [name for name in names if name.startswith("caffe") and name != "caffe-stain-augment"], \
        "Caffe is never a pip dependency: the layers run in the lab's own pycaffe"
    opencv = [r for r in project["dependencies"] if r.startswith("opencv-python-headless")]
    assert len(opencv) == 1 and "<5" in opencv[0], "OpenCV 5 has no Caffe importer: stay on 4.x"
    # Every runtime dependency has a lower bound (scripts/test_python_versions.sh installs
    # exactly those on Python 3.8).
    assert all(">=" in requirement for requirement in project["dependencies"]), project["dependencies"]


def test_templates_are_package_data_equal_to_the_repository_copy():
    folder = caffe_layers.template_dir()
    shipped = {path.name: path.read_text() for path in folder.glob("*.prototxt")}
    committed = {path.name: path.read_text() for path in (REPO_ROOT / "prototxt").glob("*.prototxt")}
    # In a source checkout these are the same folder; installed from the wheel, the copy under
    # caffe_layers/prototxt/ (tests/net/test_templates.py checks prototxt/ against the generator).
    assert shipped == committed and len(shipped) == 6


def test_estimate_ignore_white_flags():
    # argparse.BooleanOptionalAction is 3.9+: the command spells out both flags.
    from caffe_layers.cli.estimate import _parser

    base = ["--train", "a.png", "--test", "b.png"]
    assert _parser().parse_args(base).ignore_white is True
    assert _parser().parse_args(base + ["--no-ignore-white"]).ignore_white is False
    assert _parser().parse_args(base + ["--no-ignore-white", "--ignore-white"]).ignore_white is True


# --- what the code asks of the oldest dependency versions that pyproject.toml allows --------
# (paths that the Caffe-free tests do not otherwise reach)

def test_report_figures(tmp_path):
    pytest.importorskip("matplotlib")  # the [scripts] extra
    from caffe_layers import reports

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    comparison = reports.save_comparison_figure(tmp_path / "a" / "panels.png",
                                                [("image", rgb), ("mask", rgb[..., 0] > 128), ("none", None)],
                                                title="t")
    results = {model: {c: {"dice": d} for c, d in zip(("in_domain", "pale"), (0.8, 0.5))} for model in ("m1", "m2")}
    bars = reports.save_bar_figure(tmp_path / "b" / "bars.png", results, ["in_domain", "pale"], ["m1", "m2"])
    # Several seeds (error bars) and an unseen condition (shaded).
    seeds = [{m: {c: {"dice": d + 0.01 * k} for c, d in ((("in_domain", 0.8), ("pale", 0.5), ("real", 0.4)))}
              for m in ("m1", "m2")} for k in range(3)]
    seeded = reports.save_bar_figure(tmp_path / "b" / "seeded.png", seeds, ["in_domain", "pale", "real"], ["m1", "m2"],
                                     seen={"in_domain": False, "pale": True, "real": False})
    for path in (comparison, bars, seeded):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bars(capsys):
    pytest.importorskip("tqdm")  # the [scripts] extra
    from caffe_layers.tiling import segment_tiled

    def predict(batch):
        return np.concatenate([np.zeros_like(batch[:, :1]), np.ones_like(batch[:, :1])], axis=1)

    rgb = np.zeros((40, 40, 3), np.uint8)
    prob = segment_tiled(predict, rgb, tile=16, overlap=4, multiple=4, progress="tiles")
    assert prob.shape == (40, 40) and (prob == 1).all()
    assert "tiles" in capsys.readouterr().err
    # and the training bar's calls (caffe_layers.net.training, which needs Caffe to run)
    import io

    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=5, initial=1, unit="it", desc="solver", file=out)
    bar.set_postfix({"loss": "0.5000"}, refresh=False)
    bar.update(1)
    bar.close()
    assert "loss=0.5000" in out.getvalue() and "refresh" not in out.getvalue()


def test_protobuf_text_format_and_decode_error():
    # What caffe_layers.net does with Caffe's messages, on a message protobuf ships itself.
    pytest.importorskip("google.protobuf")  # the [scripts] extra
    from google.protobuf import descriptor_pb2, text_format
    from google.protobuf.message import DecodeError

    message = descriptor_pb2.FileDescriptorProto()
    text_format.Merge('name: "net.proto" package: "caffe"', message)
    assert text_format.Parse(str(message), descriptor_pb2.FileDescriptorProto()) == message
    with pytest.raises(text_format.ParseError):
        text_format.Merge("name: ", descriptor_pb2.FileDescriptorProto())
    with pytest.raises(DecodeError):
        descriptor_pb2.FileDescriptorProto().ParseFromString(b"\xff\xff\xff")


def test_compressed_tiff_through_imagecodecs(tmp_path):
    pytest.importorskip("imagecodecs")  # the [scripts] extra: tifffile's codecs beyond zlib
    import tifffile
    from PIL import Image

    from caffe_layers.image_io import read_rgb

    rgb = np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(str(tmp_path / "lzw.tif"), compression="tiff_lzw")  # the common slide codec
    tifffile.imwrite(tmp_path / "zstd.tif", rgb, photometric="rgb", compression="zstd")
    for name in ("lzw.tif", "zstd.tif"):
        np.testing.assert_array_equal(read_rgb(tmp_path / name), rgb)
