"""caffe_layers.net.prototxt: V0/V1 nets upgraded as Caffe's own upgrade_net_proto_text tool does."""
import os
import subprocess
from pathlib import Path

import pytest

from caffe_layers.net import prototxt

from test_retrofit import FIXTURES, LEGACY, TRAIN, load, named, order, upgraded


@pytest.fixture(scope="module")
def upgrade_tool(caffe):
    tool = Path(caffe.__file__).resolve().parents[2] / "build" / "tools" / "upgrade_net_proto_text.bin"
    if not os.access(tool, os.X_OK):
        message = f"Caffe's upgrade_net_proto_text tool is not at {tool}"
        if os.environ.get("CAFFE_STAIN_REQUIRE_CAFFE"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return tool


@pytest.mark.parametrize("name", LEGACY)
def test_upgrade_equals_caffes_own_tool(upgrade_tool, tmp_path, name):
    out = tmp_path / "upgraded.prototxt"
    subprocess.run([str(upgrade_tool), str(FIXTURES / f"{name}.prototxt"), str(out)], check=True, timeout=60,
                   capture_output=True, env=dict(os.environ, GLOG_minloglevel="2"))
    theirs = prototxt.parse_net(out.read_text())
    mine, notes = prototxt.read_net(FIXTURES / f"{name}.prototxt")
    assert mine == theirs, f"{name}:\n{prototxt.net_to_text(mine)}\n---- caffe's tool:\n{prototxt.net_to_text(theirs)}"
    assert notes


def test_v1_upgrade_details():
    net = upgraded("digits_v1_classifier")
    conv = named(net, "conv1")
    assert conv.type == "Convolution" and [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert named(net, "loss").type == "SoftmaxWithLoss" and not net.layers
    v0 = upgraded("v0_padding")
    assert "pad1" not in order(v0, TRAIN) and list(named(v0, "conv1").convolution_param.pad) == [2]
    assert named(v0, "conv1").bottom == ["data"]
    assert named(v0, "data").transform_param.crop_size == 28
    with pytest.raises(ValueError, match="both 'layer'"):
        net = load("digits_v1_classifier")
        net.layer.add(name="x", type="ReLU")
        prototxt.upgrade_net(net)
