"""caffe_layers.stain.normalizers: Reinhard, Macenko and the others on real and degenerate H&E."""
import numpy as np
import pytest

from caffe_layers import stain

from he_images import examples, hgsc, target, synthetic_he, white  # noqa: F401 - fixtures


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
