"""caffe_layers.stain.tissue: the tissue mask."""
import numpy as np
import pytest

from caffe_layers import stain

from he_images import white


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
