"""Tests of caffe_layers.stain.statistics: tissue statistics, their fitted spread and the transfer."""
import warnings

import cv2
import numpy as np
import pytest

from caffe_layers.param_str import ParamError, format_param_str, parse_param_str
from caffe_layers.stain.optical_density import stain_concentrations
from caffe_layers.stain.statistics import (BLEND_RAMP, STAIN_STATS_SCHEMA, STD_FLOOR, StainStatisticsTransfer,
                                           check_stain_stats, draw_target_statistics, fit_stain_statistics,
                                           tissue_statistics)
from caffe_layers.stain.tissue import NoTissueWarning, tissue_mask

from he_images import hgsc  # noqa: F401 - fixture

SPACES = ("lab", "hed")


@pytest.fixture(scope="module")
def tiles(hgsc):
    """Nine 128×128 tiles of real H&E, with glass in some of them."""
    return [np.ascontiguousarray(hgsc[y:y + 128, x:x + 128]) for y in (0, 600, 1200) for x in (0, 700, 1350)]


def planes(rgb):
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), np.float32)


def with_glass(rgb, rows=40):
    """``rgb`` with its top rows replaced by slightly uneven glass (grey levels 225-250)."""
    out = rgb.copy()
    out[:rows] = 225 + (np.arange(out[:rows].size).reshape(out[:rows].shape) * 7) % 26
    return out


def definition(rgb, space, white_threshold=200):
    """Tissue means and stds the plain way: float64, the documented conversions, tissue_mask."""
    mask = tissue_mask(rgb, white_threshold)
    if space == "lab":
        values = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2Lab).astype(np.float64)
    else:
        values = stain_concentrations(rgb, 255.0, dtype=np.float64)
    return values[mask].mean(axis=0), values[mask].std(axis=0)


@pytest.mark.parametrize("space", SPACES)
def test_tissue_statistics_equal_the_definition(hgsc, space):
    rgb = with_glass(hgsc[300:556, 300:556])
    mean, std, fraction = tissue_statistics(rgb, space)
    expected_mean, expected_std = definition(rgb, space)
    tolerance = 1e-3 if space == "lab" else 1e-5
    np.testing.assert_allclose(mean, expected_mean, atol=tolerance)
    np.testing.assert_allclose(std, expected_std, atol=tolerance)
    assert fraction == pytest.approx(tissue_mask(rgb).mean())


def test_the_transfer_tissue_mask_is_tissue_mask(hgsc):
    rgb = with_glass(hgsc[:200, :200])
    for threshold in (150, 200, 230.5):
        transfer = StainStatisticsTransfer("lab", white_threshold=threshold)
        _, grey = transfer._interleaved(planes(rgb), clip=True)
        np.testing.assert_array_equal(transfer.tissue(grey), tissue_mask(rgb, threshold))
        # The same test on float data in [0, 1] (threshold scaled by max_value / 255).
        scaled = StainStatisticsTransfer("lab", max_value=1.0, white_threshold=threshold)
        _, grey = scaled._interleaved(planes(rgb) / 255, clip=True)
        assert (scaled.tissue(grey) != tissue_mask(rgb, threshold)).mean() < 1e-3  # float rounding at the edge


def test_statistics_of_bgr_samples_equal_those_of_rgb(hgsc):
    rgb = hgsc[:128, :128]
    for space in SPACES:
        rgb_stats = StainStatisticsTransfer(space).statistics(planes(rgb))
        bgr_stats = StainStatisticsTransfer(space, channel_order="BGR").statistics(planes(rgb)[::-1].copy())
        np.testing.assert_allclose(bgr_stats[0], rgb_stats[0], atol=1e-4)
        np.testing.assert_allclose(bgr_stats[1], rgb_stats[1], atol=1e-4)


@pytest.mark.parametrize("space", SPACES)
def test_transfer_moves_tissue_statistics_to_the_target(hgsc, space):
    sample = planes(with_glass(hgsc[500:756, 500:756]))
    transfer = StainStatisticsTransfer(space)
    _, grey = transfer._interleaved(sample, clip=True)
    tissue = transfer.tissue(grey).copy()
    mean, std, _ = transfer.statistics(sample)
    # Shifts and scalings of the size the fitted spreads hold (a few sds of the per-image statistics).
    shift = np.array([4.0, -3.0, 2.5]) if space == "lab" else np.array([0.08, -0.05, 0.04])
    for target_mean, target_std in ((mean + shift, std * [1.2, 0.8, 1.1]), (mean - shift, std * [0.85, 1.25, 0.9])):
        out = np.empty_like(sample)
        assert transfer(sample, out, target_mean, target_std)
        got_mean, got_std, _ = transfer.statistics(out, tissue)  # on the sample's own tissue
        tolerance = 0.35 if space == "lab" else 0.01  # out-of-gamut colours are clipped to [0, 255]
        np.testing.assert_allclose(got_mean, target_mean, atol=tolerance)
        np.testing.assert_allclose(got_std, target_std, atol=tolerance)


