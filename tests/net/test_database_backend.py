"""A V1 net (LevelDB by default) pointed at an LMDB that caffe-stain-lmdb wrote: the check says
what the folder is and how to fix it, and caffe-stain-retrofit sets the backend itself."""
import textwrap

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.net import prototxt
from caffe_layers.net.checks import check_net_param
from caffe_layers.net import retrofit as rf
from caffe_layers.net.training.datum_lmdb import write_classification_lmdb

from test_sample_data import load_or_skip

V1_NET = textwrap.dedent('''
    name: "V1Classifier"
    layers { name: "data" type: DATA top: "data" top: "label" include { phase: TRAIN }
             data_param { source: "%s" batch_size: 2 } }
    layers { name: "fc" type: INNER_PRODUCT bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" }
''')


@pytest.fixture
def v1_on_lmdb(tmp_path):
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    items = []
    for index, (y, x) in enumerate(((300, 300), (900, 600))):
        path = tmp_path / f"patch{index}.png"
        Image.fromarray(np.ascontiguousarray(rgb[y:y + 16, x:x + 16])).save(path)
        items.append((str(path), index))
    write_classification_lmdb(items, tmp_path / "train_lmdb", class_names=["a", "b"])
    net = tmp_path / "train_val.prototxt"
    net.write_text(V1_NET % (tmp_path / "train_lmdb"))
    return net


def test_the_check_names_the_lmdb_and_the_fix(caffe, v1_on_lmdb):
    upgraded = prototxt.upgrade_net(prototxt.parse_net(v1_on_lmdb.read_text()), "net")[0]
    with pytest.raises(ValueError, match=r"as a LevelDB database, but it is an LMDB .*backend: LMDB"):
        check_net_param(upgraded, str(v1_on_lmdb), caffe.TRAIN)


def test_retrofit_sets_the_backend_it_can_see(caffe, v1_on_lmdb, tmp_path):
    result = rf.retrofit_files(v1_on_lmdb, tmp_path / "out.prototxt", '{"flip": True}')
    (data,) = [layer for layer in result.net.layer if layer.type == "Data"]
    assert data.data_param.backend == caffe.proto.caffe_pb2.DataParameter.LMDB
    assert any("backend LMDB" in line and "by default" in line for line in result.lines)
    check_net_param(result.net, "out.prototxt", caffe.TRAIN)  # nothing left to refuse
