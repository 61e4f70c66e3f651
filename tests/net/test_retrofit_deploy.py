"""retrofit's deploy net: an old augmentation layer leaves it, and an empty deploy file is refused."""
import textwrap

import pytest

from caffe_layers.cli import retrofit as retrofit_cli
from caffe_layers.net import prototxt

TRAIN = textwrap.dedent('''
    layer { name: "train-data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
            data_param { source: "train_db" batch_size: 4 backend: LMDB } }
    layer { name: "val-data" type: "Data" top: "data" top: "label" include { phase: TEST }
            data_param { source: "val_db" batch_size: 4 backend: LMDB } }
    layer { name: "aug" type: "Python" bottom: "data" top: "augmented"
            python_param { module: "digits_python_layers" layer: "AugmentationLayer"
                           param_str: "{'rotate': True, 'flip': True}" } }
    layer { name: "conv" type: "Convolution" bottom: "augmented" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" }
''')

# DIGITS writes its deploy net from the same all-in-one net: the augmentation layer stays in it.
DEPLOY = textwrap.dedent('''
    input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
    layer { name: "aug" type: "Python" bottom: "data" top: "augmented"
            python_param { module: "digits_python_layers" layer: "AugmentationLayer"
                           param_str: "{'rotate': True, 'flip': True}" } }
    layer { name: "conv" type: "Convolution" bottom: "augmented" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
    layer { name: "prob" type: "Softmax" bottom: "pool" top: "prob" }
''')


def run(tmp_path, deploy_text, capsys):
    (tmp_path / "train_val.prototxt").write_text(TRAIN)
    (tmp_path / "deploy.prototxt").write_text(deploy_text)
    code = retrofit_cli.main([str(tmp_path / "train_val.prototxt"), "--out", str(tmp_path / "out.prototxt"),
                              "--deploy", str(tmp_path / "deploy.prototxt"),
                              "--deploy-out", str(tmp_path / "deploy_out.prototxt")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_replaced_augmentation_layer_leaves_the_deploy_net_too(tmp_path, capsys):
    code, out, err = run(tmp_path, DEPLOY, capsys)
    assert code == 0, err
    deploy = prototxt.read_net(tmp_path / "deploy_out.prototxt")[0]
    assert [layer.type for layer in deploy.layer] == ["Input", "Convolution", "Pooling", "Softmax"]
    assert list(deploy.layer[1].bottom) == ["data"]  # the consumers read the augmentation's bottom again
    assert "deploy net: removed layer 'aug'" in out and "deploy net: unchanged" not in out


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", 'name: "empty"\n'])
def test_an_empty_deploy_net_is_refused(tmp_path, capsys, text):
    code, out, err = run(tmp_path, text, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "deploy.prototxt" in lines[0] and "no layers" in lines[0], lines
    assert not (tmp_path / "deploy_out.prototxt").exists() and not (tmp_path / "out.prototxt").exists()
