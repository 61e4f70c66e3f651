"""A net shaped like FCN: a Python data layer in both phases, an output at a quarter of the input's
resolution, and test_interval 999999999 ("never"); taken as it is through retrofit -> train
--weights -> segment with Caffe and auto (OpenCV alone: an expected failure until it upsamples)."""
import sys
import textwrap

import numpy as np
import pytest

from caffe_layers import sample_data
from caffe_layers.net import retrofit as rf
from caffe_layers.net.inference.engines import make_segmenter
from caffe_layers.net.training import loop as training

from test_sample_data import load_or_skip

DATA_MODULE = textwrap.dedent('''
    import os
    import caffe
    import numpy as np

    class SegData(caffe.Layer):
        """Real H&E crops (RGB 0-255) and nucleus masks at a quarter of their size."""
        def setup(self, bottom, top):
            folder = os.path.dirname(os.path.abspath(__file__))
            self.images = np.load(os.path.join(folder, "he.npy")).astype(np.float32)
            self.masks = np.load(os.path.join(folder, "masks.npy")).astype(np.float32)
            self.i = 0
        def reshape(self, bottom, top):
            top[0].reshape(2, *self.images.shape[1:])
            top[1].reshape(2, 1, *self.images.shape[2:])
        def forward(self, bottom, top):
            pick = [self.i % len(self.images), (self.i + 1) % len(self.images)]
            self.i += 2
            top[0].data[...] = self.images[pick]
            top[1].data[...] = self.masks[pick][:, None]
        def backward(self, top, propagate_down, bottom):
            pass
''')

BODY = '''
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
            convolution_param { num_output: 4 kernel_size: 4 stride: 4 weight_filler { type: "gaussian" std: 0.01 } } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
'''

TRAIN_VAL = textwrap.dedent('''
    name: "fcn_like"
    layer { name: "data" type: "Python" top: "data" top: "label" python_param { module: "seg_data" layer: "SegData" } }
''') + BODY + '''
    layer { name: "up" type: "Deconvolution" bottom: "score" top: "upscore"
            convolution_param { num_output: 2 kernel_size: 4 stride: 4 group: 2 bias_term: false weight_filler { type: "constant" value: 1 } }
            param { lr_mult: 0 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "upscore" bottom: "label" top: "loss" loss_param { normalize: false } }
'''

DEPLOY = textwrap.dedent('''
    name: "fcn_like"
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
''') + BODY + '''
    layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
'''


@pytest.fixture
def folder(tmp_path, monkeypatch):
    rgb, labels = load_or_skip(sample_data.load_hgsc_nest)
    corners = ((200, 200), (600, 800), (1000, 400), (1200, 1100))
    np.save(tmp_path / "he.npy", np.stack([rgb[y:y + 32, x:x + 32].transpose(2, 0, 1) for y, x in corners]))
    np.save(tmp_path / "masks.npy", np.stack([labels[y:y + 32, x:x + 32] > 0 for y, x in corners]))
    (tmp_path / "seg_data.py").write_text(DATA_MODULE)
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("seg_data", None)


def train_fcn(caffe, folder):
    """retrofit, then 3 iterations from saved weights; the trained .caffemodel."""
    result = rf.retrofit_files("train_val.prototxt", "train_val_aug.prototxt", '{"flip": True, "rotate": True}')
    assert any("measured on one batch" in line for line in result.lines)
    caffe.Net("deploy.prototxt", caffe.TEST).save("start.caffemodel")
    (folder / "solver.prototxt").write_text(
        'train_net: "train_val_aug.prototxt"\ntest_net: "train_val_aug.prototxt"\ntest_iter: 1\n'
        'test_interval: 999999999\nbase_lr: 1e-6\nlr_policy: "fixed"\nmomentum: 0.99\nmax_iter: 3\n'
        'snapshot_prefix: "snap/fcn"\nrandom_seed: 1\n')
    trained = training.train("solver.prototxt", weights="start.caffemodel", progress=False)
    assert trained.iterations == 3 and trained.validation == []
    return trained.caffemodel


def he_tile():
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    return np.ascontiguousarray(rgb[500:564, 500:564].transpose(2, 0, 1)[None].astype(np.float32))


def test_retrofit_train_never_validate_and_segment(caffe, folder):
    weights = train_fcn(caffe, folder)
    caffe_map = make_segmenter("deploy.prototxt", weights, "caffe", log=None, tile=64, batch=1)(he_tile())
    auto = make_segmenter("deploy.prototxt", weights, "auto", log=None, tile=64, batch=1)
    assert caffe_map.shape == (1, 2, 64, 64)
    assert np.abs(auto(he_tile()) - caffe_map).max() < 1e-4  # whichever engine auto takes, it gives Caffe's map


@pytest.mark.xfail(strict=True, reason="the OpenCV engine returns a strided net's output unsampled (issue 25, "
                                       "defect 5: OpenCV must follow the card's geometry as the Caffe engine does)")
def test_opencv_gives_the_strided_map_at_full_size(caffe, folder):
    weights = train_fcn(caffe, folder)
    maps = {engine: make_segmenter("deploy.prototxt", weights, engine, log=None, tile=64, batch=1)(he_tile())
            for engine in ("caffe", "opencv")}
    assert maps["caffe"].shape == maps["opencv"].shape
    assert np.abs(maps["caffe"] - maps["opencv"]).max() < 1e-4
