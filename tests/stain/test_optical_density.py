"""caffe_layers.stain.optical_density: the Beer-Lambert conversions."""
import numpy as np

from caffe_layers import stain


def test_od_round_trip():
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    od = stain.beer_lambert_od(rgb)
    assert od.min() >= 0 and np.isfinite(od).all()
    restored = stain.beer_lambert_rgb(od)
    np.testing.assert_array_equal(restored[rgb > 0], rgb[rgb > 0])
