"""caffe_layers.net.retrofit and caffe-stain-retrofit on the kinds of prototxt found in the field.

The rewrite itself is checked on the messages (fast, no net built). Every ``caffe.Net`` is built
in a subprocess (a bad net is a LOG(FATAL) that would abort pytest): the retrofitted nets
construct and run in TRAIN and TEST, load the old net's weights layer by layer, and give the old
TEST-phase data. This Caffe may have no LMDB: nets with ``Data`` layers are then built with
their sources swapped for HDF5 files (written by Caffe's own HDF5Output layer, no h5py needed)
or Input layers, and the tests that read real LMDBs run only where Caffe can (they fail instead
of skipping when ``CAFFE_STAIN_REQUIRE_LMDB`` is set).
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from caffe_layers.cli import retrofit as retrofit_cli
from caffe_layers.net import prototxt
from caffe_layers.net import retrofit as rf
from caffe_layers.net.meanfile import write_mean_binaryproto
from caffe_layers.param_str import parse_param_str
from caffe_layers.params import ParamError

from test_templates import write_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).with_name("fixtures") / "retrofit"
PYTHON = sys.executable
PARAM = '{"rotate": True, "flip": True, "color": True, "color_a_min": 0.8, "color_a_max": 1.25}'
TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
LEGACY = ["v0_padding", "v1_image_data", "digits_v1_classifier", "digits_v1_classifier_deploy"]


# =========================================================================== helpers

def load(name):
    return prototxt.parse_net((FIXTURES / f"{name}.prototxt").read_text(), name)


def retro(name, param_str=PARAM, **kwargs):
    return rf.retrofit(load(name), param_str, where=name, **kwargs)


def upgraded(name):
    return prototxt.upgrade_net(load(name), name)[0]


def layers_in(net, phase):
    return [layer for layer in net.layer if prototxt.layer_in_phase(layer, phase)]


def named(net, name, phase=TRAIN):
    (layer,) = [layer for layer in layers_in(net, phase) if layer.name == name]
    return layer


def order(net, phase):
    return [layer.name for layer in layers_in(net, phase)]


def augmentation(net):
    (layer,) = [layer for layer in net.layer if layer.type == "Python"
                and layer.python_param.layer == "AugmentationLayer"]
    return layer


def write_net(path, net):
    Path(path).write_text(text_format.MessageToString(net))
    return str(path)


_PRELUDE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import caffe
    caffe.set_mode_cpu()
    PHASE = {"TRAIN": caffe.TRAIN, "TEST": caffe.TEST}

    def net(path, phase, weights=None):
        if weights is None:
            return caffe.Net(str(path), PHASE[phase])
        return caffe.Net(str(path), PHASE[phase], weights=str(weights))

    def params_of(n):
        return {name: [b.data.copy() for b in blobs] for name, blobs in n.params.items()}

    def write_h5(path, data, label):
        """data/label datasets, written by Caffe's own HDF5Output layer."""
        text = ('layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { %s } shape { %s } } }'
                'layer { name: "out" type: "HDF5Output" bottom: "data" bottom: "label" '
                'hdf5_output_param { file_name: "%s" } }') % (
            " ".join("dim: %d" % d for d in data.shape), " ".join("dim: %d" % d for d in label.shape), path)
        open(str(path) + ".prototxt", "w").write(text)
        writer = caffe.Net(str(path) + ".prototxt", caffe.TEST)
        writer.blobs["data"].data[...] = data
        writer.blobs["label"].data[...] = label
        writer.forward()
        del writer  # closes the file

    def done(**result):
        print("RESULT " + json.dumps(result))
