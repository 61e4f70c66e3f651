"""Nets shaped like the V1 (and 2014 V0) patch classifiers of the digital-pathology tutorials: V1 prototxt
(LevelDB by default) on an LMDB from caffe-stain-lmdb, BGR, mean file with crop_size, a loss
without a top; taken as it is through retrofit -> train --weights -> segment (Caffe engine)."""
import textwrap

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.model_card import load_model_card
from caffe_layers.net import retrofit as rf
from caffe_layers.net.inference.engines import make_segmenter
from caffe_layers.net.meanfile import write_mean_binaryproto
from caffe_layers.net.training import loop as training
from caffe_layers.net.training.datum_lmdb import write_classification_lmdb

from test_sample_data import load_or_skip

LAYERS = '''
    layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
             convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: "xavier" } } }
    layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
    layers { name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc"
             inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
'''

TRAIN_VAL = textwrap.dedent('''
    name: "v1_patches"
    layers { name: "data" type: DATA top: "data" top: "label" include { phase: TRAIN }
             data_param { source: "train_lmdb" batch_size: 2 }
             transform_param { mean_file: "mean.binaryproto" crop_size: 16 mirror: true } }
''') + LAYERS + '''
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" }
'''

# The same classifier as a 2014 V0 net (layers { layer { ... } }), LevelDB being the only V0 backend.
V0_TRAIN_VAL = textwrap.dedent('''
    name: "v0_patches"
    layers { layer { name: "data" type: "data" source: "train_lmdb" meanfile: "mean.binaryproto" batchsize: 2
                     cropsize: 16 mirror: true } top: "data" top: "label" }
    layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 weight_filler { type: "xavier" } }
             bottom: "data" top: "conv1" }
    layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
    layers { layer { name: "fc" type: "innerproduct" num_output: 2 weight_filler { type: "xavier" } }
             bottom: "conv1" top: "fc" }
    layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" }
''')

DEPLOY = textwrap.dedent('''
    name: "v1_patches"
    input: "data"
    input_dim: 1 input_dim: 3 input_dim: 16 input_dim: 16
''') + LAYERS + '''
    layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
'''


@pytest.fixture(params=["v1", "v0"])
def folder(tmp_path, monkeypatch, request):
    rgb, labels = load_or_skip(sample_data.load_hgsc_nest)
    items, crops = [], []
    for index, (y, x) in enumerate(((200, 200), (600, 800), (1000, 400), (1200, 1100))):
        crop = np.ascontiguousarray(rgb[y:y + 20, x:x + 20])
        Image.fromarray(crop).save(tmp_path / f"p{index}.png")
        items.append((str(tmp_path / f"p{index}.png"), int(labels[y + 10, x + 10] > 0)))
        crops.append(crop[..., ::-1].transpose(2, 0, 1))  # BGR, as the database stores it
    write_classification_lmdb(items, tmp_path / "train_lmdb", class_names=["background", "nucleus"], shuffle=True)
    write_mean_binaryproto(tmp_path / "mean.binaryproto", np.mean(crops, axis=0).astype(np.float32))
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL if request.param == "v1" else V0_TRAIN_VAL)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_retrofit_train_and_segment(caffe, folder):
    result = rf.retrofit_files("train_val.prototxt", "train_val_aug.prototxt",
                               '{"flip": True, "rotate": True, "color": True, "hed": True}')
    text = "\n".join(result.lines)
    assert "backend LMDB" in text and "centre crop" in text and "channel_order: BGR" in text
    start = caffe.Net("deploy.prototxt", caffe.TEST)
    start.save("start.caffemodel")
    (folder / "solver.prototxt").write_text('net: "train_val_aug.prototxt"\nbase_lr: 0.001\nlr_policy: "fixed"\n'
                                            'max_iter: 3\nsnapshot_prefix: "snap/v1"\nrandom_seed: 1\n')
    trained = training.train("solver.prototxt", weights="start.caffemodel", progress=False)
    # the loss layer has no top: before, every logged loss was 0.0
    assert trained.iterations == 3 and any(loss > 0 for _, loss in trained.losses)
    card = load_model_card(patch_classifier=True, channel_order="BGR", mean_file="mean.binaryproto")
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    tile = np.ascontiguousarray(rgb[500:524, 500:524].transpose(2, 0, 1)[None].astype(np.float32))
    prob = make_segmenter("deploy.prototxt", trained.caffemodel, "caffe", card=card, log=None, tile=24, batch=1)(tile)
    assert prob.shape == (1, 2, 24, 24) and np.allclose(prob.sum(axis=1), 1, atol=1e-5)
