"""A net shaped like the published Caffe U-Net: a Python data layer of the user's that gives
x / 255 - 0.5, taken as it is through retrofit -> train --weights -> segment with both engines."""
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

    class UnetData(caffe.Layer):
        """Real H&E crops and their nucleus masks, as the U-Net's layer gives them: x / 255 - 0.5."""
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
            top[0].data[...] = self.images[pick] / 255.0 - 0.5
            top[1].data[...] = self.masks[pick][:, None]
        def backward(self, top, propagate_down, bottom):
            pass
''')

BODY = '''
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
            convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: "up1" type: "Deconvolution" bottom: "pool1" top: "up1"
            convolution_param { num_output: 4 kernel_size: 2 stride: 2 weight_filler { type: "xavier" } } }
    layer { name: "concat" type: "Concat" bottom: "up1" bottom: "conv1" top: "concat" }
    layer { name: "score" type: "Convolution" bottom: "concat" top: "score"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "xavier" } } }
'''

TRAIN_VAL = textwrap.dedent('''
    name: "unet_python_data"
    layer { name: "data" type: "Python" top: "data" top: "label"
            python_param { module: "unet_data" layer: "UnetData" } }
''') + BODY + '''
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
'''

# The deploy net takes RGB 0-255 and normalises itself, so both engines run it with no card.
DEPLOY = textwrap.dedent('''
    name: "unet_python_data"
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
    layer { name: "normalise" type: "Power" bottom: "data" top: "data" power_param { scale: 0.00392156862745098 shift: -0.5 } }
''') + BODY + '''
    layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
'''


@pytest.fixture
def folder(tmp_path, monkeypatch):
    rgb, labels = load_or_skip(sample_data.load_hgsc_nest)
    corners = ((200, 200), (600, 800), (1000, 400), (1200, 1100))
    np.save(tmp_path / "he.npy", np.stack([rgb[y:y + 32, x:x + 32].transpose(2, 0, 1) for y, x in corners]))
    np.save(tmp_path / "masks.npy", np.stack([labels[y:y + 32, x:x + 32] > 0 for y, x in corners]))
    (tmp_path / "unet_data.py").write_text(DATA_MODULE)
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("unet_data", None)


def test_retrofit_train_and_segment_with_both_engines(caffe, folder):
    with pytest.raises(ValueError, match="already normalises"):
        rf.retrofit_files("train_val.prototxt", "refused.prototxt", '{"flip": True}')
    result = rf.retrofit_files("train_val.prototxt", "train_val_aug.prototxt",
                               '{"flip": True, "rotate": True, "color": True, "color_b_min": -10, "color_b_max": 10}',
                               input_normalisation=((127.5,), 1 / 255))
    assert any("measured on one batch" in line for line in result.lines)
    start = caffe.Net("deploy.prototxt", caffe.TEST)  # the "published" weights to fine-tune from
    start.save("start.caffemodel")
    (folder / "solver.prototxt").write_text('net: "train_val_aug.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                                            'momentum: 0.9\nmax_iter: 4\nsnapshot_prefix: "snap/unet"\n'
                                            'random_seed: 1\n')
    trained = training.train("solver.prototxt", weights="start.caffemodel", progress=False)
    assert trained.iterations == 4 and all(np.isfinite(loss) for _, loss in trained.losses)
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    tile = np.ascontiguousarray(rgb[500:564, 500:564].transpose(2, 0, 1)[None].astype(np.float32))
    maps = {engine: make_segmenter("deploy.prototxt", trained.caffemodel, engine, log=None, tile=64, batch=1)(tile)
            for engine in ("caffe", "opencv")}
    assert maps["caffe"].shape == (1, 2, 64, 64)
    assert np.abs(maps["caffe"] - maps["opencv"]).max() < 1e-4
