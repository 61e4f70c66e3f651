"""Tests for caffe_layers.stain and the caffe_layers.stain_cli console scripts."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.exposure import match_histograms as _skimage_match_histograms

from caffe_layers import datasets, image_io, stain
from caffe_layers.cli import estimate as estimate_cli
from caffe_layers.cli import normalize as normalize_cli
from caffe_layers.params import format_param_str

from test_datasets import load_or_skip


def skimage_match_histograms(image, reference, channel_axis=-1):
    """scikit-image's per-channel histogram matching, the reference (channel_axis= since 0.19,
    multichannel=True before)."""
    try:
        return _skimage_match_histograms(image, reference, channel_axis=channel_axis)
    except TypeError:
        return _skimage_match_histograms(image, reference, multichannel=True)


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def hgsc():
    return load_or_skip(datasets.load_hgsc_nest)[0]


@pytest.fixture(scope="module")
def examples():
    return load_or_skip(datasets.load_stained_examples)


@pytest.fixture(scope="module")
def target(examples):
    return examples["tiatoolbox_target"]


def synthetic_he(seed, shape=(120, 150), white_fraction=0.3, tint=(1.0, 1.0, 1.0)):
    """Random H&E-like image with a white background region."""
    rng = np.random.default_rng(seed)
    base = np.array([180.0, 110.0, 170.0]) * np.array(tint)
    image = rng.normal(base, 30.0, size=(*shape, 3))
    background = rng.random(shape) < white_fraction
    image[background] = rng.normal(240.0, 5.0, size=(background.sum(), 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def white(shape=(40, 50)):
    return np.full((*shape, 3), 255, np.uint8)


# --------------------------------------------------------------------------- #
# tissue_mask
# --------------------------------------------------------------------------- #
def test_tissue_mask_threshold_is_inclusive_mean_of_rgb():
    image = np.array([[[200, 200, 200], [201, 200, 200], [255, 255, 100], [0, 255, 255]]], np.uint8)
    assert stain.tissue_mask(image).tolist() == [[True, False, False, True]]
    assert stain.tissue_mask(image.astype(float) / 255, white_threshold=200 / 255).tolist() == [
        [True, False, False, True]
    ]


def test_tissue_mask_thresholds_of_any_size_and_nan():
    from caffe_layers.stain.tissue import background_planes
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [120, 130, 140]]], np.uint8)
    for huge in (1e308, float("inf"), 255):
        assert stain.tissue_mask(rgb, huge).all()
        assert not background_planes(rgb, huge if np.isfinite(huge) else 1e308).any()
    for low in (-1e308, float("-inf"), -0.5):
        assert not stain.tissue_mask(rgb, low).any()
    with pytest.raises(ValueError, match="white_threshold must be a number; got NaN"):
        stain.tissue_mask(rgb, float("nan"))


def test_tissue_mask_cleanup():
    image = white((30, 30))
    image[2, 2] = 0  # one-pixel speck
    image[10:20, 10:20] = 100  # tissue block with a hole
    image[14:16, 14:16] = 255
    cleaned = stain.tissue_mask(image, min_size=5, fill_holes=True)
    assert not cleaned[2, 2] and cleaned[10:20, 10:20].all() and cleaned.sum() == 100
    with pytest.raises(ValueError, match="min_size"):
        stain.tissue_mask(image, min_size=-1)


# --------------------------------------------------------------------------- #
# match_histograms
# --------------------------------------------------------------------------- #
def test_unmasked_agrees_with_skimage_on_real_he(hgsc, target):
    ours = stain.match_histograms(hgsc, target)
    reference = skimage_match_histograms(hgsc, target, channel_axis=-1)
    assert ours.dtype == np.uint8 and ours.shape == hgsc.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    height=st.integers(1, 23),
    width=st.integers(1, 23),
    levels=st.integers(1, 256),
)
def test_unmasked_agrees_with_skimage_synthetic(seed, height, width, levels):
    # Odd pixel counts, few grey levels and tiny images all go through the fast path.
    rng = np.random.default_rng(seed)
    image = rng.integers(0, levels, (height, width, 3)).astype(np.uint8)
    reference = rng.integers(0, 256, (width + 3, height + 1, 3)).astype(np.uint8)
    ours = stain.match_histograms(image, reference)
    theirs = skimage_match_histograms(image, reference, channel_axis=-1)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_masked_leaves_background_bit_identical_and_matches_tissue(hgsc, target):
    matched = stain.match_histograms(hgsc, target, ignore_white=True)
    image_tissue = stain.tissue_mask(hgsc)
    target_tissue = stain.tissue_mask(target)
    np.testing.assert_array_equal(matched[~image_tissue], hgsc[~image_tissue])
    for channel in range(3):
        ours = matched[..., channel][image_tissue].astype(float)
        wanted = target[..., channel][target_tissue].astype(float)
        assert abs(ours.mean() - wanted.mean()) < 1.0
        np.testing.assert_allclose(
            np.percentile(ours, [5, 25, 50, 75, 95]),
            np.percentile(wanted, [5, 25, 50, 75, 95]),
            atol=2,
        )


@pytest.mark.parametrize("white_fraction", [0.2, 0.8])  # both gather strategies
def test_explicit_masks_synthetic(white_fraction):
    image = synthetic_he(1, white_fraction=white_fraction, tint=(0.8, 1.1, 1.0))
    reference = synthetic_he(2, shape=(77, 91))
    rng = np.random.default_rng(3)
    mask = rng.random(image.shape[:2]) > white_fraction
    reference_mask = rng.random(reference.shape[:2]) > 0.5
    matched = stain.match_histograms(image, reference, mask=mask, reference_mask=reference_mask)
    np.testing.assert_array_equal(matched[~mask], image[~mask])
    # Tissue alone equals matching the gathered tissue pixels (as 1-row images).
    expected = stain.match_histograms(image[mask][None], reference[reference_mask][None])
    np.testing.assert_array_equal(matched[mask], expected[0])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    height=st.integers(1, 15),
    width=st.integers(1, 15),
    tissue_fraction=st.floats(0.05, 0.95),
)
def test_masked_equals_matching_gathered_pixels(seed, height, width, tissue_fraction):
    # Odd pixel counts and both gather strategies (tissue or background side).
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    reference = rng.integers(0, 256, (width + 2, height + 1, 3)).astype(np.uint8)
    mask = rng.random(image.shape[:2]) < tissue_fraction
    reference_mask = rng.random(reference.shape[:2]) < 0.7
    mask.flat[0] = reference_mask.flat[0] = True  # never empty
    matched = stain.match_histograms(image, reference, mask=mask, reference_mask=reference_mask)
    np.testing.assert_array_equal(matched[~mask], image[~mask])
    expected = stain.match_histograms(image[mask][None], reference[reference_mask][None])
    np.testing.assert_array_equal(matched[mask], expected[0])


def test_blank_image_or_reference_returned_unchanged_with_warning(hgsc):
    blank = white()
    with pytest.warns(stain.NoTissueWarning, match="image has no tissue"):
        result = stain.match_histograms(blank, hgsc, ignore_white=True)
    np.testing.assert_array_equal(result, blank)
    with pytest.warns(stain.NoTissueWarning, match="reference has no tissue"):
        result = stain.match_histograms(hgsc, blank, ignore_white=True)
    np.testing.assert_array_equal(result, hgsc)
    float_blank = np.ones((5, 5, 3))
    with pytest.warns(stain.NoTissueWarning):
        result = stain.match_histograms(float_blank, float_blank, ignore_white=True,
                                        white_threshold=0.8)
    assert not np.isnan(result).any()


def test_constant_images_do_not_make_nan():
    constant = np.full((10, 10, 3), 7, np.uint8)
    result = stain.match_histograms(constant, constant)
    np.testing.assert_array_equal(result, constant)
    result = stain.match_histograms(constant.astype(np.float32), synthetic_he(0).astype(np.float32))
    assert result.dtype == np.float32 and np.isfinite(result).all()


def test_uint8_no_wraparound():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:10] = 255
    reference = np.full((20, 20, 3), 255, np.uint8)
    assert (stain.match_histograms(image, reference) == 255).all()
    assert (stain.match_histograms(reference, image) <= 255).all()
    dark = np.zeros_like(reference)
    assert (stain.match_histograms(reference, dark) == 0).all()


def test_float_path_matches_skimage(hgsc, target):
    image = hgsc[::3, ::3].astype(np.float64) / 255
    reference = target[::3, ::3].astype(np.float64) / 255
    ours = stain.match_histograms(image, reference)
    theirs = skimage_match_histograms(image, reference, channel_axis=-1)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    masked = stain.match_histograms(image, reference, ignore_white=True, white_threshold=200 / 255)
    background = ~stain.tissue_mask(image, 200 / 255)
    np.testing.assert_array_equal(masked[background], image[background])
    assert stain.match_histograms(image.astype(np.float32), reference).dtype == np.float32


def test_nbins_quantises_outputs(hgsc, target):
    matched = stain.match_histograms(hgsc, target, nbins=16)
    levels = np.rint(np.linspace(0, 255, 16))
    for channel in range(3):
        assert np.isin(np.unique(matched[..., channel]), levels).all()
    exact = stain.match_histograms(hgsc, target)
    # Same distribution up to the bin width (255/15 = 17 grey levels).
    assert np.abs(matched.astype(float).mean((0, 1)) - exact.mean((0, 1))).max() < 17 / 2
    float_matched = stain.match_histograms(hgsc / 255.0, target / 255.0, nbins=16)
    assert np.isin(np.unique(float_matched), np.linspace(0, 1, 16)).all()
    with pytest.raises(ValueError, match="nbins"):
        stain.match_histograms(hgsc, target, nbins=1)


def test_match_histograms_bad_input():
    image = synthetic_he(0)
    with pytest.raises(ValueError, match="image must be an RGB image"):
        stain.match_histograms(image[..., 0], image)
    with pytest.raises(ValueError, match="reference must be an RGB image"):
        stain.match_histograms(image, np.zeros((5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="both be uint8 or both float"):
        stain.match_histograms(image, image / 255.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        stain.match_histograms(image, image, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="NaN"):
        stain.match_histograms(np.full((4, 4, 3), np.nan), np.ones((4, 4, 3)))


# --------------------------------------------------------------------------- #
# colour-shift estimates
# --------------------------------------------------------------------------- #
def test_channel_mean_ratios_equal_direct_numpy(hgsc, target):
    ratios = stain.channel_mean_ratios(hgsc, target)
    np.testing.assert_allclose(ratios, hgsc.mean((0, 1)) / target.mean((0, 1)))
    masked = stain.channel_mean_ratios(hgsc, target, ignore_white=True)
    image_tissue, target_tissue = stain.tissue_mask(hgsc), stain.tissue_mask(target)
    np.testing.assert_allclose(masked, hgsc[image_tissue].mean(0) / target[target_tissue].mean(0))


def test_channel_mean_ratios_errors():
    image = synthetic_he(0)
    zero_red = image.copy()
    zero_red[..., 0] = 0
    with pytest.raises(ValueError, match="reference has zero mean in channel 0"):
        stain.channel_mean_ratios(image, zero_red)
    with pytest.raises(ValueError, match="reference has no tissue"):
        stain.channel_mean_ratios(image, white(), ignore_white=True)
    with pytest.raises(ValueError, match="image has no tissue"):
        stain.channel_mean_ratios(image, image, mask=np.zeros(image.shape[:2], bool))


def test_suggest_color_params_covers_both_directions():
    train = {"a": synthetic_he(1), "b": synthetic_he(2, tint=(1.05, 1.0, 0.97))}
    test = [synthetic_he(3, tint=(0.8, 1.2, 1.0))]
    estimate = stain.suggest_color_params(train, test, margin=0.1)
    assert set(estimate.ratios) == {"test:0", "train:a", "train:b"}
    ratios = np.concatenate(list(estimate.ratios.values()))
    both = np.concatenate([ratios, 1 / ratios])
    params = estimate.params
    assert params["color"] is True
    assert params["color_a_min"] <= both.min() * 0.9 + 1e-12
    assert params["color_a_max"] >= both.max() * 1.1 - 1e-12
    assert params["color_a_max"] - both.max() * 1.1 < 0.011  # rounded, not inflated
    assert ast.literal_eval(estimate.param_str) == params
    # Ratio of the test image against the mean train statistics, computed directly.
    train_means = np.mean([img[stain.tissue_mask(img)].mean(0) for img in train.values()], axis=0)
    direct = test[0][stain.tissue_mask(test[0])].mean(0) / train_means
    np.testing.assert_allclose(estimate.ratios["test:0"], direct)


def test_suggest_color_params_offset_and_errors():
    estimate = stain.suggest_color_params([synthetic_he(1)], [synthetic_he(2, tint=(0.9, 1, 1))],
                                          include_offset=True)
    assert estimate.params["color_b_min"] == -estimate.params["color_b_max"] < 0
    with pytest.raises(ValueError, match="margin"):
        stain.suggest_color_params([synthetic_he(1)], [synthetic_he(2)], margin=-1)
    with pytest.raises(ValueError, match="test_images is empty"):
        stain.suggest_color_params([synthetic_he(1)], [])
    with pytest.raises(ValueError, match="train image '0' has no tissue"):
        stain.suggest_color_params([white()], [synthetic_he(2)])


def test_stain_concentration_means_is_tissue_mean_of_od_times_hed_from_rgb(hgsc):
    from skimage.color import hed_from_rgb

    image = hgsc[::4, ::4]
    tissue = stain.tissue_mask(image)
    od = -np.log((image[tissue].astype(np.float64) + 1) / 256)
    np.testing.assert_allclose(stain.stain_concentration_means(image), (od @ hed_from_rgb).mean(0),
                               rtol=1e-4)


def test_suggest_hed_params_recovers_a_known_stain_shift(hgsc):
    from caffe_layers.stain import shift_stains

    train, test = hgsc[:600:2, ::2], hgsc[900::2, ::2]
    shifted = shift_stains(test, (1.3, 0.8, 1.0))
    estimate = stain.suggest_hed_params({"train": train}, {"shifted": shifted}, margin=0.1)
    unshifted = stain.suggest_hed_params({"train": train}, {"same": test}, margin=0.1)
    # Concentrations are linear in the shift: the ratios move by alpha (up to uint8 rounding).
    np.testing.assert_allclose(estimate.ratios["test:shifted"][:2] / unshifted.ratios["test:same"][:2],
                               (1.3, 0.8), rtol=0.03)
    largest = np.abs(1 - estimate.ratios["test:shifted"][:2]).max()
    assert largest * 1.1 <= estimate.params["hed_alpha"] <= largest * 1.1 + 0.01
    assert estimate.params["hed"] is True
    from caffe_layers.params import AUGMENT_SCHEMA, load_params
    assert load_params(estimate.param_str, AUGMENT_SCHEMA, "test")["hed_alpha"] == estimate.params["hed_alpha"]


def test_suggest_hed_params_caps_alpha_and_rejects_blank_images(hgsc):
    from caffe_layers.stain import shift_stains

    train = hgsc[:600:4, ::4]
    estimate = stain.suggest_hed_params([train], [shift_stains(train, (3.0, 3.0, 1.0))])
    assert estimate.params["hed_alpha"] == 0.95  # a stain is never scaled down to nothing
    with pytest.raises(ValueError, match="no tissue"):
        stain.suggest_hed_params([white()], [train])
    # All pixels of a blank or grey image: no stain to take a ratio of (it gave ratios of 1e7).
    grey = np.full((32, 32, 3), 250, np.uint8)
    for blank in (white(), grey):
        with pytest.raises(ValueError, match=r"train image '0' has \(almost\) no (haematoxylin|eosin)"):
            stain.suggest_hed_params([blank], [train], ignore_white=False)
        with pytest.raises(ValueError, match=r"test image '0' has \(almost\) no (haematoxylin|eosin)"):
            stain.suggest_hed_params([train], [blank], ignore_white=False)


def test_format_param_str():
    text = format_param_str({"color": True, "color_a_min": 0.74, "color_a_max": 1.45})
    assert text == '{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}'
    assert format_param_str({"n": 3, "x": 1.0, "s": "a", "l": [1, 2.5]}) == (
        '{"n": 3, "x": 1.0, "s": "a", "l": [1, 2.5]}'
    )
    with pytest.raises(ValueError, match="non-finite"):
        format_param_str({"x": float("nan")})


# --------------------------------------------------------------------------- #
# normalisers
# --------------------------------------------------------------------------- #
def test_od_round_trip():
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    od = stain.beer_lambert_od(rgb)
    assert od.min() >= 0 and np.isfinite(od).all()
    restored = stain.beer_lambert_rgb(od)
    np.testing.assert_array_equal(restored[rgb > 0], rgb[rgb > 0])


def _tissue_lab_mean(rgb):
    from skimage.color import rgb2lab

    return rgb2lab(rgb[stain.tissue_mask(rgb)][:, None, :])[:, 0].mean(0)


@pytest.mark.parametrize("normalizer_class", [stain.ReinhardNormalizer, stain.MacenkoNormalizer])
def test_normalizers_reduce_colour_distance_on_real_he(normalizer_class, hgsc, target):
    image = hgsc[::2, ::2].copy()
    normalised = normalizer_class().fit(target).transform(image)
    assert normalised.dtype == np.uint8 and normalised.shape == image.shape
    before = np.linalg.norm(_tissue_lab_mean(image) - _tissue_lab_mean(target))
    after = np.linalg.norm(_tissue_lab_mean(normalised) - _tissue_lab_mean(target))
    assert after < 0.6 * before


@pytest.mark.parametrize("normalizer_class", [stain.ReinhardNormalizer, stain.MacenkoNormalizer])
def test_normalizers_safe_on_white(normalizer_class, target):
    normalizer = normalizer_class().fit(target[::4, ::4])
    with pytest.warns(stain.NoTissueWarning):
        result = normalizer.transform(white())
    np.testing.assert_array_equal(result, white())
    with pytest.raises(ValueError, match="template has"):
        normalizer_class().fit(white())
    with pytest.raises(RuntimeError, match="fit"):
        normalizer_class().transform(target)
    with pytest.raises(ValueError, match="uint8"):
        normalizer.transform(target / 255.0)


def _grey_gradient(shape=(50, 60)):
    """Exactly grey pixels of varying brightness: one OD direction, a*/b* only rgb2lab noise."""
    levels = np.linspace(30, 190, shape[0] * shape[1]).astype(np.uint8).reshape(shape)
    return np.repeat(levels[..., None], 3, axis=-1)


def _degenerate_templates():
    rng = np.random.default_rng(0)
    return {
        "single colour": np.full((50, 60, 3), (150, 80, 140), np.uint8),
        "grey": np.full((50, 60, 3), 120, np.uint8),
        "black": np.zeros((50, 60, 3), np.uint8),
        "grey gradient": _grey_gradient(),
        "noisy single colour": np.clip(rng.normal((150, 80, 140), 2, (50, 60, 3)), 0, 255)
        .astype(np.uint8),
    }


@pytest.mark.parametrize("kind", list(_degenerate_templates()))
def test_macenko_rejects_template_without_two_stains(kind, target):
    template = _degenerate_templates()[kind]
    with pytest.raises(ValueError, match="no distinct haematoxylin and eosin directions"):
        stain.MacenkoNormalizer().fit(template)
    normalizer = stain.MacenkoNormalizer().fit(target[::4, ::4])
    h, e = normalizer.stain_matrix_
    assert np.degrees(np.arccos(h @ e)) > normalizer.min_angle  # a real template still fits
    with pytest.raises(ValueError, match="min_angle"):
        stain.MacenkoNormalizer(min_angle=90)


@pytest.mark.parametrize("template, flat_channels", [
    (np.full((50, 60, 3), (150, 80, 140), np.uint8), r"L\*, a\*, b\*"),
    (_grey_gradient(), r"a\*, b\* \(std"),
])
def test_reinhard_rejects_flat_template(template, flat_channels):
    with pytest.raises(ValueError, match=f"template is flat in LAB channels {flat_channels}"):
        stain.ReinhardNormalizer().fit(template)


def test_reinhard_transform_of_flat_images_is_safe(target):
    from skimage.color import rgb2lab

    normalizer = stain.ReinhardNormalizer().fit(target[::4, ::4])
    flat = np.full((20, 30, 3), (150, 80, 140), np.uint8)
    result = normalizer.transform(flat)
    assert (result == result[0, 0]).all()  # still one colour: the template's mean
    np.testing.assert_allclose(rgb2lab(result[:1, :1])[0, 0], normalizer.template_means_, atol=1)
    # Grey pixels: a*/b* spread is only rgb2lab rounding noise (~1e-3); dividing by it
    # used to blow that noise up to the template's full colour spread.
    grey = _grey_gradient()
    lab = rgb2lab(normalizer.transform(grey)).reshape(-1, 3)
    assert np.isfinite(lab).all()
    assert lab[:, 1:].std(axis=0).max() < 0.5
    np.testing.assert_allclose(lab[:, 1:].mean(0), normalizer.template_means_[1:], atol=1)


def test_reinhard_ignore_white_keeps_background(target):
    image = synthetic_he(5, white_fraction=0.5)
    result = stain.ReinhardNormalizer(ignore_white=True).fit(target[::4, ::4]).transform(image)
    background = ~stain.tissue_mask(image)
    np.testing.assert_array_equal(result[background], image[background])


# --------------------------------------------------------------------------- #
# console scripts
# --------------------------------------------------------------------------- #
def _save(path, rgb):
    Image.fromarray(rgb).save(path)
    return str(path)


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


# --------------------------------------------------------------------------- #
# hostile input to the stain tools
# --------------------------------------------------------------------------- #
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
