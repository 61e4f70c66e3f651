"""AugmentationLayer with stain_stats and p in a real Caffe net (pycaffe)."""
import json

import numpy as np
import pytest

from caffe_layers import sample_data
from caffe_layers.param_str import ParamError
from caffe_layers.stain.statistics import fit_stain_statistics
from caffe_layers.transforms import BatchAugmenter

from test_augmentation_layer import augment_layer, make_net, run
from test_sample_data import load_or_skip

N, H, W = 4, 48, 48


@pytest.fixture(scope="module")
def he_batch():
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    tiles = [rgb[y:y + H, x:x + W] for y, x in ((0, 0), (500, 500), (900, 1300), (1400, 200))]
    images = np.stack([np.moveaxis(tile, -1, 0) for tile in tiles]).astype(np.float32)
    labels = (images[:, :1] < 110).astype(np.float32)
    stats = fit_stain_statistics([rgb[y:y + 300, x:x + 300] for y in (0, 600, 1200) for x in (0, 600, 1200)],
                                 space="hed")
    return images, labels, stats


def test_stain_stats_through_caffe_equals_the_core(caffe, tmp_path, he_batch):
    images, labels, stats = he_batch
    params = {"rotate": True, "flip": True, "stain_stats": stats, "p": 0.75, "seed": 7}
    net = make_net(caffe, tmp_path, json.dumps(params), image_shape=(N, 3, H, W), label_shape=(N, 1, H, W))
    assert augment_layer(net).params["stain_stats"] == stats
    out, out_labels = run(net, images, labels)
    core = BatchAugmenter(**params)
    expected, expected_labels = core(images, labels)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out_labels, expected_labels)
    # The label got the geometry alone; the images their colours changed where p let them.
    geometry, _ = BatchAugmenter(rotate=True, flip=True, seed=7)(images, labels)
    draws = core.last_draws
    assert draws.augmented.any()
    for i in range(N):
        assert np.array_equal(out[i], geometry[i]) != bool(draws.stats_applied[i])


def test_p_zero_through_caffe_is_the_identity(caffe, tmp_path, he_batch):
    images, labels, stats = he_batch
    net = make_net(caffe, tmp_path, json.dumps({"stain_stats": stats, "color": True, "hed": True, "p": 0.0}),
                   image_shape=(N, 3, H, W), label_shape=(N, 1, H, W))
    out, out_labels = run(net, images, labels)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_labels, labels)


def test_bad_stain_stats_fail_at_setup_naming_the_key(caffe, tmp_path, he_batch):
    _, _, stats = he_batch
    bad = dict(stats, mean=[list(pair) for pair in stats["mean"][:2]])
    with pytest.raises(ParamError, match="'stain_stats.mean' in AugmentationLayer param_str"):
        make_net(caffe, tmp_path, json.dumps({"stain_stats": bad}), image_shape=(N, 3, H, W),
                 label_shape=(N, 1, H, W))
    with pytest.raises(ValueError, match="3-channel"):
        make_net(caffe, tmp_path, json.dumps({"stain_stats": stats}), image_shape=(N, 1, H, W),
                 label_shape=(N, 1, H, W))
