"""Inference geometry for nets shaped like published ones: a U-Net deep enough to need its card's
size_multiple, and a patch classifier whose windows must not all be held in memory at once."""
import textwrap
import tracemalloc

import numpy as np
import pytest

from caffe_layers import sample_data
from caffe_layers.model_card import load_model_card
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
from caffe_layers.net.inference.engines import make_segmenter

from test_sample_data import load_or_skip

# Six poolings and a skip connection: only inputs whose sides are multiples of 64 line up at the Concat.
DEEP_UNET = textwrap.dedent('''
    name: "deep_unet"
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 64 dim: 64 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
    ''' + "".join(f'''layer {{ name: "pool{i}" type: "Pooling" bottom: "{'conv' if i == 1 else f'pool{i - 1}'}" top: "pool{i}"
            pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
    ''' for i in range(1, 7)) + '''
    layer { name: "up" type: "Deconvolution" bottom: "pool6" top: "up"
            convolution_param { num_output: 2 kernel_size: 64 stride: 64 bias_term: false } }
    layer { name: "skip" type: "Concat" bottom: "up" bottom: "conv" top: "skip" }
    layer { name: "score" type: "Convolution" bottom: "skip" top: "score" convolution_param { num_output: 2 kernel_size: 1 } }
    layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
''')

PATCH_CLASSIFIER = textwrap.dedent('''
    name: "patch33"
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 33 dim: 33 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 5 stride: 4 } }
    layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 2 } }
    layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
''')


def saved(caffe, tmp_path, name, text, seed=0):
    deploy = tmp_path / f"{name}.prototxt"
    deploy.write_text(text)
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.02, blob.data.shape)
    weights = tmp_path / f"{name}.caffemodel"
    net.save(str(weights))
    return deploy, weights


@pytest.fixture(scope="module")
def he_tile():
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    return np.ascontiguousarray(rgb[400:528, 600:728].transpose(2, 0, 1)[None].astype(np.float32))


@pytest.mark.parametrize("engine", ["caffe", "auto"])
def test_a_deep_unet_is_probed_at_its_cards_size_multiple(caffe, tmp_path, he_tile, engine):
    deploy, weights = saved(caffe, tmp_path, "unet", DEEP_UNET)
    card = load_model_card(size_multiple=64)  # the project's convention otherwise: RGB, no mean, prob
    segment = make_segmenter(deploy, weights, engine, card=card, multiple=64, tile=128, batch=1, log=None)
    prob = segment(he_tile)
    assert prob.shape == (1, 2, 128, 128) and np.allclose(prob.sum(axis=1), 1, atol=1e-5)


def test_patch_classifier_windows_are_batched_not_all_held(caffe, tmp_path, he_tile):
    deploy, weights = saved(caffe, tmp_path, "patch", PATCH_CLASSIFIER)
    segmenter = CaffeSegmenter(deploy, weights, load_model_card(patch_classifier=True))
    tile = he_tile[:, :, :96, :96]
    all_windows = 96 * 96 * 3 * 33 * 33 * 4  # bytes, as float32
    tracemalloc.start()
    try:
        prob = segmenter(tile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert prob.shape == (1, 2, 96, 96)
    assert peak < all_windows / 4, (peak, all_windows)
