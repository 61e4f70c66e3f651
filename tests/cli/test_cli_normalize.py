"""caffe-stain-normalize (caffe_layers.cli.normalize): files, folders and hostile input."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_layers import image_io, stain
from caffe_layers.cli import estimate as estimate_cli
from caffe_layers.cli import normalize as normalize_cli

from he_images import examples, hgsc, target, white, save_png as _save  # noqa: F401 - fixtures


def test_normalize_cli_single_file_and_folder(tmp_path, hgsc, target):
    template = _save(tmp_path / "template.png", target[::4, ::4])
    source = _save(tmp_path / "in.png", hgsc[::4, ::4])
    output = tmp_path / "out.png"
    assert normalize_cli.main(
        [source, "--template", template, "--output", str(output), "--ignore-white"]) == 0
    written = np.asarray(Image.open(output))
    expected = stain.match_histograms(hgsc[::4, ::4], target[::4, ::4], ignore_white=True)
    np.testing.assert_array_equal(written, expected)

    folder = tmp_path / "inputs"
    folder.mkdir()
    _save(folder / "a.png", hgsc[:200, :200])
    Image.fromarray(hgsc[200:400, :200]).save(folder / "b.jpg")
    rgba = np.dstack([hgsc[:100, :100], np.full((100, 100), 255, np.uint8)])
    Image.fromarray(rgba).save(folder / "c.tif")
    (folder / "notes.txt").write_text("not an image")
    for method in ("histmatch", "reinhard", "macenko"):
        out_dir = tmp_path / f"out_{method}"
        assert normalize_cli.main(
            [str(folder), "--template", template, "--output", str(out_dir), "--method", method]
        ) == 0
        assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]


def test_normalize_cli_errors(tmp_path, capsys, target):
    template = _save(tmp_path / "template.png", target[::4, ::4])
    missing = tmp_path / "missing.png"
    code = normalize_cli.main([str(missing), "--template", template, "--output",
                                     str(tmp_path / "o.png")])
    assert code == 2 and "missing.png" in capsys.readouterr().err
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(grey)
    code = normalize_cli.main([str(grey), "--template", template, "--output",
                                     str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "grey.png" in err and "grey-level" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code = normalize_cli.main([template, "--template", str(broken), "--output",
                                     str(tmp_path / "o.png")])
    assert code == 2 and "broken.png" in capsys.readouterr().err
    blank_template = _save(tmp_path / "blank.png", white())
    code = normalize_cli.main([template, "--template", blank_template, "--method",
                                     "macenko", "--output", str(tmp_path / "o.png")])
    assert code == 2 and "blank.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        normalize_cli.main([template, "--output", "x.png"])  # no --template: argparse's usage error
    assert exit_info.value.code == 2


def test_normalize_cli_rejects_ignore_white_with_macenko(tmp_path, capsys, target):
    template = _save(tmp_path / "template.png", target[::4, ::4])
    code = normalize_cli.main([template, "--template", template, "--method", "macenko",
                                     "--ignore-white", "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--ignore-white" in err and "macenko" in err
    assert not (tmp_path / "o.png").exists()


def test_normalize_cli_degenerate_macenko_template(tmp_path, capsys, target):
    template = _save(tmp_path / "flat.png", np.full((40, 40, 3), (150, 80, 140), np.uint8))
    code = normalize_cli.main([template, "--template", template, "--method", "macenko",
                                     "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "flat.png" in err and "haematoxylin and eosin" in err


def test_cli_unreadable_folder_names_it(tmp_path, capsys, monkeypatch, target):
    template = _save(tmp_path / "template.png", target[::4, ::4])
    folder = tmp_path / "locked"
    folder.mkdir()
    _save(folder / "a.png", target[:50, :50])
    original_iterdir = image_io.Path.iterdir

    def iterdir(self):  # chmod 000 does not stop root, so refuse the listing directly
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return original_iterdir(self)

    monkeypatch.setattr(image_io.Path, "iterdir", iterdir)
    code = normalize_cli.main([str(folder), "--template", template, "--output",
                                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "locked" in err and "Permission denied" in err
    code = estimate_cli.main(["--train", template, "--test", str(folder)])
    assert code == 2 and "locked" in capsys.readouterr().err


def test_normalize_cli_warns_on_blank_input(tmp_path, capsys, target):
    template = _save(tmp_path / "template.png", target[::4, ::4])
    blank = _save(tmp_path / "blank.png", white())
    output = tmp_path / "o.png"
    assert normalize_cli.main(
        [blank, "--template", template, "--output", str(output), "--ignore-white"]) == 0
    assert "no tissue" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(output)), white())


def test_normalize_cli_refuses_degenerate_histogram_templates(tmp_path, capsys, hgsc):
    source = _save(tmp_path / "in.png", hgsc[:60, :60])
    single = _save(tmp_path / "single.png", np.full((30, 30, 3), (150, 80, 140), np.uint8))
    blank = _save(tmp_path / "blank.png", white())
    for template, extra, message in ((single, [], "flat in channel R, G, B (every pixel used has value 150)"),
                                     (blank, [], "flat in channel R, G, B (every pixel used has value 255)"),
                                     (blank, ["--ignore-white"], "no tissue")):
        output = tmp_path / "out.png"
        code = normalize_cli.main([source, "--template", template, "--output", str(output), *extra])
        err = capsys.readouterr().err
        assert code == 2 and Path(template).name in err and message in err, err
        assert not output.exists()


def test_normalize_cli_bounds_nbins_and_never_writes_over_inputs(tmp_path, capsys, hgsc):
    source = _save(tmp_path / "in.png", hgsc[:60, :60])
    template = _save(tmp_path / "t.png", hgsc[100:160, :60])
    code = normalize_cli.main([source, "--template", template, "--output", str(tmp_path / "o.png"),
                               "--nbins", "1000000000"])
    assert code == 2 and "--nbins must be in [2, 65536]" in capsys.readouterr().err
    before = Path(source).read_bytes()
    code = normalize_cli.main([source, "--template", template, "--output", source, "--overwrite"])
    assert code == 2 and "would replace an input image or the template" in capsys.readouterr().err
    assert Path(source).read_bytes() == before
    # Formats follow the extension: a .jpg output holds JPEG bytes, an unknown one is refused.
    assert normalize_cli.main([source, "--template", template, "--output", str(tmp_path / "o.jpg")]) == 0
    assert (tmp_path / "o.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    capsys.readouterr()
    assert normalize_cli.main([source, "--template", template, "--output", str(tmp_path / "o.gif")]) == 2
    assert "cannot write images with extension '.gif'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"nbins must be an integer in \[2, 65536\]"):
        stain.match_histograms(hgsc[:10, :10], hgsc[10:20, :10], nbins=10 ** 9)
