"""Real and synthetic H&E for the stain tests and the stain commands' tests.

The fixtures are imported by the test modules that use them (``from he_images import hgsc``);
pytest registers an imported fixture as the module's own.
"""
import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data

from test_sample_data import load_or_skip


@pytest.fixture(scope="module")
def hgsc():
    return load_or_skip(sample_data.load_hgsc_nest)[0]


@pytest.fixture(scope="module")
def examples():
    return load_or_skip(sample_data.load_stained_examples)


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


def save_png(path, rgb):
    """Write ``rgb`` as a PNG at ``path``; return the path as a string."""
    Image.fromarray(rgb).save(path)
    return str(path)
