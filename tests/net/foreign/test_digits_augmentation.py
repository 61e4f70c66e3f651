"""A net shaped like a DIGITS segmentation net with its own augmentation layer (in the train net
and in the deploy net DIGITS writes from it), two Data layers on LMDBs; taken as it is through
retrofit -> train --weights -> segment (Caffe engine, BGR card)."""
import textwrap

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.model_card import load_model_card
from caffe_layers.net import prototxt
from caffe_layers.net import retrofit as rf
from caffe_layers.net.inference.engines import make_segmenter
from caffe_layers.net.training import loop as training
from caffe_layers.net.training.datum_lmdb import write_segmentation_lmdbs

from test_sample_data import load_or_skip

AUGMENT = '''
    layer { name: "aug" type: "Python" bottom: "data" bottom: "label" top: "data_aug" top: "label_aug"
            include { phase: TRAIN }
            python_param { module: "digits_python_layers" layer: "AugmentationLayer"
                           param_str: "{'rotate': True, 'flip': True}" } }
'''

BODY = '''
    layer { name: "conv1" type: "Convolution" bottom: "%s" top: "conv1"
            convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "xavier" } } }
'''

TRAIN_VAL = textwrap.dedent('''
    name: "digits_seg"
    layer { name: "train-data" type: "Data" top: "data" include { phase: TRAIN }
            data_param { source: "db/images" batch_size: 2 backend: LMDB } }
    layer { name: "train-label" type: "Data" top: "label" include { phase: TRAIN }
            data_param { source: "db/labels" batch_size: 2 backend: LMDB } }
''') + AUGMENT + BODY % "data_aug" + '''
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label_aug" top: "loss" }
'''

# DIGITS' deploy net keeps the augmentation layer (with no phase rule, as all-in-one nets give it).
DEPLOY = textwrap.dedent('''
    name: "digits_seg"
    input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
    layer { name: "aug" type: "Python" bottom: "data" top: "data_aug"
            python_param { module: "digits_python_layers" layer: "AugmentationLayer"
                           param_str: "{'rotate': True, 'flip': True}" } }
''') + BODY % "data_aug" + '''
    layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
'''


@pytest.fixture
def folder(tmp_path, monkeypatch):
    rgb, labels = load_or_skip(sample_data.load_hgsc_nest)
    pairs = []
    for index, (y, x) in enumerate(((200, 200), (600, 800), (1000, 400), (1200, 1100))):
        Image.fromarray(np.ascontiguousarray(rgb[y:y + 32, x:x + 32])).save(tmp_path / f"i{index}.png")
        Image.fromarray(((labels[y:y + 32, x:x + 32] > 0) * 255).astype(np.uint8)).save(tmp_path / f"m{index}.png")
        pairs.append((str(tmp_path / f"i{index}.png"), str(tmp_path / f"m{index}.png")))
    write_segmentation_lmdbs(pairs, tmp_path / "db", channel_order="BGR")
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_retrofit_train_and_segment(caffe, folder):
    result = rf.retrofit_files("train_val.prototxt", "train_val_aug.prototxt", '{"color": True, "hed": True}',
                               deploy="deploy.prototxt", deploy_out="deploy_aug.prototxt")
    deploy = prototxt.read_net("deploy_aug.prototxt")[0]
    assert "Python" not in [layer.type for layer in deploy.layer]  # inference needs no augmentation module
    assert any("carried over 2 key(s)" in line for line in result.lines)
    caffe.Net("deploy_aug.prototxt", caffe.TEST).save("start.caffemodel")
    (folder / "solver.prototxt").write_text('net: "train_val_aug.prototxt"\nbase_lr: 0.001\nlr_policy: "fixed"\n'
                                            'max_iter: 3\nsnapshot_prefix: "snap/digits"\nrandom_seed: 1\n')
    trained = training.train("solver.prototxt", weights="start.caffemodel", progress=False)
    assert trained.iterations == 3 and all(np.isfinite(loss) for _, loss in trained.losses)
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    tile = np.ascontiguousarray(rgb[500:564, 500:564].transpose(2, 0, 1)[None].astype(np.float32))
    card = load_model_card(channel_order="BGR")
    prob = make_segmenter("deploy_aug.prototxt", trained.caffemodel, "caffe", card=card, log=None, tile=64,
                          batch=1)(tile)
    assert prob.shape == (1, 2, 64, 64) and np.allclose(prob.sum(axis=1), 1, atol=1e-5)
