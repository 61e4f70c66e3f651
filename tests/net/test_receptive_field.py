"""The receptive-field radius read from a prototxt, checked against real Caffe forwards.

The tools tile with an overlap of twice this radius by default, so it must be an upper bound:
an input pixel changes no output farther away, and tiles overlapping by 2·radius give one
pass's result.
"""
import numpy as np
import pytest

from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
from caffe_layers.net.inference.receptive_field import net_receptive_radius, receptive_radius
from caffe_layers.net.prototxt import parse_net
from caffe_layers.net.training import templates as unet
from caffe_layers.sample_data import load_hgsc_nest
from caffe_layers.tiling import segment_tiled

from test_engines import build_template


@pytest.mark.parametrize("depth, upsample_kernel, expected", [(2, 2, 23), (2, 4, 26), (3, 2, 51)])
def test_template_radius(depth, upsample_kernel, expected):
    # 23 and 26: the radii measured for the depth-2 templates (caffe_layers.tiling's docstring).
    param = parse_net(unet.net_to_text(unet.unet_deploy(centring="patchmean", depth=depth,
                                                        upsample_kernel=upsample_kernel)))
    assert receptive_radius(param, "prob") == expected


def test_layers_without_a_finite_field_give_none():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 2 kernel_size: 5 pad: 2 dilation: 2 } }
    layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 2 } }
    """
    param = parse_net(text)
    # Dilation 2: the kernel spans 9 pixels, 2 of them before the output pixel (pad 2), 6 after.
    assert receptive_radius(param, "conv") == 6
    assert receptive_radius(param, "fc") is None


@pytest.fixture(scope="module")
def meanfile_unet(caffe, tmp_path_factory):
    return build_template(caffe, tmp_path_factory.mktemp("unet"), "meanfile")


def test_an_input_pixel_changes_no_output_beyond_the_radius(meanfile_unet):
    deploy, weights = meanfile_unet
    radius = net_receptive_radius(deploy)
    assert radius == 23
    net = CaffeSegmenter(deploy, weights)
    rgb, _ = load_hgsc_nest()
    tile = rgb[:120, :120].transpose(2, 0, 1)[None].astype(np.float32)
    changed = tile.copy()
    changed[0, :, 60, 60] = 255 - changed[0, :, 60, 60]
    difference = np.abs(net(changed)[0, 1] - net(tile)[0, 1])
    rows, cols = np.nonzero(difference > 1e-6)
    reach = max(np.abs(rows - 60).max(), np.abs(cols - 60).max())
    assert 0 < reach <= radius


def test_tiles_overlapping_by_twice_the_radius_equal_one_pass(meanfile_unet):
    deploy, weights = meanfile_unet
    overlap = 2 * net_receptive_radius(deploy)
    net = CaffeSegmenter(deploy, weights)
    rgb, _ = load_hgsc_nest()
    image = np.ascontiguousarray(rgb[100:300, 200:400])
    one_pass = net(image.transpose(2, 0, 1)[None].astype(np.float32))[0, 1]
    tiled = segment_tiled(net, image, tile=96, overlap=overlap, multiple=4, batch_size=3, pad_batches=True)
    np.testing.assert_allclose(tiled, one_pass, atol=1e-5, rtol=0)
