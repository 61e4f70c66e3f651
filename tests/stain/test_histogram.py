"""caffe_layers.stain.histogram: masked histogram matching, against scikit-image."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.exposure import match_histograms as _skimage_match_histograms

from caffe_layers import stain

from he_images import examples, hgsc, target, synthetic_he, white  # noqa: F401 - fixtures


def skimage_match_histograms(image, reference, channel_axis=-1):
    """scikit-image's per-channel histogram matching, the reference (channel_axis= since 0.19,
    multichannel=True before)."""
    try:
        return _skimage_match_histograms(image, reference, channel_axis=channel_axis)
    except TypeError:
        return _skimage_match_histograms(image, reference, multichannel=True)


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
