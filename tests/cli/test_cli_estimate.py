"""caffe-stain-estimate (caffe_layers.cli.estimate): ranges from files, and hostile input."""
import ast
import json

import numpy as np
import pytest

from caffe_layers import image_io, stain
from caffe_layers.cli import estimate as estimate_cli

from he_images import examples, hgsc, target, white, save_png as _save  # noqa: F401 - fixtures


def test_estimate_cli(tmp_path, capsys, hgsc, examples):
    train = [_save(tmp_path / "train1.png", hgsc[:500, :500]),
             _save(tmp_path / "train2.png", hgsc[500:1000, 500:1000])]
    test = [_save(tmp_path / f"{name}.png", image[:400, :400]) for name, image in examples.items()]
    assert estimate_cli.main(["--train", *train, "--test", *test]) == 0
    out = capsys.readouterr().out
    assert "tiatoolbox_target.png" in out and "train:train1.png" in out
    param_line = out.strip().splitlines()[-1]
    params = ast.literal_eval(param_line)
    assert params["color"] is True and params["color_a_min"] < 1 < params["color_a_max"]

    assert estimate_cli.main(["--train", *train, "--test", *test, "--json",
                                    "--no-ignore-white", "--margin", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"params", "param_str", "ratios"}
    assert len(report["ratios"]["test:stardist_histo.png"]) == 3

    code = estimate_cli.main(["--train", str(tmp_path / "nope.png"), "--test", *test])
    assert code == 2 and "nope.png" in capsys.readouterr().err
    blank = _save(tmp_path / "blank.png", white())
    code = estimate_cli.main(["--train", *train, "--test", blank])
    assert code == 2 and "blank.png" in capsys.readouterr().err


def test_estimate_cli_reports_corrupt_image(tmp_path, capsys, hgsc):
    train = _save(tmp_path / "train.png", hgsc[:200, :200])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    code = estimate_cli.main(["--train", train, "--test", str(broken)])
    captured = capsys.readouterr()
    assert code == 2 and "broken.png" in captured.err and "caffe-stain-estimate: error" in captured.err
    assert captured.out == ""


def test_estimate_cli_hed(tmp_path, capsys, hgsc):
    from caffe_layers.params import AUGMENT_SCHEMA, load_params
    from caffe_layers.stain import shift_stains

    train = [_save(tmp_path / "train1.png", hgsc[:300:2, :300:2]),
             _save(tmp_path / "train2.png", hgsc[300:600:2, 300:600:2])]
    test = _save(tmp_path / "test.png", shift_stains(hgsc[600:900:2, :300:2], (1.2, 0.9, 1.0)))
    assert estimate_cli.main(["--train", *train, "--test", test, "--hed"]) == 0
    out = capsys.readouterr().out
    assert "DAB" in out and "hed_alpha =" in out
    params = load_params(out.strip().splitlines()[-1], AUGMENT_SCHEMA, "x")
    expected = stain.suggest_hed_params({"train1.png": image_io.read_rgb(train[0]),
                                         "train2.png": image_io.read_rgb(train[1])},
                                        {"test.png": image_io.read_rgb(test)})
    assert params["hed"] is True and params["hed_alpha"] == expected.params["hed_alpha"] >= 0.1
    assert params["color"] is True and params["color_a_min"] < 1 < params["color_a_max"]

    assert estimate_cli.main(["--train", *train, "--test", test, "--hed", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"params", "param_str", "ratios", "hed_ratios"}
    assert len(report["hed_ratios"]["test:test.png"]) == 3
    combined = load_params(report["param_str"], AUGMENT_SCHEMA, "x")
    assert combined["hed_alpha"] == report["params"]["hed_alpha"] and "color_a_max" in report["params"]


def test_estimate_cli_refuses_a_black_test_image_and_a_huge_margin(tmp_path, capsys, hgsc):
    train = _save(tmp_path / "train.png", hgsc[:100, :100])
    black = _save(tmp_path / "black.png", np.zeros((20, 20, 3), np.uint8))
    code = estimate_cli.main(["--train", train, "--test", black])
    err = capsys.readouterr().err
    assert code == 2 and "black.png" in err and "zero mean in channel R" in err and "Traceback" not in err
    code = estimate_cli.main(["--train", train, "--test", train, "--margin", "1e308"])
    assert code == 2 and "--margin must be a number in [0, 10]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="margin must be at most 10"):
        stain.suggest_color_params([hgsc[:50, :50]], [hgsc[50:100, :50]], margin=1e308)