@pytest.mark.parametrize("space", SPACES)
def test_glass_stays_glass_and_the_ramp_blends(hgsc, space):
    rgb = with_glass(hgsc[200:456, 200:456], rows=100)
    sample = planes(rgb)
    transfer = StainStatisticsTransfer(space)
    mean, std, _ = transfer.statistics(sample)
    out = np.empty_like(sample)
    assert transfer(sample, out, mean * 1.1 + 1.0, std * 1.3)
    grey = rgb.astype(np.float64).mean(axis=-1)
    glass = grey > 200 + BLEND_RAMP
    assert glass.sum() > 20000
    np.testing.assert_array_equal(out[:, glass], sample[:, glass])  # bit-identical
    assert out.min() >= 0 and out.max() <= 255
    tissue = tissue_mask(rgb)
    assert np.abs(out[:, tissue] - sample[:, tissue]).mean() > 2  # the tissue did change
    # In the ramp, the change is a fraction of the full change.
    ramp = (grey > 205) & (grey < 215)
    if ramp.any():
        full = np.empty_like(sample)
        no_ramp = StainStatisticsTransfer(space, white_threshold=255)  # every pixel is tissue: no blending
        no_ramp._scale_and_shift = lambda *_: transfer._scale_and_shift(mean, std, mean * 1.1 + 1.0, std * 1.3)
        no_ramp(sample, full, mean, std)
        change, full_change = np.abs(out - sample)[:, ramp], np.abs(full - sample)[:, ramp]
        assert np.all(change <= full_change + 1e-3)


def test_transfer_in_place_equals_out_of_place(hgsc):
    sample = planes(with_glass(hgsc[:128, 300:428]))
    for space in SPACES:
        transfer = StainStatisticsTransfer(space)
        mean, std, _ = transfer.statistics(sample)
        out = np.empty_like(sample)
        transfer(sample, out, mean + 0.5, std * 1.2)
        in_place = sample.copy()
        transfer(in_place, in_place, mean + 0.5, std * 1.2)
        np.testing.assert_array_equal(in_place, out)


def test_low_tissue_samples_are_left_unchanged():
    sample = np.full((3, 64, 64), 240.0, np.float32)
    sample[:, :4, :4] = 120.0  # 16 of 4096 pixels: 0.4 % tissue
    for space in SPACES:
        out = np.zeros_like(sample)
        assert not StainStatisticsTransfer(space)(sample, out, np.ones(3), np.ones(3))
        np.testing.assert_array_equal(out, sample)
        assert StainStatisticsTransfer(space, min_tissue=0.0)(sample, out, np.ones(3), np.ones(3))
    mean, std, fraction = StainStatisticsTransfer("lab").statistics(np.full((3, 8, 8), 255.0, np.float32))
    assert fraction == 0 and np.isnan(mean).all() and np.isnan(std).all()


def test_flat_channels_are_shifted_not_rescaled():
    sample = np.full((3, 32, 32), 150.0, np.float32)  # one colour: every std is 0
    transfer = StainStatisticsTransfer("hed")
    mean, std, _ = transfer.statistics(sample)
    out = np.empty_like(sample)
    transfer(sample, out, mean + 0.05, np.ones(3))
    assert np.isfinite(out).all() and np.ptp(out, axis=(1, 2)).max() < 1e-3  # still one colour
    got, _, _ = transfer.statistics(out)
    np.testing.assert_allclose(got, mean + 0.05, atol=1e-3)


@pytest.mark.parametrize("space", SPACES)
def test_fit_is_the_mean_and_spread_of_the_image_statistics(tiles, space):
    stats = fit_stain_statistics(tiles, space=space, spread=0.5)
    per_image = [tissue_statistics(tile, space) for tile in tiles]
    means = np.array([m for m, _, _ in per_image])
    stds = np.array([s for _, s, _ in per_image])
    np.testing.assert_allclose(np.array(stats["mean"]), np.stack([means.mean(0), means.std(0, ddof=1)], 1))
    np.testing.assert_allclose(np.array(stats["std"]), np.stack([stds.mean(0), stds.std(0, ddof=1)], 1))
    assert stats["space"] == space and stats["spread"] == 0.5
    assert check_stain_stats(stats) == stats
    # The param_str the CLI prints reads back to the same dict, up to its 4 significant digits.
    again = check_stain_stats(parse_param_str(format_param_str(stats)))
    np.testing.assert_allclose(np.array(again["mean"]), np.array(stats["mean"]), rtol=1e-3)