''')


def run_caffe(tmp_path, code, pythonpath=(), timeout=180):
    """Run ``code`` (after the prelude) in a subprocess in ``tmp_path``; return its RESULT dict."""
    env = dict(os.environ, GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *map(str, pythonpath)]
                                          + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    result = subprocess.run([PYTHON, "-c", _PRELUDE + textwrap.dedent(code)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"caffe subprocess exited {result.returncode}:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def swap_sources(net, sources):
    """A copy of ``net`` whose Data/ImageData/HDF5Data layers read HDF5 list files.

    ``sources``: phase -> list file. The layers keep their tops (HDF5 datasets are named after
    them) and lose transform_param (Caffe's HDF5Data ignores it).
    """
    net = copy.deepcopy(net)
    for layer in net.layer:
        if layer.type not in ("Data", "ImageData", "HDF5Data"):
            continue
        phase = TRAIN if prototxt.layer_in_phase(layer, TRAIN) else TEST
        batch = (layer.data_param.batch_size or layer.image_data_param.batch_size
                 or layer.hdf5_data_param.batch_size)
        for field in ("data_param", "image_data_param", "transform_param", "hdf5_data_param"):
            layer.ClearField(field)
        layer.type = "HDF5Data"
        layer.hdf5_data_param.source = str(sources[phase])
        layer.hdf5_data_param.batch_size = batch
    return net


def h5_lists(tmp_path, image_shape, label_shape, seed=0):
    """Code that writes train.h5/val.h5 (+ list files) with random 0-255 images; and the list paths."""
    code = f'''
    rng = np.random.default_rng({seed})
    for name in ("train", "val"):
        data = rng.integers(0, 256, {tuple(image_shape)}).astype(np.float32)
        label = rng.integers(0, 2, {tuple(label_shape)}).astype(np.float32)
        write_h5(name + ".h5", data, label)
        open(name + "_h5.txt", "w").write(name + ".h5\\n")
    '''
    return code, {TRAIN: tmp_path / "train_h5.txt", TEST: tmp_path / "val_h5.txt"}


# =========================================================================== the rewrite, structurally

def test_v1_classifier_gets_augmentation_and_mean_after_it():
    result = retro("digits_v1_classifier")
    net = result.net
    assert not net.layers and net.layer
    for phase in (TRAIN, TEST):
        data = named(net, "data", phase)
        assert not data.transform_param.HasField("mean_file") and data.transform_param.crop_size == 28
    assert named(net, "data", TRAIN).transform_param.mirror
    assert order(net, TRAIN)[:3] == ["data", "augment", "data_mean"]
    assert order(net, TEST)[:2] == ["data", "data_mean"]
    augment = augmentation(net)
    assert list(augment.bottom) == list(augment.top) == ["data"]  # class label left alone
    assert [rule.phase for rule in augment.include] == [TRAIN]
    assert augment.python_param.module == "caffe_layers.augmentation"
    mean = named(net, "data_mean", TEST)
    assert mean.python_param.module == "caffe_layers.mean_subtract" and not mean.include
    # Written in the field's Python-literal form; the mean image is cropped at the centre, as Caffe's
    # crop_size does in TEST.
    assert parse_param_str(mean.python_param.param_str) == {"mean_file": "mean.binaryproto", "crop_centre": True}
    # learnable layers untouched
    old = upgraded("digits_v1_classifier")
    for layer in old.layer:
        if layer.type in ("Convolution", "InnerProduct"):
            assert named(net, layer.name) == layer
    text = "\n".join(result.lines)
    assert "class label: left alone" in text and "its centre crop on a cropped input" in text  # the crop note
    assert "removed mean_file" in text


def test_mirror_before_a_moved_mean_file_is_said():
    """Caffe subtracts the mean file, then mirrors; after the retrofit the mean comes after the
    mirror, so a mirrored TRAIN sample meets the mirrored mean: said, only where it happens."""
    text = (FIXTURES / "digits_v1_classifier.prototxt").read_text()
    no_crop = prototxt.parse_net(text.replace(" crop_size: 28", ""), "no_crop")
    lines = "\n".join(rf.retrofit(no_crop, PARAM, where="no_crop").lines)
    assert "mirrors after subtracting its mean file" in lines and "TEST is unchanged" in lines
    assert "mirrors after subtracting" not in "\n".join(retro("digits_v1_classifier").lines)  # crop: channel means
    no_mirror = prototxt.parse_net(text.replace(" crop_size: 28", "").replace(" mirror: true", ""), "no_mirror")
    assert "mirrors after subtracting" not in "\n".join(rf.retrofit(no_mirror, PARAM, where="no_mirror").lines)


def test_mean_values_and_scale_become_bias_and_power_layers():
    net = retro("v2_data_scale_meanvalue").net
    for phase in (TRAIN, TEST):
        transform = named(net, "data", phase).transform_param
        assert not transform.mean_value and not transform.HasField("scale")
    assert named(net, "data", TRAIN).transform_param.mirror
    assert not named(net, "data", TEST).HasField("transform_param")
    bias, power = named(net, "data_mean", TEST), named(net, "data_scale", TEST)
    assert bias.type == "Bias" and list(bias.blobs[0].data) == [-104, -117, -123]
    assert list(bias.blobs[0].shape.dim) == [3] and (bias.param[0].lr_mult, bias.param[0].decay_mult) == (0, 0)
    assert power.type == "Power" and power.power_param.scale == np.float32(0.00390625)
    assert order(net, TRAIN)[:4] == ["data", "augment", "data_mean", "data_scale"]


def test_single_mean_value_is_a_power_shift():
    net = load("v2_data_scale_meanvalue")
    for layer in net.layer[:2]:
        del layer.transform_param.mean_value[1:]
    mean = named(rf.retrofit(net, PARAM).net, "data_mean")
    assert mean.type == "Power" and mean.power_param.shift == -104


def test_segmentation_from_two_data_layers_augments_the_label_too():
    result = retro("lmdb_segmentation")
    augment = augmentation(result.net)
    assert list(augment.bottom) == list(augment.top) == ["data", "label"]
    assert order(result.net, TRAIN)[:4] == ["data", "label", "augment", "data_mean"]
    assert order(result.net, TEST)[:3] == ["data", "label", "data_mean"]
    assert "DIGITS segmentation" in "\n".join(result.lines)


@pytest.mark.parametrize("name, label_in", [("python_data_fcn", True), ("hdf5_segmentation", True),
                                            ("fcn_voc_layers", True)])
def test_label_maps_of_other_data_layers_are_augmented(name, label_in):
    result = retro(name)
    augment = augmentation(result.net)
    assert list(augment.bottom) == ["data", "label"] if label_in else ["data"]
    assert order(result.net, TRAIN)[:2] == ["data", "augment"]
    assert len(result.net.layer) == len(load(name).layer) + 1  # no transform to move


def test_fcn_voc_layers_notes_the_mean_inside_the_data_layer():
    text = "\n".join(retro("fcn_voc_layers").lines)
    assert "guessed" in text and "'mean' in its param_str" in text


def test_patchmean_replaces_the_mean_by_mvn_in_train_and_deploy():
    result = retro("v2_data_scale_meanvalue", centring="patchmean",
                   deploy=prototxt.parse_net(textwrap.dedent('''
                       layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
                       layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                               convolution_param { num_output: 6 pad: 1 kernel_size: 3 } }''')))
    net = result.net
    assert order(net, TEST)[:3] == ["data", "data_centre", "data_scale"]
    centre = named(net, "data_centre", TEST)
    assert centre.type == "MVN" and not centre.mvn_param.normalize_variance and not centre.include
    assert not any(layer.type == "Bias" or "mean_subtract" in layer.python_param.module for layer in net.layer)
    deploy = result.deploy
    assert order(deploy, TEST) == ["data", "data_centre", "data_scale", "conv1"]
    assert named(deploy, "data_scale", TEST).power_param.scale == np.float32(0.00390625)
    assert "do not subtract a mean" in "\n".join(result.lines)


def test_keep_leaves_the_deploy_net_as_it_was_but_upgraded():
    result = retro("digits_v1_classifier", deploy=load("digits_v1_classifier_deploy"))
    assert result.deploy == upgraded("digits_v1_classifier_deploy")
    assert order(result.deploy, TEST)[0] == "input"


ALL_TRAIN_VAL = ["digits_v1_classifier", "v2_data_scale_meanvalue", "lmdb_segmentation", "python_data_fcn",
                 "hdf5_segmentation", "digits_python_augment", "fcn_voc_layers", "v0_padding", "v1_image_data"]


@pytest.mark.parametrize("centring", ["keep", "patchmean"])
@pytest.mark.parametrize("name", ALL_TRAIN_VAL)
def test_every_fixture_retrofits_to_a_v2_net_that_reads_back(name, centring):
    result = retro(name, '{"rotate": True, "hed": True}', centring=centring)
    text = prototxt.net_to_text(result.net, ["header"])
    assert text.startswith("# header\n") and "layers {" not in text
    assert prototxt.parse_net(text) == result.net
    augment = augmentation(result.net)
    assert augment.bottom == augment.top and [rule.phase for rule in augment.include] == [TRAIN]
    assert sum(layer.type == "MVN" for layer in result.net.layer) == (centring == "patchmean")
    assert result.lines and all(isinstance(line, str) for line in result.lines)


def test_image_data_and_v0_data_layers():
    result = retro("v1_image_data", '{"hed": True}')
    net = result.net
    assert order(net, TEST)[:3] == ["data", "data_mean", "data_scale"]
    assert named(net, "data", TEST).transform_param.crop_size == 28
    assert parse_param_str(augmentation(net).python_param.param_str)["channel_order"] == "BGR"
    # V0 nets have no phases: one data layer for both, so one mean layer without include
    v0 = retro("v0_padding").net
    assert order(v0, TRAIN)[:3] == ["data", "augment", "data_mean"] and order(v0, TEST)[:2] == ["data", "data_mean"]
    assert not named(v0, "data_mean").include


def test_existing_digits_augmentation_is_replaced_and_its_param_str_carried_over():
    result = retro("digits_python_augment", '{"hed": True, "color_a_max": 1.4}')
    net = result.net
    assert "aug" not in order(net, TRAIN)
    augment = augmentation(net)
    params = parse_param_str(augment.python_param.param_str)
    assert params == {"rotate": True, "flip": True, "color": True, "color_a_min": 0.8, "color_a_max": 1.4,
                      "hed": True, "channel_order": "BGR"}
    assert order(net, TRAIN)[:3] == ["train-data", "augment", "data_mean"]
    text = "\n".join(result.lines)
    assert "removed layer 'aug'" in text and "carried over 5 key(s)" in text and "overrides color_a_max" in text
    # without --param-str the old one is taken as it is
    alone = parse_param_str(augmentation(retro("digits_python_augment", None).net).python_param.param_str)
    assert alone == {"rotate": True, "flip": True, "color": True, "color_a_min": 0.8, "color_a_max": 1.25}


def test_an_augmentation_layer_writing_new_tops_is_unwound():
    net = load("digits_python_augment")
    aug = [layer for layer in net.layer if layer.name == "aug"][0]
    aug.top[0] = "aug_data"
    aug.ClearField("include")  # in both phases (DIGITS-style layers often are)
    [conv] = [layer for layer in net.layer if layer.name == "conv1"]
    conv.bottom[0] = "aug_data"
    result = rf.retrofit(net, None)
    assert list(named(result.net, "conv1").bottom) == ["data"]
    assert not any("aug_data" in list(layer.bottom) + list(layer.top) for layer in result.net.layer)


def test_unknown_keys_of_a_carried_over_param_str_are_all_named():
    net = load("digits_python_augment")
    aug = [layer for layer in net.layer if layer.name == "aug"][0]
    aug.python_param.param_str = "{'rotate': True, 'colour': True, 'mirror': True}"
    with pytest.raises(ParamError) as error:
        rf.retrofit(net, None)
    message = str(error.value)
    assert "'colour' (did you mean 'color'?)" in message and "'mirror'" in message and "layer 'aug'" in message
    result = rf.retrofit(net, None, drop_unknown_keys=True)
    assert parse_param_str(augmentation(result.net).python_param.param_str) == {"rotate": True}
    assert "dropped unknown key(s)" in "\n".join(result.lines)


def test_retrofit_is_idempotent():
    once = retro("digits_v1_classifier")
    twice = rf.retrofit(once.net, PARAM)
    assert twice.net == once.net


def test_patch_data_layer_augment_entry_moves_into_the_layer():
    net = load("python_data_fcn")
    net.layer[0].python_param.param_str = ('{"source": "train.txt", "batch_size": 2, "patch_size": 16, '
                                           '"augment": {"rotate": true, "hed": true}}')
    result = rf.retrofit(net, '{"flip": True}')
    data = parse_param_str(named(result.net, "data").python_param.param_str)
    assert "augment" not in data and data["source"] == "train.txt"
    assert parse_param_str(augmentation(result.net).python_param.param_str) == {
        "rotate": True, "flip": True, "hed": True}  # RGB: no channel_order for our own layer


def test_channel_order_bgr_only_for_data_layers_with_hed():
    def params(name, param_str):
        return parse_param_str(augmentation(retro(name, param_str).net).python_param.param_str)

    assert params("v2_data_scale_meanvalue", '{"hed": True}')["channel_order"] == "BGR"
    assert "channel_order" not in params("v2_data_scale_meanvalue", '{"color": True}')
    result = retro("v2_data_scale_meanvalue", '{"hed": True, "channel_order": "RGB"}')
    assert parse_param_str(augmentation(result.net).python_param.param_str)["channel_order"] == "RGB"
    assert "normally deliver BGR" in "\n".join(result.lines)
    assert "channel_order" not in params("hdf5_segmentation", '{"hed": True}')


def test_input_range_one_scales_the_intensity_keys():
    result = retro("hdf5_segmentation", '{"color": True, "color_b_min": -25.5, "color_b_max": 51}', input_range=1)
    params = parse_param_str(augmentation(result.net).python_param.param_str)
    assert params["color_b_min"] == pytest.approx(-0.1) and params["color_b_max"] == pytest.approx(0.2)
    assert params["clip_max"] == params["max_value"] == 1.0 and params["clip_min"] == 0
    with pytest.raises(ValueError, match="clip_max=1.0 already look like 0-1"):
        retro("hdf5_segmentation", '{"color": True, "clip_max": 1.0}', input_range=1)


def test_param_str_floats_are_written_exactly():
    result = retro("hdf5_segmentation", '{"color": True, "color_a_min": 0.123456789, "color_a_max": 1.87654321}')
    params = parse_param_str(augmentation(result.net).python_param.param_str)
    assert params["color_a_min"] == 0.123456789 and params["color_a_max"] == 1.87654321
    assert result.params["color_a_min"] == 0.123456789


def test_inputs_with_declared_shapes_decide_the_label_kind():
    def net_with(label_dims, data_dims=(2, 3, 16, 16)):
        return prototxt.parse_net(textwrap.dedent(f'''
            layer {{ name: "in" type: "Input" top: "data" top: "label" include {{ phase: TRAIN }}
                     input_param {{ shape {{ {" ".join(f"dim: {d}" for d in data_dims)} }}
                                    shape {{ {" ".join(f"dim: {d}" for d in label_dims)} }} }} }}
            layer {{ name: "conv" type: "Convolution" bottom: "data" top: "score"
                     convolution_param {{ num_output: 2 kernel_size: 1 }} }}
            layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }}'''))

    assert list(augmentation(rf.retrofit(net_with((2, 1, 16, 16)), PARAM).net).bottom) == ["data", "label"]
    assert list(augmentation(rf.retrofit(net_with((2,)), PARAM).net).bottom) == ["data"]
    with pytest.raises(ValueError, match="not the image's size"):
        rf.retrofit(net_with((2, 1, 8, 8)), PARAM)
    colour_only = rf.retrofit(net_with((2, 1, 8, 8)), '{"color": True}')
    assert list(augmentation(colour_only.net).bottom) == ["data"]
    with pytest.raises(ValueError, match="contradicts"):
        rf.retrofit(net_with((2,)), PARAM, label="spatial")


# ---- refusals

def test_no_data_layer_is_refused():
    net = prototxt.parse_net('layer { name: "conv" type: "Convolution" bottom: "data" top: "c" '
                       'convolution_param { num_output: 1 kernel_size: 1 } }')
    with pytest.raises(ValueError, match="no data layer in the TRAIN phase"):
        rf.retrofit(net, PARAM)
    staged = prototxt.parse_net('layer { name: "train-data" type: "Data" top: "data" include { stage: "train" } '
                          'data_param { source: "db" batch_size: 1 } }')
    with pytest.raises(ValueError, match="DIGITS all-in-one"):
        rf.retrofit(staged, PARAM)
    memory = prototxt.parse_net('layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
                          'memory_data_param { batch_size: 1 channels: 3 height: 8 width: 8 } }')
    with pytest.raises(ValueError, match="layer 'mem' \\(MemoryData, TRAIN and TEST\\).*not supported"):
        rf.retrofit(memory, PARAM)


def test_two_candidate_image_tops_are_refused_and_can_be_named():
    net = prototxt.parse_net(textwrap.dedent('''
        layer { name: "a" type: "HDF5Data" top: "rgb" top: "label" hdf5_data_param { source: "a.txt" batch_size: 1 } }
        layer { name: "b" type: "HDF5Data" top: "image" hdf5_data_param { source: "b.txt" batch_size: 1 } }
        layer { name: "conv" type: "Convolution" bottom: "rgb" top: "score" convolution_param { num_output: 2 kernel_size: 1 } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }'''))
    with pytest.raises(ValueError, match=r"two candidate image tops.*'rgb' of layer 'a'.*'image' of layer 'b'"):
        rf.retrofit(net, PARAM)
    result = rf.retrofit(net, PARAM, image_top="rgb")
    assert list(augmentation(result.net).bottom) == ["rgb", "label"]
    assert "top 'image' of layer 'b'" in "\n".join(result.lines)


def test_ambiguous_label_tops_and_unknown_label_kinds_are_refused():
    net = prototxt.parse_net('layer { name: "d" type: "HDF5Data" top: "data" top: "mask" top: "gt" '
                       'hdf5_data_param { source: "a.txt" batch_size: 1 } }')
    with pytest.raises(ValueError, match="ambiguous label tops.*'mask'.*'gt'"):
        rf.retrofit(net, PARAM)
    with pytest.raises(ValueError, match="cannot tell whether label top 'mask'.*--label spatial"):
        rf.retrofit(net, PARAM, label_top="mask")
    result = rf.retrofit(net, PARAM, label_top="mask", label="spatial")
    assert list(augmentation(result.net).bottom) == ["data", "mask"]


def test_two_label_maps_with_plain_names_are_found_by_their_losses():
    """SIFT Flow FCN style: tops data, sem, geo; a loss each."""
    net = prototxt.parse_net(textwrap.dedent('''
        layer { name: "data" type: "Python" top: "data" top: "sem" top: "geo"
                python_param { module: "siftflow_layers" layer: "SIFTFlowSegDataLayer" param_str: "{}" } }
        layer { name: "score" type: "Convolution" bottom: "data" top: "score_sem"
                convolution_param { num_output: 33 kernel_size: 1 } }
        layer { name: "score_geo" type: "Convolution" bottom: "data" top: "score_geo"
                convolution_param { num_output: 3 kernel_size: 1 } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score_sem" bottom: "sem" top: "loss" }
        layer { name: "loss_geo" type: "SoftmaxWithLoss" bottom: "score_geo" bottom: "geo" top: "loss_geo" }'''))
    with pytest.raises(ValueError, match="ambiguous label tops.*'sem'.*'geo'"):
        rf.retrofit(net, PARAM)
    with pytest.raises(ValueError, match="'geo' also feed a loss.*carries one label \\('sem'\\)"):
        rf.retrofit(net, PARAM, label_top="sem")
    result = rf.retrofit(net, '{"color": True}', label_top="sem")
    assert list(augmentation(result.net).bottom) == ["data", "sem"]


def test_an_augmentation_layer_away_from_the_data_is_refused():
    net = load("digits_python_augment")
    aug = [layer for layer in net.layer if layer.name == "aug"][0]
    aug.bottom[0] = aug.top[0] = "conv1"
    net.layer.remove(aug)
    net.layer.insert(3, aug)
    with pytest.raises(ValueError, match="augmentation layer 'aug'.* reads 'conv1', not a top of the data layers"):
        rf.retrofit(net, None)


def test_a_consumer_between_the_data_layers_is_refused():
    # between the TRAIN and the TEST data layer: it would read 'data' before its mean is subtracted
    net = load("v2_data_scale_meanvalue")
    net.layer.insert(1, caffe_pb2.LayerParameter(name="peek", type="Silence", bottom=["data"],
                                                 include=[caffe_pb2.NetStateRule(phase=TRAIN)]))
    with pytest.raises(ValueError, match=r"layer\(s\) 'peek' read 'data' before the data layers of the TRAIN phase"):
        rf.retrofit(net, PARAM)
    # with nothing to move there is no such layer: it reads the augmented blob, which is right
    net = load("hdf5_segmentation")
    net.layer.insert(1, caffe_pb2.LayerParameter(name="peek", type="Silence", bottom=["data"],
                                                 include=[caffe_pb2.NetStateRule(phase=TRAIN)]))
    assert order(rf.retrofit(net, PARAM).net, TRAIN)[:3] == ["data", "augment", "peek"]


def test_bad_param_str_is_refused_before_anything():
    with pytest.raises(ParamError, match="did you mean 'color'"):
        retro("digits_v1_classifier", '{"colour": True}')
    with pytest.raises(ValueError, match="no param_str given"):
        retro("digits_v1_classifier", None)
    with pytest.raises(ValueError, match="already centred"):
        rf.retrofit(retro("digits_v1_classifier").net, PARAM, centring="patchmean")


# =========================================================================== Caffe builds the results

def fake_digits_module(directory):
    """A stand-in for the user's DIGITS upload (digits_python_layers.py): an identity layer."""
    (Path(directory) / "digits_python_layers.py").write_text(textwrap.dedent('''
        import caffe

        class AugmentationLayer(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                for i in range(len(bottom)):
                    top[i].reshape(*bottom[i].data.shape)
            def forward(self, bottom, top):
                for i in range(len(bottom)):
                    top[i].data[...] = bottom[i].data
            def backward(self, top, propagate_down, bottom):
                pass
        '''))


def _weights_job(old_path, new_path):
    """Old net: random weights, saved; new net: built in TRAIN and TEST with them, run; compared.

    One net at a time (``del``): this Caffe's DataReader aborts when two live nets have a Data
    layer of the same name and source.
    """
    return f'''
    import gc
    old = net({str(old_path)!r}, "TEST")
    rng = np.random.default_rng(0)
    for blobs in old.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(size=blob.data.shape)
    old.save("old.caffemodel")
    saved = params_of(old)
    del old; gc.collect()
    runs, same = {{}}, {{name: True for name in saved}}
    for phase in ("TRAIN", "TEST"):
        n = net({str(new_path)!r}, phase, weights="old.caffemodel")
        loaded = params_of(n)
        for name in saved:
            same[name] = same[name] and len(saved[name]) == len(loaded.get(name, [])) and all(
                np.array_equal(a, b) for a, b in zip(saved[name], loaded.get(name, [])))
        runs[phase] = {{k: float(np.asarray(v).ravel()[0]) for k, v in n.forward().items()}}
        del n; gc.collect()
        old = net({str(old_path)!r}, phase)
        old.forward()
        del old; gc.collect()
    extra = sorted(set(loaded) - set(saved))
    done(same=same, extra=extra, runs=runs,
         extra_blobs={{name: [b.ravel().tolist() for b in loaded[name]] for name in extra}})
    '''


@pytest.mark.parametrize("name, image_shape, label_shape", [
    ("digits_v1_classifier", (4, 3, 28, 28), (4,)),
    ("v2_data_scale_meanvalue", (4, 3, 16, 16), (4,)),
    ("lmdb_segmentation", (2, 3, 16, 16), (2, 1, 16, 16)),
    ("hdf5_segmentation", (2, 3, 16, 16), (2, 1, 16, 16)),
    ("digits_python_augment", (4, 3, 12, 12), (4,)),
])
def test_retrofitted_net_builds_in_both_phases_and_loads_the_old_weights(caffe, tmp_path, name, image_shape,
                                                                       label_shape):
    write_mean_binaryproto(tmp_path / "mean.binaryproto", np.full((3, 32, 32), 120, np.float32))
    result = retro(name, '{"rotate": True, "flip": True, "color": True, "hed": True}')
    data_code, sources = h5_lists(tmp_path, image_shape, label_shape)
    fake_digits_module(tmp_path)
    old_path = write_net(tmp_path / "old.prototxt", swap_sources(upgraded(name), sources))
    new_path = write_net(tmp_path / "new.prototxt", swap_sources(result.net, sources))
    out = run_caffe(tmp_path, data_code + _weights_job(old_path, new_path), pythonpath=[tmp_path])
    assert out["same"] and all(out["same"].values()), out["same"]
    if name in ("v2_data_scale_meanvalue", "lmdb_segmentation"):
        assert out["extra"] == ["data_mean"]  # the fixed Bias blob, as written in the prototxt
        assert out["extra_blobs"]["data_mean"] == [list(named(result.net, "data_mean").blobs[0].data)]
    else:
        assert out["extra"] == []
    assert np.isfinite(out["runs"]["TRAIN"]["loss"]) and np.isfinite(out["runs"]["TEST"]["loss"])


def test_python_data_layers_build_and_the_label_follows_the_image(caffe, tmp_path):
    """PatchDataLayer (ours) and an FCN-style module of the user's own: TRAIN/TEST builds; with
    geometry only, the augmented label is still the thresholded augmented image."""
    (tmp_path / "voc_layers.py").write_text(textwrap.dedent('''
        import caffe, numpy as np

        class SBDDSegDataLayer(caffe.Layer):
            def setup(self, bottom, top):
                self.rng = np.random.default_rng(3)
            def reshape(self, bottom, top):
                top[0].reshape(2, 3, 16, 16)
                top[1].reshape(2, 1, 16, 16)
            def forward(self, bottom, top):
                image = self.rng.integers(0, 256, (2, 3, 16, 16)).astype(np.float32)
                top[0].data[...] = image
                top[1].data[...] = image[:, :1] > 127   # the label is a function of the pixel
            def backward(self, top, propagate_down, bottom):
                pass

        VOCSegDataLayer = SBDDSegDataLayer
        '''))
    list_file = write_dataset(tmp_path / "data", n_images=2, size=40)
    fcn = load("python_data_fcn")
    for layer in fcn.layer[:2]:
        params = parse_param_str(layer.python_param.param_str)
        params["source"] = str(list_file)
        layer.python_param.param_str = json.dumps(params)
    geometry = '{"rotate": True, "flip": True, "rotate_any": False, "seed": 5}'
    paths = {"fcn": write_net(tmp_path / "fcn.prototxt", rf.retrofit(fcn, PARAM).net),
             "voc": write_net(tmp_path / "voc.prototxt", retro("fcn_voc_layers", geometry).net)}
    out = run_caffe(tmp_path, f'''
    results = {{}}
    for key, path in {paths!r}.items():
        for phase in ("TRAIN", "TEST"):
            n = net(path, phase)
            n.forward()
            results[key + phase] = float(n.blobs["loss"].data)
    n = net({paths["voc"]!r}, "TRAIN")
    consistent = 0
    for _ in range(5):
        n.forward()
        image, label = n.blobs["data"].data, n.blobs["label"].data
        consistent += int(np.array_equal(label, image[:, :1] > 127))
    done(losses=results, consistent=consistent)
    ''', pythonpath=[tmp_path])
    assert len(out["losses"]) == 4 and all(np.isfinite(list(out["losses"].values())))
    assert out["consistent"] == 5


def _input_swapped(net, shapes):
    """``net`` with its TEST Data layers replaced by Input layers of ``shapes`` (top -> shape)."""
    net = copy.deepcopy(net)
    for layer in net.layer:
        if layer.type == "Data" and prototxt.layer_in_phase(layer, TEST):
            for field in ("data_param", "transform_param"):
                layer.ClearField(field)
            layer.type = "Input"
            for top in layer.top:
                layer.input_param.shape.add().dim.extend(shapes[top])
    return net


def caffe_transform_reference(raw, transform, mean_file_array=None):
    """Caffe's DataTransformer in the TEST phase (centre crop, then (x - mean) * scale), in float32."""
    raw = raw.astype(np.float32)
    crop = transform.crop_size
    height, width = raw.shape[2:]
    h_off, w_off = ((height - crop) // 2, (width - crop) // 2) if crop else (0, 0)
    size_h, size_w = (crop, crop) if crop else (height, width)
    window = (slice(None), slice(None), slice(h_off, h_off + size_h), slice(w_off, w_off + size_w))
    x = raw[window]
    if transform.HasField("mean_file"):
        x = x - mean_file_array[None][window]
    elif transform.mean_value:
        x = x - np.asarray(transform.mean_value, np.float32)[None, :, None, None]
    if transform.HasField("scale"):
        x = x * np.float32(transform.scale)
    return x, window


@pytest.mark.parametrize("name, crop_mean", [("v2_data_scale_meanvalue", None), ("lmdb_segmentation", None),
                                             ("digits_v1_classifier", "flat"), ("digits_v1_classifier", "image"),
                                             ("digits_v1_classifier", "no crop")])
def test_test_phase_data_equals_the_old_transform_param(caffe, tmp_path, name, crop_mean):
    """The layers after the augmentation compute what transform_param computed (without LMDB:
    the TEST Data layer is an Input fed with what it would have delivered after its crop)."""
    rng = np.random.default_rng(1)
    original = upgraded(name)
    if crop_mean == "no crop":
        for layer in original.layer:
            layer.transform_param.ClearField("crop_size")
    old_test = [layer for layer in original.layer if layer.name == "data" and prototxt.layer_in_phase(layer, TEST)][0]
    raw = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.float32)
    mean = None
    if old_test.transform_param.HasField("mean_file"):
        mean = (np.full((3, 32, 32), 0, np.float32) + np.array([100, 120, 140], np.float32)[:, None, None])
        if crop_mean != "flat":
            mean = mean + rng.normal(0, 20, mean.shape).astype(np.float32)
        write_mean_binaryproto(tmp_path / "mean.binaryproto", mean)
    expected, window = caffe_transform_reference(raw, old_test.transform_param, mean)
    cropped = raw[window]
    result = rf.retrofit(original, PARAM)
    shapes = {"data": cropped.shape, "label": (2, 1) + cropped.shape[2:] if name == "lmdb_segmentation" else (2,)}
    path = write_net(tmp_path / "test.prototxt", _input_swapped(result.net, shapes))
    np.save(tmp_path / "raw.npy", cropped)
    run_caffe(tmp_path, f'''
    n = net({path!r}, "TEST")
    n.blobs["data"].data[...] = np.load("raw.npy")
    n.forward()  # the new layers work in place: "data" ends up as the net's conv1 sees it
    np.save("got.npy", n.blobs["data"].data)
    done()
    ''')
    got = np.load(tmp_path / "got.npy")
    # crop + a non-flat mean file too: the mean's centre crop, as Caffe's TEST phase (and the report says so)
    np.testing.assert_array_equal(got, expected)
    if crop_mean == "image":
        assert not np.allclose(got, cropped - mean.mean(axis=(1, 2))[None, :, None, None])
        assert "exactly what Caffe subtracts in TEST" in "\n".join(result.lines)


V2_DEPLOY = textwrap.dedent('''
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
            convolution_param { num_output: 6 pad: 1 kernel_size: 3 } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE global_pooling: true } }
    layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 3 } }
    layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }''')


@pytest.mark.parametrize("name, size, output", [("digits_v1_classifier", 28, "ip2"), ("v2_data_scale_meanvalue", 16, "fc")])
def test_patchmean_deploy_net_computes_what_the_train_net_computes_in_test(caffe, tmp_path, name, size, output):
    deploy = load("digits_v1_classifier_deploy") if name == "digits_v1_classifier" else prototxt.parse_net(V2_DEPLOY)
    result = retro(name, centring="patchmean", deploy=deploy)
    train_path = write_net(tmp_path / "train.prototxt",
                           _input_swapped(result.net, {"data": (1, 3, size, size), "label": (1,)}))
    deploy_path = write_net(tmp_path / "deploy.prototxt", result.deploy)
    np.save(tmp_path / "raw.npy", np.random.default_rng(4).integers(0, 256, (1, 3, size, size)).astype(np.float32))
    out = run_caffe(tmp_path, f'''
    train = net({train_path!r}, "TEST")
    rng = np.random.default_rng(0)
    for blobs in train.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(size=blob.data.shape)
    train.save("trained.caffemodel")
    outputs = []
    for n in (train, net({deploy_path!r}, "TEST", weights="trained.caffemodel")):
        n.blobs["data"].data[...] = np.load("raw.npy")
        n.forward()
        outputs.append(n.blobs[{output!r}].data.copy())
    centred = n.blobs["data"].data  # the deploy net's input after its own centring (in place)
    done(equal=bool(np.array_equal(*outputs)), channel_means=np.abs(centred.mean(axis=(2, 3))).max().item(),
         deploy_layers=list(n._layer_names))
    ''')
    assert out["equal"] and out["channel_means"] < 1e-4
    assert out["deploy_layers"][:2] == ["input" if name == "digits_v1_classifier" else "data", "data_centre"]


# =========================================================================== with LMDB

def _write_lmdb(path, arrays, labels=None):
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for index, array in enumerate(arrays):
            datum = caffe_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2],
                                    data=np.ascontiguousarray(array, np.uint8).tobytes(),
                                    label=int(labels[index]) if labels is not None else 0)
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()


@pytest.fixture(scope="session")
def lmdb_caffe(caffe, tmp_path_factory):
    """Skip (or, with CAFFE_STAIN_REQUIRE_LMDB, fail) unless this Caffe reads LMDB Data layers."""
    required = os.environ.get("CAFFE_STAIN_REQUIRE_LMDB")

    def missing(message):
        if required:
            pytest.fail(message + " (CAFFE_STAIN_REQUIRE_LMDB is set)", pytrace=False)
        pytest.skip(message)

    try:
        import lmdb  # noqa: F401
    except ImportError:
        missing("the lmdb Python package is not installed (needed to write test databases)")
    tmp = tmp_path_factory.mktemp("lmdb_probe")
    _write_lmdb(tmp / "db", [np.zeros((3, 4, 4), np.uint8)])
    (tmp / "probe.prototxt").write_text(
        f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
        f'data_param {{ source: "{tmp / "db"}" backend: LMDB batch_size: 1 }} }}')
    try:
        run_caffe(tmp, f'n = net({str(tmp / "probe.prototxt")!r}, "TEST"); n.forward(); done(ok=True)', timeout=120)
    except AssertionError as error:
        fatal = [line for line in str(error).splitlines() if line[:1] == "F" and line[1:2].isdigit()]
        missing("this Caffe cannot build an LMDB Data layer: " + (fatal or str(error).strip().splitlines())[-1][:300])
    return True


def _lmdb_case(tmp_path, name, rng, crop_mean=None):
    """The fixture with its LMDB sources written for real (images 3×32×32, BGR 0-255)."""
    net = upgraded(name)
    if crop_mean == "no crop":
        for layer in net.layer:
            layer.transform_param.ClearField("crop_size")
    for layer in net.layer:
        if layer.type != "Data":
            continue
        batch = layer.data_param.batch_size
        db = tmp_path / f"{layer.name}_{'train' if prototxt.layer_in_phase(layer, TRAIN) else 'test'}_db"
        if layer.top[0] == "label":
            _write_lmdb(db, rng.integers(0, 2, (batch, 1, 32, 32)))
        else:
            _write_lmdb(db, rng.integers(0, 256, (batch, 3, 32, 32)), rng.integers(0, 2, batch))
        layer.data_param.source = str(db)
        layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    write_mean_binaryproto(tmp_path / "mean.binaryproto",
                           rng.uniform(80, 160, (3, 32, 32)).astype(np.float32) if crop_mean != "flat"
                           else np.full((3, 32, 32), 117, np.float32))
    return net


@pytest.mark.parametrize("name, crop_mean", [("v2_data_scale_meanvalue", None), ("lmdb_segmentation", None),
                                             ("digits_v1_classifier", "flat"), ("digits_v1_classifier", "no crop"),
                                             ("digits_python_augment", None)])
def test_lmdb_nets_give_the_old_test_data_and_take_the_old_weights(lmdb_caffe, tmp_path, name, crop_mean):
    rng = np.random.default_rng(2)
    old = _lmdb_case(tmp_path, name, rng, crop_mean)
    fake_digits_module(tmp_path)
    new = rf.retrofit(old, '{"rotate": True, "flip": True, "color": True, "hed": True}').net
    old_path, new_path = write_net(tmp_path / "old.prototxt", old), write_net(tmp_path / "new.prototxt", new)
    out = run_caffe(tmp_path, _weights_job(old_path, new_path) + f'''
    blobs = []
    for path in ({old_path!r}, {new_path!r}):  # the same first TEST batch from the same databases
        n = net(path, "TEST")
        n.forward()
        blobs.append((n.blobs["data"].data.copy(), n.blobs["label"].data.copy()))
        del n; gc.collect()
    (old_data, old_label), (new_data, new_label) = blobs
    done(same=same, extra=extra, data_equal=bool(np.array_equal(old_data, new_data)),
         label_equal=bool(np.array_equal(old_label, new_label)), changed=bool(np.any(old_data != 0)))
    ''', pythonpath=[tmp_path])
    assert out["same"] and all(out["same"].values()) and out["data_equal"] and out["label_equal"] and out["changed"]


# =========================================================================== files and the command

def test_retrofit_files_writes_atomically_and_protects_its_inputs(tmp_path):
    source = tmp_path / "train_val.prototxt"
    source.write_text((FIXTURES / "digits_v1_classifier.prototxt").read_text())
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text((FIXTURES / "digits_v1_classifier_deploy.prototxt").read_text())
    before = {path.name: path.read_bytes() for path in (source, deploy)}
    out = tmp_path / "out.prototxt"
    for kwargs, message in [(dict(out=source), "would replace the input net"),
                            (dict(out=out, deploy=deploy, deploy_out=source), "would replace the input net"),
                            (dict(out=out, deploy=deploy, deploy_out=deploy), "would replace the deploy net"),
                            (dict(out=out, deploy=deploy, deploy_out=out), "the same file"),
                            (dict(out=tmp_path / "no" / "out.prototxt"), "does not exist")]:
        with pytest.raises(OSError if "exist" in message else ValueError, match=message):
            rf.retrofit_files(source, param_str=PARAM, **kwargs)
    with pytest.raises(ParamError, match="--param-str"):
        rf.retrofit_files(source, out, '{"colour": 1}')
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deploy.prototxt", "train_val.prototxt"]
    result = rf.retrofit_files(source, out, PARAM, centring="patchmean", deploy=deploy,
                               deploy_out=tmp_path / "deploy_out.prototxt")
    assert prototxt.read_net(out)[0] == result.net and out.read_text().startswith("# Retrofitted by caffe-stain-retrofit")
    assert prototxt.read_net(tmp_path / "deploy_out.prototxt")[0] == result.deploy
    with pytest.raises(FileExistsError, match="--overwrite"):
        rf.retrofit_files(source, out, PARAM)
    rf.retrofit_files(source, out, PARAM, overwrite=True)
    assert {path.name: path.read_bytes() for path in (source, deploy)} == before
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]


@pytest.mark.parametrize("form", ["literal", "json", "yaml", "file", "estimate-json"])
def test_param_str_forms(tmp_path, form):
    params = {"color": True, "color_a_min": 0.74, "color_a_max": 1.45}
    text = {"literal": '{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}',
            "json": json.dumps(params), "yaml": "color: true\ncolor_a_min: 0.74\ncolor_a_max: 1.45"}.get(form)
    if form == "file":
        (tmp_path / "p.txt").write_text('{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}\n')
        text = f"@{tmp_path / 'p.txt'}"
    if form == "estimate-json":
        (tmp_path / "e.json").write_text(json.dumps({"params": params, "param_str": "...", "ratios": {}}))
        text = f"@{tmp_path / 'e.json'}"
    result = rf.retrofit_files(FIXTURES / "hdf5_segmentation.prototxt", tmp_path / "out.prototxt", text)
    assert parse_param_str(result.param_str) == params


def test_cli_prints_every_change(tmp_path, capsys):
    out = tmp_path / "out.prototxt"
    code = retrofit_cli.main([str(FIXTURES / "lmdb_segmentation.prototxt"), "--param-str", PARAM, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "+ layer 'augment'" in printed and "+ layer 'data_mean' (Bias, TRAIN and TEST)" in printed
    assert "removed mean_value from transform_param" in printed and f"wrote {out}; point your solver" in printed


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    # (tests/cli/test_contract.py runs the command in a subprocess too)
    monkeypatch.chdir(tmp_path)
    net = FIXTURES / "digits_v1_classifier.prototxt"
    for args, needle in [((net, "--param-str", '{"colour": 1}', "--out", "o.prototxt"), "'colour'"),
                         ((net, "--param-str", PARAM, "--out", net), "would replace the input net"),
                         ((net, "--param-str", PARAM, "--out", "o.prototxt", "--deploy", net), "go together"),
                         ((net, "--param-str", "@absent.txt", "--out", "o.prototxt"), "absent.txt"),
                         ((FIXTURES / "hdf5_segmentation.prototxt", "--param-str", "{}", "--out", "o.prototxt",
                           "--label-top", "nope"), "'nope'"),
                         ((FIXTURES / "digits_python_augment.prototxt", "--out", "o.prototxt", "--centring",
                           "patchmean", "--deploy", net, "--deploy-out", "d.prototxt"), "cannot find its image input")]:
        assert retrofit_cli.main([str(arg) for arg in args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("caffe-stain-retrofit: error: ") and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []
