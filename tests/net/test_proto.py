"""Caffe's messages without pycaffe (caffe_layers.net.proto): the shipped descriptor is pycaffe's,
and the messages built from it read and write what pycaffe's do, in a process where ``import caffe``
fails."""
import json
import os
import subprocess
import sys
import zlib
from base64 import b64decode
from pathlib import Path

import numpy as np

from caffe_layers.net import caffe_descriptor

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK_CAFFE = REPO_ROOT / "tests" / "without_caffe"


def without_caffe(code, *args, cwd=None):
    """Run ``code`` in a Python whose ``import caffe`` fails (tests/without_caffe/sitecustomize.py)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BLOCK_CAFFE), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=cwd)


def test_shipped_descriptor_is_pycaffes(caffe):
    from caffe.proto import caffe_pb2

    shipped = zlib.decompress(b64decode("".join(caffe_descriptor.DESCRIPTOR_ZLIB_BASE64)))
    assert shipped == caffe_pb2.DESCRIPTOR.serialized_pb


def test_messages_without_pycaffe_read_and_write_what_pycaffe_does(caffe, tmp_path):
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    from caffe_layers.net import meanfile
    from caffe_layers.net.training import templates

    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(templates.net_to_text(templates.unet_deploy(centring="patchmean", depth=2, base_width=4,
                                                                    input_shape=(1, 3, 32, 32))))
    net = caffe.Net(str(prototxt), caffe.TEST)
    for index, blobs in enumerate(net.params.values()):
        blobs[0].data[...] = np.random.default_rng(index).normal(0, 0.1, blobs[0].data.shape)
    net.save(str(tmp_path / "weights.caffemodel"))
    meanfile.write_mean_binaryproto(tmp_path / "with.binaryproto",
                                    np.random.default_rng(5).uniform(0, 255, (3, 8, 6)).astype(np.float32))
    code = """
import json, sys
from pathlib import Path
import numpy as np
from caffe_layers.net import proto
from caffe_layers.net.checks import check_weights_fit_prototxt, read_weights
from caffe_layers.net.meanfile import read_mean_binaryproto, write_mean_binaryproto
from caffe_layers.net.prototxt import read_net_prototxt
folder = Path(sys.argv[1])
assert proto.caffe is None and proto.PYCAFFE_IMPORT_ERROR
param = read_net_prototxt(folder / "deploy.prototxt")
mean = read_mean_binaryproto(folder / "with.binaryproto")
write_mean_binaryproto(folder / "without.binaryproto", mean)
print(json.dumps(dict(text=str(param), copied=check_weights_fit_prototxt(param, folder / "weights.caffemodel"),
                      weights=read_weights(folder / "weights.caffemodel").SerializeToString().hex(),
                      test=proto.caffe_pb2.TEST)))
"""
    result = without_caffe(code, tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    expected = text_format.Parse(prototxt.read_text(), caffe_pb2.NetParameter())
    assert text_format.Parse(got["text"], caffe_pb2.NetParameter()) == expected
    assert got["copied"] == list(net.params)
    from_file = caffe_pb2.NetParameter.FromString((tmp_path / "weights.caffemodel").read_bytes())
    assert bytes.fromhex(got["weights"]) == from_file.SerializeToString()
    assert got["test"] == caffe.TEST
    assert (tmp_path / "without.binaryproto").read_bytes() == (tmp_path / "with.binaryproto").read_bytes()


def test_weights_of_another_net_are_refused_without_pycaffe(caffe, tmp_path):
    from caffe_layers.net.training import templates

    for name, width in (("deploy", 4), ("other", 8)):
        (tmp_path / f"{name}.prototxt").write_text(templates.net_to_text(templates.unet_deploy(
            centring="patchmean", depth=2, base_width=width, input_shape=(1, 3, 32, 32))))
    caffe.Net(str(tmp_path / "other.prototxt"), caffe.TEST).save(str(tmp_path / "other.caffemodel"))
    code = """
import sys
from pathlib import Path
from caffe_layers.net.checks import check_weights_fit_prototxt
from caffe_layers.net.prototxt import read_net_prototxt
folder = Path(sys.argv[1])
try:
    check_weights_fit_prototxt(read_net_prototxt(folder / "deploy.prototxt"), folder / "other.caffemodel")
except ValueError as error:
    print(error)
"""
    result = without_caffe(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "does not fit the net" in result.stdout and "file has shape (8, 3, 3, 3), net has (4, ?, 3, 3)" \
        in result.stdout


def test_what_needs_caffe_says_so_without_it(tmp_path):
    code = """
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
from caffe_layers.net.proto import PycaffeMissing
try:
    CaffeSegmenter("deploy.prototxt", "weights.caffemodel")
except PycaffeMissing as error:
    print(error)
"""
    result = without_caffe(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the Caffe engine needs pycaffe") and "scripts/install_caffe.sh" in result.stdout
