"""caffe-stain-retrofit after a data path whose range the prototxt cannot tell: the TRAIN data
layers are run once, and data that is already normalised is never clipped silently."""
import sys
import textwrap

import numpy as np
import pytest

from caffe_layers import sample_data
from caffe_layers.cli import retrofit as retrofit_cli
from caffe_layers.net import retrofit as rf

from test_sample_data import load_or_skip

# A data layer of the user's: real H&E crops from a .npy file beside the net, normalised as
# FCN's VOC layer ("mean", BGR) or a U-Net's (x / 255 - 0.5) do it, or put in 0-1.
DATA_MODULE = textwrap.dedent('''
    import ast
    import os
    import caffe
    import numpy as np

    class NormalisingData(caffe.Layer):
        def setup(self, bottom, top):
            params = ast.literal_eval(self.param_str)
            self.how = params["how"]
            folder = os.path.dirname(os.path.abspath(__file__))
            self.images = np.load(os.path.join(folder, "he.npy")).astype(np.float32)  # N×3×H×W, RGB 0-255
            self.i = 0
        def reshape(self, bottom, top):
            top[0].reshape(2, *self.images.shape[1:])
            top[1].reshape(2, 1, *self.images.shape[2:])
        def forward(self, bottom, top):
            x = self.images[[self.i % len(self.images), (self.i + 1) % len(self.images)]]
            self.i += 2
            if self.how == "mean":
                x = x[:, ::-1] - np.array([104.0, 116.7, 122.7], np.float32)[None, :, None, None]
            elif self.how == "unet":
                x = x / 255.0 - 0.5
            elif self.how == "one":
                x = x / 255.0
            top[0].data[...] = x
            top[1].data[...] = (x[:, :1] > x[:, :1].mean())
        def backward(self, top, propagate_down, bottom):
            pass
''')

NET = textwrap.dedent('''
    layer { name: "data" type: "Python" top: "data" top: "label" include { phase: TRAIN }
            python_param { module: "norm_data" layer: "NormalisingData" param_str: "{'how': '%s'}" } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
            convolution_param { num_output: 2 kernel_size: 1 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
''')

FLIP = '{"flip": True, "color": False, "seed": 1}'


@pytest.fixture(scope="module")
def he_crops():
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    return np.stack([rgb[y:y + 24, x:x + 24].transpose(2, 0, 1) for y, x in ((100, 200), (700, 900), (1200, 300))])


@pytest.fixture
def net_folder(tmp_path, he_crops):
    np.save(tmp_path / "he.npy", he_crops)
    (tmp_path / "norm_data.py").write_text(DATA_MODULE)
    return tmp_path


def write(folder, how):
    path = folder / f"{how}.prototxt"
    path.write_text(NET % how)
    return path


def train_data_range(caffe, folder, net_path, forwards=3):
    """(min, max) of 'data' as the TRAIN net's convolution sees it, over a few batches."""
    sys.path.insert(0, str(folder))
    try:
        net = caffe.Net(str(net_path), caffe.TRAIN)
        batches = []
        for _ in range(forwards):
            net.forward()
            batches.append(net.blobs["data"].data.copy())
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("norm_data", None)
    return float(min(b.min() for b in batches)), float(max(b.max() for b in batches))


@pytest.mark.parametrize("how", ["mean", "unet"])
def test_normalised_python_data_is_refused_with_a_clear_line(caffe, net_folder, capsys, how):
    net = write(net_folder, how)
    code = retrofit_cli.main([str(net), "--param-str", FLIP, "--out", str(net_folder / "out.prototxt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "already normalises" in err[0] and "'data'" in err[0] and "--input-mean" in err[0]
    assert not (net_folder / "out.prototxt").exists()


@pytest.mark.parametrize("how, mean, scale", [("mean", "104,116.7,122.7", None), ("unet", "127.5", str(1 / 255))])
def test_a_stated_normalisation_is_undone_around_the_augmentation(caffe, net_folder, capsys, how, mean, scale):
    net = write(net_folder, how)
    out = net_folder / "out.prototxt"
    args = [str(net), "--param-str", FLIP, "--out", str(out), "--input-mean", mean]
    assert retrofit_cli.main(args + (["--input-scale", scale] if scale else [])) == 0
    printed = capsys.readouterr().out
    assert "undone before the AugmentationLayer" in printed and "measured on one batch" in printed
    assert "assumed to be in 0-255" not in printed
    before = train_data_range(caffe, net_folder, net)
    after = train_data_range(caffe, net_folder, out)
    # flips move pixels but change no value: the range is the data's own, not clipped to 0-255
    assert after[0] == pytest.approx(before[0], abs=1e-4) and after[1] == pytest.approx(before[1], abs=1e-4)
    assert after[0] < 0


def test_a_wrong_stated_normalisation_is_refused(caffe, net_folder, capsys):
    net = write(net_folder, "unet")
    code = retrofit_cli.main([str(net), "--param-str", FLIP, "--out", str(net_folder / "o.prototxt"),
                              "--input-mean", "104,116.7,122.7"])
    err = capsys.readouterr().err
    assert code == 2 and "covers less than a tenth" in err


def test_zero_one_python_data_becomes_input_range_one(caffe, net_folder):
    net = write(net_folder, "one")
    result = rf.retrofit_files(net, net_folder / "out.prototxt",
                               '{"flip": True, "color": True, "color_b_min": -10, "color_b_max": 10}')
    assert result.params["clip_max"] == pytest.approx(1.0) and result.params["color_b_max"] == pytest.approx(10 / 255)
    assert any("input range 1" in line for line in result.lines)
    with pytest.raises(ValueError, match="looks like 0-1 data"):
        rf.retrofit_files(net, net_folder / "out2.prototxt", FLIP, input_range=255)


def test_a_python_layer_with_a_mean_that_cannot_run_is_refused_unless_stated(caffe, tmp_path, capsys):
    """FCN's VOC layer without its dataset: the range cannot be measured, and its param_str names a mean."""
    net = tmp_path / "fcn.prototxt"
    net.write_text(NET.replace("norm_data", "absent_voc_layers").replace("{'how': '%s'}", "{'mean': (104.0, 116.7, 122.7)}"))
    out = tmp_path / "out.prototxt"
    assert retrofit_cli.main([str(net), "--param-str", FLIP, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "could not be measured" in err and "'mean'" in err and not out.exists()
    assert retrofit_cli.main([str(net), "--param-str", FLIP, "--out", str(out), "--input-range", "255"]) == 0