def test_fit_skips_blank_and_low_tissue_images_by_name(tiles):
    images = {f"tile{i}": tile for i, tile in enumerate(tiles[:3])}
    images["blank.png"] = np.full((64, 64, 3), 245, np.uint8)
    images["speck.png"] = np.full((64, 64, 3), 245, np.uint8)
    images["speck.png"][:5, :5] = 100  # 0.6 % tissue
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = fit_stain_statistics(images)
    messages = [str(w.message) for w in caught if issubclass(w.category, NoTissueWarning)]
    assert len(messages) == 2
    assert messages[0].startswith("blank.png: 0.0 % tissue") and messages[1].startswith("speck.png: 0.6 % tissue")
    assert stats == fit_stain_statistics(tiles[:3])
    with pytest.raises(ValueError, match="1 of 3 images have enough tissue"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NoTissueWarning)
        fit_stain_statistics([tiles[0], images["blank.png"], images["speck.png"]])


def test_fit_arguments_are_checked(tiles):
    with pytest.raises(ParamError, match="spread"):
        fit_stain_statistics(tiles, spread=-1)
    with pytest.raises(ParamError, match="space"):
        fit_stain_statistics(tiles, space="hsv")
    with pytest.raises(ValueError, match="sequence or a dict"):
        fit_stain_statistics(tiles[0])


VALID = {"space": "hed", "mean": [[0.5, 0.1], [0.4, 0.1], [0.6, 0.1]], "std": [[0.4, 0.1], [0.1, 0.05], [0.2, 0.03]]}


@pytest.mark.parametrize("change, key, message", [
    ({"mean": [[0.5, 0.1], [0.4, 0.1]]}, "stain_stats.mean", "expected 3 \\[mu, sd\\] pairs"),
    ({"std": [[0.4, 0.1], [0.0, 0.05], [0.2, 0.03]]}, "stain_stats.std[1][0]", "out of range"),
    ({"std": [[0.4, 0.1], [0.1, -0.05], [0.2, 0.03]]}, "stain_stats.std[1][1]", "out of range"),
    ({"mean": [[0.5, 0.1], [float("nan"), 0.1], [0.6, 0.1]]}, "stain_stats.mean[1][0]", "not finite"),
    ({"mean": [[0.5, 0.1], [0.4, 0.1], [0.6]]}, "stain_stats.mean[2]", "pairs"),
    ({"mean": [[0.5, 0.1], [0.4, 0.1], [25.0, 0.1]]}, "stain_stats.mean[2][0]", "out of range"),
    ({"spread": 11}, "stain_stats.spread", "allowed range: \\[0, 10\\]"),
    ({"min_tissue": 2}, "stain_stats.min_tissue", "out of range"),
    ({"space": "hsv"}, "stain_stats.space", "'lab', 'hed'"),
    ({"sprad": 1}, "stain_stats.sprad", "did you mean 'stain_stats.spread'"),
])
def test_invalid_stain_stats_name_the_key(change, key, message):
    with pytest.raises(ParamError, match=message) as info:
        check_stain_stats(dict(VALID, **change), "AugmentationLayer param_str")
    assert info.value.key == key and key in str(info.value) and "AugmentationLayer param_str" in str(info.value)


def test_missing_pairs_and_non_dicts_are_refused():
    with pytest.raises(ParamError, match="missing required key 'stain_stats.std'"):
        check_stain_stats({"mean": VALID["mean"]})
    with pytest.raises(ParamError, match="must be a dict"):
        check_stain_stats([1, 2])
    table = STAIN_STATS_SCHEMA.describe()
    assert "3 [mu, sd] pairs" in table and "(required)" in table and "[0, 10]" in table


def test_target_draws_follow_the_fitted_spread():
    stats = check_stain_stats(dict(VALID, spread=2.0))
    rng = np.random.default_rng(0)
    z_mean, z_std = rng.standard_normal((20000, 3)), rng.standard_normal((20000, 3))
    target_mean, target_std = draw_target_statistics(stats, z_mean, z_std)
    np.testing.assert_allclose(target_mean.mean(0), [0.5, 0.4, 0.6], atol=0.01)
    np.testing.assert_allclose(target_mean.std(0), [0.2, 0.2, 0.2], rtol=0.03)
    floor = STD_FLOOR * np.array([0.4, 0.1, 0.2])
    assert np.all(target_std >= floor - 1e-12) and np.any(np.isclose(target_std[:, 1], floor[1]))
    fixed_mean, fixed_std = draw_target_statistics(dict(stats, spread=0.0), z_mean, z_std)
    np.testing.assert_array_equal(fixed_mean, np.broadcast_to([0.5, 0.4, 0.6], fixed_mean.shape))
    np.testing.assert_array_equal(fixed_std, np.broadcast_to([0.4, 0.1, 0.2], fixed_std.shape))
