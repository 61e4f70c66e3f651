"""Retrofit a user's train_val net with the AugmentationLayer (pure ``caffe_pb2`` manipulation).

:func:`retrofit` takes a ``NetParameter`` (V0/V1 nets are upgraded first, the way Caffe's
``upgrade_proto.cpp`` does it, see :func:`upgrade_net`) and returns a rewritten copy:

1. The TRAIN-phase data layer(s) and their image and label tops are found: ``Data``
   (LMDB/LevelDB, one layer with data + label tops or one layer per top as DIGITS
   segmentation datasets have), ``ImageData``, ``WindowData``, ``HDF5Data``, ``Input``,
   ``DummyData`` or a Python layer without bottoms (any module). Databases are never opened:
   everything is decided from the prototxt.
2. An ``AugmentationLayer`` (``module: "caffe_layers.augmentation"``) is inserted right after
   them, ``include { phase: TRAIN }``, *in place* (``bottom: "data" top: "data"``), so every
   consumer reads the same blob name in TRAIN (augmented) and in TEST (where the layer is
   absent). A label that is a per-pixel map goes through it too; a class label is left alone.
   An existing augmentation layer (a Python layer whose ``layer`` name contains "Augment",
   e.g. DIGITS' ``digits_python_layers``) is replaced and its ``param_str`` carried over.
3. What ``transform_param`` does after its mean moves after the augmentation, because the
   augmentation must see raw stain intensities: ``mean_file`` becomes a
   :class:`~caffe_layers.mean_subtract.MeanSubtractLayer`, ``mean_value`` a ``Power``
   (``shift: -m``, one value) or a ``Bias`` layer with fixed blobs (one value per channel,
   ``lr_mult: 0``), ``scale`` a ``Power`` (``scale: s``), in both phases. These layers compute
   ``(x - mean) * scale`` with the same float32 operations as Caffe's ``DataTransformer``, so
   the TEST-phase output is unchanged. With ``centring="patchmean"`` the mean is replaced by
   per-patch ``MVN`` centring (``normalize_variance: false``), in the deploy net as well.
   ``mirror`` and ``crop_size`` stay in the data layer.

Caffe's ``Data``, ``ImageData`` and ``WindowData`` layers deliver BGR images (OpenCV,
``convert_imageset``, DIGITS) in 0-255: with ``hed`` on and no ``channel_order`` given, the
layer is told ``channel_order: "BGR"``. Data that is not 0-255 (HDF5 in 0-1, say) cannot be
recognised from a prototxt: ``input_range=1`` converts the param_str's intensity values
(``color_b_*``, ``clip_*``, ``max_value``, given in 0-255 grey levels as
``caffe-stain-estimate`` prints them) to 0-1.

Every refusal is a ``ValueError`` naming the layer or top; the returned
:class:`RetrofitResult` lists what changed, layer by layer. :func:`retrofit_files` reads and
writes prototxt files (atomically, never over its inputs).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import caffe  # noqa: F401 - caffe.proto below needs the package; net/ owns the caffe import
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from ..image_io import same_file, write_atomic
from ..param_str import ParamError, parse_param_str
from ..patches import PATCH_DATA_SCHEMA
from ..transforms.schema import AUGMENT_SCHEMA
from .checks import read_text_file

__all__ = [
    "AUGMENTATION_LAYER",
    "AUGMENTATION_MODULE",
    "CENTRINGS",
    "INPUT_RANGES",
    "LABEL_KINDS",
    "RetrofitResult",
    "layer_in_phase",
    "net_to_text",
    "parse_net",
    "read_net",
    "read_param_str_source",
    "retrofit",
    "retrofit_files",
    "upgrade_net",
]

AUGMENTATION_MODULE = "caffe_layers.augmentation"
AUGMENTATION_LAYER = "AugmentationLayer"
MEAN_SUBTRACT_MODULE = "caffe_layers.mean_subtract"
MEAN_SUBTRACT_LAYER = "MeanSubtractLayer"
PATCH_DATA_MODULE = "caffe_layers.data"

CENTRINGS = ("keep", "patchmean")
INPUT_RANGES = (255, 1)
LABEL_KINDS = ("auto", "spatial", "scalar")

#: Data layer types whose ``transform_param`` Caffe applies (and whose images are BGR 0-255).
TRANSFORMING_TYPES = ("Data", "ImageData", "WindowData")
#: Source layers understood as data layers (plus any Python layer without bottoms).
DATA_TYPES = TRANSFORMING_TYPES + ("HDF5Data", "Input", "DummyData")
#: Source layers that cannot be retrofitted, with the reason.
_UNSUPPORTED_SOURCES = {
    "MemoryData": "its arrays are set from Python/C++ and it applies transform_param only to Datums",
    "AnnotatedData": "detection data with boxes (SSD); box-aware augmentation is not supported",
    "VideoData": "video frames are read by OpenCV with their own transform",
}

# The param_str keys holding intensities, in 0-255 grey levels (scaled by input_range).
_INTENSITY_KEYS = ("color_b_min", "color_b_max", "clip_min", "clip_max", "max_value")
_GEOMETRY_KEYS = ("rotate", "flip", "rotate_any")

_LABEL_WORDS = {"label", "labels", "mask", "masks", "gt", "groundtruth", "target", "targets", "seg",
                "segmentation", "annotation", "annotations", "truth"}
_IMAGE_WORDS = {"data", "image", "images", "img", "imgs", "input", "rgb", "features", "feature", "pixels"}


@dataclasses.dataclass
class RetrofitResult:
    """What :func:`retrofit` made.

    Attributes
    ----------
    net : caffe_pb2.NetParameter
        The rewritten train_val net (V2).
    deploy : caffe_pb2.NetParameter or None
        The rewritten deploy net, when one was given.
    lines : list of str
        What changed, layer by layer (and notes), for printing.
    params : dict
        The augmentation parameters, validated (every key of AUGMENT_SCHEMA).
    param_str : str
        The AugmentationLayer's param_str as written.
    """

    net: caffe_pb2.NetParameter
    deploy: caffe_pb2.NetParameter | None
    lines: list
    params: dict
    param_str: str


# =========================================================================== reading, upgrading

def parse_net(text, where="net prototxt"):
    """Parse prototxt text into a ``NetParameter`` (no upgrade); ValueError naming ``where``."""
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as error:
        raise ValueError(f"{where}: not a Caffe net prototxt: {error}") from None
    return net


def read_net(path):
    """Read a net prototxt (V0, V1 or V2) and upgrade it to V2.

    Returns
    -------
    (net, notes) : (NetParameter, list of str)
        ``notes`` says which upgrades were applied.
    """
    path = Path(path)
    return upgrade_net(parse_net(read_text_file(path, "net prototxt"), str(path)), where=str(path))


def upgrade_net(net, where="net"):
    """Upgrade a ``NetParameter`` to the current (V2) format, as ``UpgradeNetAsNeeded`` does.

    The steps of Caffe's ``src/caffe/util/upgrade_proto.cpp``, in its order: V0 layers (with
    padding layers folded into the next convolution/pooling) to V1; the V1 data layers'
    ``scale``/``mean_file``/``crop_size``/``mirror`` to ``transform_param``; V1 ``layers`` to V2
    ``layer`` (enum types to strings, ``blobs_lr`` to ``param { lr_mult }``, ``weight_decay`` to
    ``param { decay_mult }``, ...); the legacy ``input``/``input_dim`` fields to an ``Input``
    layer; old three-parameter ``BatchNorm`` specs. One difference: this Caffe's V1 message
    also has ``bn_param`` and ``batch_norm_param``, which its C++ upgrade drops; they are
    copied here (every V1 ``*_param`` with a V2 namesake is).

    Parameters
    ----------
    net : caffe_pb2.NetParameter
        Not modified.

    Returns
    -------
    (net, notes) : (NetParameter, list of str)
    """
    net = copy.deepcopy(net)
    notes = []
    if net.layer and net.layers:
        raise ValueError(f"{where}: has both 'layer' (V2) and 'layers' (V1) entries; Caffe refuses such a "
                         "net too: write every layer in one of the two formats")
    if any(layer.HasField("layer") for layer in net.layers):
        net, problems = _upgrade_v0(net, where)
        notes.append("upgraded V0 layers (layers { layer { ... } }) to V1" +
                     (f"; {len(problems)} problem(s): " + "; ".join(problems) if problems else ""))
    if _needs_data_upgrade(net):
        _upgrade_data_transformation(net)
        notes.append("moved V1 data layer scale/mean_file/crop_size/mirror into transform_param")
    if net.layers:
        net = _upgrade_v1(net, where)
        notes.append(f"upgraded {len(net.layer)} V1 layers (layers {{ type: ENUM }}) to V2 "
                     "(layer { type: \"Name\" }, blobs_lr/weight_decay -> param { lr_mult decay_mult })")
    if net.input:
        had_shape = bool(net.input_shape or net.input_dim)
        _upgrade_input(net)
        if had_shape:
            notes.append("turned the legacy input/input_dim fields into an Input layer named 'input'")
        else:
            notes.append("dropped legacy input fields without shapes")
    batch_norm = [layer.name for layer in net.layer if layer.type == "BatchNorm" and len(layer.param) == 3]
    if batch_norm:
        for layer in net.layer:
            if layer.type == "BatchNorm" and len(layer.param) == 3:
                layer.ClearField("param")
        notes.append("removed the old three param specs of BatchNorm layer(s) " + ", ".join(map(repr, batch_norm)))
    return net, notes


# ---- V0 -> V1 (UpgradeV0PaddingLayers, UpgradeV0LayerParameter, UpgradeV0LayerType)

_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}
_ALL = "*"  # a V0 field that goes to transform_param for every type
# V0 field -> {V0 type (or _ALL): (V1 sub-message, field)}; the order of upgrade_proto.cpp.
_V0_FIELDS = [
    ("num_output", {"conv": ("convolution_param", "num_output"),
                    "innerproduct": ("inner_product_param", "num_output")}),
    ("biasterm", {"conv": ("convolution_param", "bias_term"), "innerproduct": ("inner_product_param", "bias_term")}),
    ("weight_filler", {"conv": ("convolution_param", "weight_filler"),
                       "innerproduct": ("inner_product_param", "weight_filler")}),
    ("bias_filler", {"conv": ("convolution_param", "bias_filler"),
                     "innerproduct": ("inner_product_param", "bias_filler")}),
    ("pad", {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")}),
    ("kernelsize", {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")}),
    ("group", {"conv": ("convolution_param", "group")}),
    ("stride", {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")}),
    ("pool", {"pool": ("pooling_param", "pool")}),
    ("dropout_ratio", {"dropout": ("dropout_param", "dropout_ratio")}),
    ("local_size", {"lrn": ("lrn_param", "local_size")}),
    ("alpha", {"lrn": ("lrn_param", "alpha")}),
    ("beta", {"lrn": ("lrn_param", "beta")}),
    ("k", {"lrn": ("lrn_param", "k")}),
    ("source", {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
                "images": ("image_data_param", "source"), "window_data": ("window_data_param", "source"),
                "infogain_loss": ("infogain_loss_param", "source")}),
    ("scale", {_ALL: ("transform_param", "scale")}),
    ("meanfile", {_ALL: ("transform_param", "mean_file")}),
    ("batchsize", {"data": ("data_param", "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                   "images": ("image_data_param", "batch_size"), "window_data": ("window_data_param", "batch_size")}),
    ("cropsize", {_ALL: ("transform_param", "crop_size")}),
    ("mirror", {_ALL: ("transform_param", "mirror")}),
    ("rand_skip", {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")}),
    ("shuffle_images", {"images": ("image_data_param", "shuffle")}),
    ("new_height", {"images": ("image_data_param", "new_height")}),
    ("new_width", {"images": ("image_data_param", "new_width")}),
    ("concat_dim", {"concat": ("concat_param", "concat_dim")}),
    ("det_fg_threshold", {"window_data": ("window_data_param", "fg_threshold")}),
    ("det_bg_threshold", {"window_data": ("window_data_param", "bg_threshold")}),
    ("det_fg_fraction", {"window_data": ("window_data_param", "fg_fraction")}),
    ("det_context_pad", {"window_data": ("window_data_param", "context_pad")}),
    ("det_crop_mode", {"window_data": ("window_data_param", "crop_mode")}),
    ("hdf5_output_param", {"hdf5_output": (None, "hdf5_output_param")}),
]


def _set_field(message, field, value):
    """Set (or append to a repeated, or copy a message into) ``message.field``."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if _is_repeated(descriptor):
        getattr(message, field).append(value)
    elif descriptor.message_type is not None:
        getattr(message, field).CopyFrom(value)
    else:
        setattr(message, field, value)


def _upgrade_v0(net, where):
    problems = []
    # UpgradeV0PaddingLayers: fold each "padding" layer into the conv/pool layer it feeds.
    padded = caffe_pb2.NetParameter()
    padded.CopyFrom(net)
    padded.ClearField("layers")
    last_top = {name: -1 for name in net.input}
    for index, connection in enumerate(net.layers):
        v0 = connection.layer
        if v0.type != "padding":
            padded.layers.add().CopyFrom(connection)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_top:
                raise ValueError(f"{where}: V0 layer {v0.name!r} reads unknown blob {blob!r}")
            source_index = last_top[blob]
            if source_index == -1:
                continue
            source = net.layers[source_index]
            if source.layer.type == "padding":
                if v0.type not in ("conv", "pool") or len(connection.bottom) != 1 \
                        or len(source.bottom) != 1 or len(source.top) != 1:
                    raise ValueError(f"{where}: V0 padding layer {source.layer.name!r} feeds {v0.type!r} layer "
                                     f"{v0.name!r}; Caffe upgrades only padding -> conv/pool with one blob each")
                target = padded.layers[len(padded.layers) - 1]
                target.layer.pad = source.layer.pad
                target.bottom[j] = source.bottom[0]
        for blob in connection.top:
            last_top[blob] = index
    # UpgradeV0Net / UpgradeV0LayerParameter.
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for connection in padded.layers:
        layer = out.layers.add()
        layer.bottom.extend(connection.bottom)
        layer.top.extend(connection.top)
        if not connection.HasField("layer"):
            continue
        v0 = connection.layer
        if v0.HasField("name"):
            layer.name = v0.name
        kind = v0.type
        if v0.HasField("type"):
            if kind not in _V0_TYPES:
                raise ValueError(f"{where}: V0 layer {v0.name!r} has unknown type {kind!r}")
            layer.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V0_TYPES[kind])
        layer.blobs.extend(v0.blobs)
        layer.blobs_lr.extend(v0.blobs_lr)
        layer.weight_decay.extend(v0.weight_decay)
        for field, targets in _V0_FIELDS:
            if not v0.HasField(field):
                continue
            target = targets.get(kind, targets.get(_ALL))
            if target is None:
                problems.append(f"unknown parameter {field} for V0 layer type {kind!r} (layer {v0.name!r}), dropped")
                continue
            submessage, name = target
            value = getattr(v0, field)
            if field == "pool":
                value = caffe_pb2.PoolingParameter.PoolMethod.Value(
                    caffe_pb2.V0LayerParameter.PoolMethod.Name(value))
            _set_field(layer if submessage is None else getattr(layer, submessage), name, value)
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out, problems


# ---- V1 data transformation (NetNeedsDataUpgrade, UpgradeNetDataTransformation)

_V1_TRANSFORMED = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}


def _v1_type_name(layer):
    return caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)


def _needs_data_upgrade(net):
    for layer in net.layers:
        field = _V1_TRANSFORMED.get(_v1_type_name(layer))
        fields = ("scale", "mean_file", "crop_size", "mirror")
        if field and any(getattr(layer, field).HasField(name) for name in fields):
            return True
    return False


def _upgrade_data_transformation(net):
    for layer in net.layers:
        field = _V1_TRANSFORMED.get(_v1_type_name(layer))
        if not field:
            continue
        param = getattr(layer, field)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if param.HasField(name):
                setattr(layer.transform_param, name, getattr(param, name))
                param.ClearField(name)


# ---- V1 -> V2 (UpgradeV1Net, UpgradeV1LayerParameter, UpgradeV1LayerType)

_V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
_V1_SHARE_MODES = {"STRICT": "STRICT", "PERMISSIVE": "PERMISSIVE"}


def _upgrade_v1(net, where):
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    out.ClearField("layer")
    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for index, v1 in enumerate(net.layers):
        layer = out.layer.add()
        layer.bottom.extend(v1.bottom)
        layer.top.extend(v1.top)
        if v1.HasField("name"):
            layer.name = v1.name
        layer.include.extend(v1.include)
        layer.exclude.extend(v1.exclude)
        if v1.HasField("type"):
            layer.type = _V1_TYPE_NAMES[_v1_type_name(v1)]
        layer.blobs.extend(v1.blobs)

        def param(i):
            while len(layer.param) <= i:
                layer.param.add()
            return layer.param[i]

        for i, name in enumerate(v1.param):
            param(i).name = name
        for i, mode in enumerate(v1.blob_share_mode):
            mode_name = caffe_pb2.V1LayerParameter.DimCheckMode.Name(mode)
            param(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(_V1_SHARE_MODES[mode_name])
        for i, value in enumerate(v1.blobs_lr):
            param(i).lr_mult = value
        for i, value in enumerate(v1.weight_decay):
            param(i).decay_mult = value
        layer.loss_weight.extend(v1.loss_weight)
        for descriptor, value in v1.ListFields():
            name = descriptor.name
            if (descriptor.message_type is not None and not _is_repeated(descriptor)
                    and name.endswith("_param") and name in v2_fields):
                getattr(layer, name).CopyFrom(value)
        if v1.HasField("layer"):
            raise ValueError(f"{where}: layer {index} ({v1.name!r}) still holds a V0 layer after the V0 upgrade")
    return out


# ---- input fields (UpgradeNetInput)

def _upgrade_input(net):
    has_shape, has_dim = bool(net.input_shape), bool(net.input_dim)
    if has_shape or has_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [layer] + list(net.layer)
        net.ClearField("layer")
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


# =========================================================================== phases

def _rule_met(rule, phase, level, stages):
    """Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def layer_in_phase(layer, phase, level=0, stages=()):
    """Whether Caffe's ``Net::FilterNet`` keeps ``layer`` in ``phase`` (caffe_pb2.TRAIN/TEST)."""
    if layer.include:
        return any(_rule_met(rule, phase, level, stages) for rule in layer.include)
    return not any(_rule_met(rule, phase, level, stages) for rule in layer.exclude)


_PHASES = {caffe_pb2.TRAIN: "TRAIN", caffe_pb2.TEST: "TEST"}


class _State:
    """The net state Caffe would use for each phase (level and stages of the net's ``state``)."""

    def __init__(self, net):
        self.level = net.state.level if net.HasField("state") else 0
        self.stages = tuple(net.state.stage) if net.HasField("state") else ()

    def active(self, layer, phase):
        return layer_in_phase(layer, phase, self.level, self.stages)


# =========================================================================== analysis

def _tokens(text):
    return set(re.split(r"[^a-z0-9]+", str(text).lower())) - {""}


def _is_repeated(descriptor):
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5; older ones have only ``label``
    return flag if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def _type_label(layer):
    if layer.type == "Python":
        return f"Python {layer.python_param.module}.{layer.python_param.layer}"
    return layer.type


def _phases_text(layer, state):
    phases = [name for phase, name in _PHASES.items() if state.active(layer, phase)]
    return " and ".join(phases) if phases else "no phase"


def _describe(layer, state=None):
    phases = "" if state is None else ", " + _phases_text(layer, state)
    return f"layer {layer.name!r} ({_type_label(layer)}{phases})"


def _is_source(layer):
    return not layer.bottom and (layer.type in DATA_TYPES or layer.type == "Python"
                                 or layer.type in _UNSUPPORTED_SOURCES)


def _is_augmentation(layer):
    return layer.type == "Python" and "augment" in layer.python_param.layer.lower()


def _data_source(layer):
    for field in ("data_param", "image_data_param", "window_data_param", "hdf5_data_param"):
        if layer.HasField(field) and getattr(layer, field).HasField("source"):
            return getattr(layer, field).source
    return ""


@dataclasses.dataclass
class _Inputs:
    """The image and label tops of one phase and the layers producing them."""

    image: str
    image_layer: int
    label: str | None
    label_layer: int | None
    others: list  # (top, layer index) left alone


def _is_loss(layer):
    return layer.type.endswith("Loss") or layer.type == "Accuracy"


def _loss_fed(layers, state, phase):
    """Blobs that a loss (or Accuracy) layer of ``phase`` reads: labels, or predictions."""
    return {blob for layer in layers if state.active(layer, phase) and _is_loss(layer) for blob in layer.bottom}


def _top_role(top, layer, loss_fed):
    """'label', 'image' or None (unknown) for a data layer's top: from names, else from use."""
    words = _tokens(top)
    if words & _LABEL_WORDS:
        return "label"
    if words & _IMAGE_WORDS:
        return "image"
    if len(layer.top) == 1:  # one top per layer (DIGITS segmentation): look at the layer and its source
        context = _tokens(layer.name) | _tokens(_data_source(layer))
        if context & _LABEL_WORDS:
            return "label"
        if context & _IMAGE_WORDS:
            return "image"
    if top in loss_fed:  # a data top read by a loss is a label (e.g. SIFT Flow's "sem" and "geo")
        return "label"
    return None


def _find_inputs(layers, state, phase, where, image_top=None, label_top=None):
    """The image/label tops of the data layers active in ``phase`` (None if there are none)."""
    produced = {}
    for index, layer in enumerate(layers):
        if state.active(layer, phase) and _is_source(layer):
            for top in layer.top:
                produced.setdefault(top, index)
    if not produced:
        return None
    phase_name = _PHASES[phase]
    loss_fed = _loss_fed(layers, state, phase)
    roles = {top: _top_role(top, layers[index], loss_fed) for top, index in produced.items()}

    def where_top(top):
        return f"top {top!r} of {_describe(layers[produced[top]], state)}"

    if image_top is not None:
        if image_top not in produced:
            raise ValueError(f"{where}: no {phase_name}-phase data layer has a top {image_top!r} (the image top "
                             f"asked for); data tops: {', '.join(map(repr, produced))}")
        image = image_top
    else:
        candidates = [top for top in produced if roles[top] != "label"]
        if len(candidates) > 1:
            named = [top for top in candidates if roles[top] == "image"]
            if len(named) == 1:
                candidates = named
            elif "data" in candidates:
                candidates = ["data"]
        if not candidates:
            raise ValueError(f"{where}: the {phase_name}-phase data layers have no image top: every top looks like "
                             f"a label ({', '.join(where_top(t) for t in produced)}); name the image top")
        if len(candidates) > 1:
            raise ValueError(f"{where}: two candidate image tops in the {phase_name} phase: "
                             + " and ".join(where_top(t) for t in candidates)
                             + "; name the one to augment (image_top / --image-top)")
        image = candidates[0]
    if label_top is not None:
        if label_top == "":
            label = None
        elif label_top not in produced:
            raise ValueError(f"{where}: no {phase_name}-phase data layer has a top {label_top!r} (the label top "
                             f"asked for); data tops: {', '.join(map(repr, produced))}")
        else:
            label = label_top
    else:
        labels = [top for top in produced if roles[top] == "label" and top != image]
        if len(labels) > 1 and "label" in labels:
            labels = ["label"]
        if len(labels) > 1:
            raise ValueError(f"{where}: ambiguous label tops in the {phase_name} phase: "
                             + " and ".join(where_top(t) for t in labels)
                             + "; name the one that goes with the image (label_top / --label-top)")
        label = labels[0] if labels else None
    if label == image:
        raise ValueError(f"{where}: the image top and the label top are both {image!r}")
    unsupported = layers[produced[image]].type
    if unsupported in _UNSUPPORTED_SOURCES:
        raise ValueError(f"{where}: image {where_top(image)}: {unsupported} layers are not supported "
                         f"({_UNSUPPORTED_SOURCES[unsupported]})")
    others = [(top, index) for top, index in produced.items() if top not in (image, label)]
    return _Inputs(image, produced[image], label, produced[label] if label else None, others)


def _shapes_of(layer):
    """Declared top shapes of an Input/DummyData layer: {top: tuple} (missing when unknown)."""
    shapes = []
    if layer.type == "Input":
        shapes = [tuple(shape.dim) for shape in layer.input_param.shape]
    elif layer.type == "DummyData":
        param = layer.dummy_data_param
        shapes = [tuple(shape.dim) for shape in param.shape]
        if not shapes and param.num:
            shapes = [(n, c, h, w) for n, c, h, w in zip(param.num, param.channels, param.height, param.width)]
    if len(shapes) == 1:
        return {top: shapes[0] for top in layer.top}
    return dict(zip(layer.top, shapes)) if len(shapes) == len(layer.top) else {}


_ELEMENTWISE = {"ReLU", "Sigmoid", "TanH", "Softmax", "Dropout", "BatchNorm", "Scale", "Bias", "Power", "PReLU",
                "ELU", "AbsVal", "BNLL", "Exp", "Log", "Threshold", "Split", "Eltwise", "MVN", "LRN", "Concat",
                "ReLU6", "HardSigmoid", "BN"}
_SPATIAL_OUTPUT = {"Convolution", "Deconvolution", "Crop", "Upsample", "Interp", "Pad", "BilinearInterpolate",
                   "MaxUnPool", "PixelShuffle"}
_FLAT_OUTPUT = {"InnerProduct", "Flatten", "ArgMax"}


def _guess_label_kind(layers, state, inputs):
    """('spatial'|'scalar', reason) from what the TRAIN-phase loss compares the label with, or None."""
    active = [layer for layer in layers if state.active(layer, caffe_pb2.TRAIN)]
    verdicts = set()
    reasons = []
    for position, layer in enumerate(active):
        if inputs.label not in layer.bottom or len(layer.bottom) != 2 or layer.top == layer.bottom:
            continue
        prediction = layer.bottom[0] if layer.bottom[1] == inputs.label else layer.bottom[1]
        blob, end = prediction, position
        verdict = None
        for _ in range(200):
            producer = next((i for i in range(end - 1, -1, -1) if blob in active[i].top), None)
            if producer is None:
                break
            source = active[producer]
            if source.type in _FLAT_OUTPUT or (source.type == "Pooling" and source.pooling_param.global_pooling):
                verdict = ("scalar", f"{_describe(layer)} compares it with {prediction!r}, an output of "
                                     f"{_describe(source)}")
                break
            if source.type in _SPATIAL_OUTPUT or source.type == "Pooling":
                verdict = ("spatial", f"{_describe(layer)} compares it with {prediction!r}, a map from "
                                      f"{_describe(source)}")
                break
            if source.type not in _ELEMENTWISE or not source.bottom:
                break
            blob, end = source.bottom[0], producer
        if verdict is None:
            return None
        verdicts.add(verdict[0])
        reasons.append(verdict[1])
    if len(verdicts) != 1:
        return None
    return verdicts.pop(), reasons[0]


def _label_kind(layers, state, inputs, old_augmentation, requested, where):
    """('spatial'|'scalar', why) for the TRAIN label; refuse when it cannot be told."""
    label_layer = layers[inputs.label_layer]
    what = f"label top {inputs.label!r} of {_describe(label_layer)}"
    known = None
    if old_augmentation is not None and len(old_augmentation.bottom) == 2 and \
            old_augmentation.bottom[1] == inputs.label:
        known = ("spatial", f"the existing augmentation layer {old_augmentation.name!r} transforms it with the image")
    elif label_layer.type in ("Data", "ImageData", "WindowData"):
        if len(label_layer.top) == 1 and inputs.label_layer != inputs.image_layer:
            known = ("spatial", "a Data layer of its own: the Datum's image is the label map (DIGITS segmentation)")
        else:
            known = ("scalar", f"the Datum's class label of a {label_layer.type} layer")
    elif label_layer.type in ("Input", "DummyData"):
        shapes = {}
        for index in {inputs.image_layer, inputs.label_layer}:
            shapes.update(_shapes_of(layers[index]))
        image_shape, label_shape = shapes.get(inputs.image), shapes.get(inputs.label)
        if image_shape and label_shape:
            size = "×".join(map(str, label_shape))
            if len(label_shape) >= 3 and len(image_shape) == 4 and label_shape[-2:] == image_shape[-2:]:
                known = ("spatial", f"declared {size}, the image's height and width")
            elif math.prod(label_shape[1:]) == 1:
                known = ("scalar", f"declared {size}, one value per sample")
            else:
                known = ("other", f"declared {size}, not the image's {'×'.join(map(str, image_shape))}")
    elif label_layer.type == "Python" and label_layer.python_param.module == PATCH_DATA_MODULE:
        known = ("spatial", "PatchDataLayer's N×1×P×P mask")
    if known is not None:
        if requested not in ("auto", known[0]) and known[0] != "other":
            raise ValueError(f"{where}: {what} is a {'per-pixel map' if known[0] == 'spatial' else 'class label'} "
                             f"({known[1]}); label={requested!r} contradicts that")
        if known[0] == "other" and requested == "spatial":
            raise ValueError(f"{where}: {what} is {known[1]}: the AugmentationLayer needs a label of the image's size")
        return known
    if requested != "auto":
        return requested, f"as asked (label={requested!r})"
    guess = _guess_label_kind(layers, state, inputs)
    if guess is None:
        raise ValueError(f"{where}: cannot tell whether {what} is a per-pixel map (segmentation: it must be augmented "
                         "with the image) or a class label (left alone); say which (label='spatial' or 'scalar', "
                         "--label spatial|scalar)")
    return guess[0], "guessed: " + guess[1]


# =========================================================================== parameters

def read_param_str_source(text):
    """The param_str text behind ``--param-str``: ``@file`` reads a file; else ``text`` itself.

    A file holding the ``--json`` output of ``caffe-stain-estimate`` (an object with ``params``
    and ``param_str``) gives its ``params``.
    """
    if text is None:
        return None
    text = str(text)
    where = "--param-str"
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--param-str file {str(path)!r} does not exist (or is not a file)")
        text = path.read_text(encoding="utf-8").strip()
        where = f"--param-str file {str(path)!r}"
    parsed = parse_param_str(text, where)
    if isinstance(parsed, Mapping) and "param_str" in parsed and isinstance(parsed.get("params"), Mapping):
        parsed = dict(parsed["params"])  # caffe-stain-estimate --json
    return parsed, where


def _literal(value):
    """A value in the Python-literal param_str style, floats exact (``repr``)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(str(key))}: {_literal(item)}" for key, item in value.items()) + "}"
    raise ValueError(f"cannot write parameter value {value!r} into a param_str")


def _known_keys(raw, where, drop_unknown, lines):
    """``raw`` without unknown keys (refused, with every unknown key named, unless dropped)."""
    valid = AUGMENT_SCHEMA.keys
    unknown = [key for key in raw if key not in valid]
    if not unknown:
        return dict(raw)
    described = []
    for key in unknown:
        close = difflib.get_close_matches(str(key)[:64], valid, n=1, cutoff=0.6)
        described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not drop_unknown:
        raise ParamError(f"{where} has key(s) the AugmentationLayer does not know: {', '.join(described)}; valid keys: "
                         f"{', '.join(valid)}; fix them there, or drop them (drop_unknown_keys / --drop-unknown-keys)",
                         where=where, key=str(unknown[0]), value=raw[unknown[0]])
    lines.append(f"  dropped unknown key(s) of {where}: {', '.join(described)}")
    return {key: value for key, value in raw.items() if key in valid}


# =========================================================================== layer builders

def _unique_name(wanted, taken):
    name, counter = wanted, 2
    while name in taken:
        name, counter = f"{wanted}_{counter}", counter + 1
    taken.add(name)
    return name


def _python_layer(name, module, layer_name, param_str, blobs):
    layer = caffe_pb2.LayerParameter(name=name, type="Python")
    layer.bottom.extend(blobs)
    layer.top.extend(blobs)
    layer.python_param.module = module
    layer.python_param.layer = layer_name
    layer.python_param.param_str = param_str
    return layer


def _op_layers(ops, blob, taken, phase=None):
    """Layers computing ``ops`` in place on ``blob`` (in ``phase`` only, or in every phase if None)."""
    suffix = "" if phase is None else "_" + _PHASES[phase].lower()
    layers = []
    for op in ops:
        kind = op[0]
        if kind == "mean_file":
            layer = _python_layer(_unique_name(f"{blob}_mean{suffix}", taken), MEAN_SUBTRACT_MODULE,
                                  MEAN_SUBTRACT_LAYER, _literal({"mean_file": op[1]}), [blob])
        elif kind == "mean_value" and len(op[1]) == 1:
            layer = caffe_pb2.LayerParameter(name=_unique_name(f"{blob}_mean{suffix}", taken), type="Power")
            layer.power_param.shift = -op[1][0]
        elif kind == "mean_value":
            layer = caffe_pb2.LayerParameter(name=_unique_name(f"{blob}_mean{suffix}", taken), type="Bias")
            layer.param.add(lr_mult=0, decay_mult=0)
            layer.bias_param.axis = 1
            layer.bias_param.num_axes = 1
            bias = layer.blobs.add()
            bias.shape.dim.append(len(op[1]))
            bias.data.extend(-value for value in op[1])
        elif kind == "mvn":
            layer = caffe_pb2.LayerParameter(name=_unique_name(f"{blob}_centre{suffix}", taken), type="MVN")
            layer.mvn_param.normalize_variance = False
            layer.mvn_param.across_channels = False
        elif kind == "scale":
            layer = caffe_pb2.LayerParameter(name=_unique_name(f"{blob}_scale{suffix}", taken), type="Power")
            layer.power_param.scale = op[1]
        else:  # pragma: no cover - internal
            raise AssertionError(op)
        if kind != "mean_file":
            layer.bottom.append(blob)
            layer.top.append(blob)
        if phase is not None:
            layer.include.add(phase=phase)
        layers.append(layer)
    return layers


def _describe_ops(ops):
    parts = []
    for op in ops:
        if op[0] == "mean_file":
            parts.append(f"subtract mean file {op[1]!r} (MeanSubtractLayer)")
        elif op[0] == "mean_value" and len(op[1]) == 1:
            parts.append(f"subtract {op[1][0]:g} (Power shift)")
        elif op[0] == "mean_value":
            parts.append("subtract per-channel mean " + ", ".join(f"{v:g}" for v in op[1]) + " (Bias, fixed blobs)")
        elif op[0] == "mvn":
            parts.append("subtract each patch's per-channel mean (MVN, normalize_variance: false)")
        elif op[0] == "scale":
            parts.append(f"multiply by {op[1]:g} (Power scale)")
    return "; then ".join(parts)


# =========================================================================== the rewrite

def _take_transform(layer, lines, state):
    """Remove mean_file/mean_value/scale from a data layer's transform_param; return the ops."""
    if not layer.HasField("transform_param"):
        return []
    param = layer.transform_param
    if param.HasField("mean_file") and param.mean_value:
        raise ValueError(f"{_describe(layer)}: transform_param has both mean_file and mean_value; Caffe refuses "
                         "that too")
    ops = []
    if param.HasField("mean_file"):
        ops.append(("mean_file", param.mean_file))
    elif param.mean_value:
        ops.append(("mean_value", tuple(param.mean_value)))
    if param.HasField("scale") and param.scale != 1.0:
        ops.append(("scale", param.scale))
    removed = [name for name in ("mean_file", "mean_value", "scale") if
               (param.HasField(name) if name != "mean_value" else param.mean_value)]
    for name in removed:
        param.ClearField(name)
    kept = [f"{descriptor.name}: {str(value).lower() if isinstance(value, bool) else value}"
            for descriptor, value in param.ListFields()
            if descriptor.message_type is None and not _is_repeated(descriptor)]
    if not param.ListFields():
        layer.ClearField("transform_param")
    if removed:
        lines.append(f"  {_describe(layer, state)}: removed {', '.join(removed)} from transform_param"
                     + (f" (kept {', '.join(kept)})" if kept else ""))
    if "mean_file" in removed and param.mirror and not param.crop_size:
        # Caffe's DataTransformer subtracts mean[x] from the pixel it moves to W-1-x.
        lines.append(f"  note: {_describe(layer, state)} mirrors after subtracting its mean file; after the "
                     "retrofit the mean is subtracted after mirroring, so a mirrored TRAIN sample is centred "
                     "on the left-right mirror of the mean it had (a difference of the mean image's asymmetry; "
                     "TEST is unchanged)")
    return ops


def _check_flow(layers, state, phase):
    """The first (layer, blob) whose bottom is not produced by an earlier layer in ``phase``, or None."""
    available = set()
    for layer in layers:
        if not state.active(layer, phase):
            continue
        for blob in layer.bottom:
            if blob not in available:
                return layer.name, blob
        available.update(layer.top)
    return None


def _rename_after(layers, start, old, new):
    """Consumers of blob ``old`` from ``start`` on read ``new`` instead (until ``old`` is produced anew)."""
    for layer in layers[start:]:
        bottoms_had = old in layer.bottom
        for i, blob in enumerate(layer.bottom):
            if blob == old:
                layer.bottom[i] = new
        redefined = False
        for i, blob in enumerate(layer.top):
            if blob == old:
                if bottoms_had:
                    layer.top[i] = new  # in place on the renamed blob
                else:
                    redefined = True
        if redefined:
            return


def retrofit(net, param_str=None, *, centring="keep", input_range=255, label="auto", image_top=None,
             label_top=None, deploy=None, drop_unknown_keys=False, where="net"):
    """Rewrite a train_val net so that it trains with the AugmentationLayer.

    Parameters
    ----------
    net : caffe_pb2.NetParameter
        The train_val net, any format (upgraded with :func:`upgrade_net`). Not modified.
    param_str : str, dict or None
        The augmentation parameters (JSON, YAML, a Python-literal dict or a dict). Keys given
        here override those of an existing augmentation layer; None takes that layer's alone.
    centring : {"keep", "patchmean"}
        ``keep``: the data layer's mean (file or values) is subtracted after the augmentation;
        ``patchmean``: each patch is centred on its own per-channel mean (``MVN``) instead,
        in the train net and the deploy net.
    input_range : {255, 1}
        White of the raw data blob. With 1, the param_str's ``color_b_*``, ``clip_*`` and
        ``max_value`` (given in 0-255 grey levels) are divided by 255.
    label : {"auto", "spatial", "scalar"}
        Whether the label is a per-pixel map (augmented with the image) or a class label; auto
        decides from the prototxt and refuses when it cannot.
    image_top, label_top : str, optional
        The data tops to use when their names do not tell (``label_top=""``: no label).
    deploy : caffe_pb2.NetParameter, optional
        The deploy net; with ``centring="patchmean"`` it gets the same centring after its input.
    drop_unknown_keys : bool
        Drop (and report) keys of a carried-over param_str that the AugmentationLayer does not
        know, instead of refusing.
    where : str
        Name of the net in messages.

    Returns
    -------
    RetrofitResult

    Raises
    ------
    ValueError
        (ParamError for parameters) for anything the rewrite cannot understand; nothing is
        returned half-done.
    """
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {', '.join(CENTRINGS)}; got {centring!r}")
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be 255 or 1; got {input_range!r}")
    if label not in LABEL_KINDS:
        raise ValueError(f"label must be one of {', '.join(LABEL_KINDS)}; got {label!r}")
    net, upgrade_notes = upgrade_net(net, where)
    lines = [f"{where}: {note}" for note in upgrade_notes]
    state = _State(net)
    layers = list(net.layer)
    train, test = caffe_pb2.TRAIN, caffe_pb2.TEST
    broken_before = {phase: _check_flow(layers, state, phase) for phase in _PHASES}

    # ---- an existing augmentation layer: take it out (its tops become its bottoms again)
    old_augmentations = [i for i, layer in enumerate(layers) if _is_augmentation(layer)]
    old_train = [i for i in old_augmentations if state.active(layers[i], train)]
    if len(old_train) > 1:
        raise ValueError(f"{where}: {len(old_train)} augmentation layers in the TRAIN phase ("
                         + ", ".join(repr(layers[i].name) for i in old_train) + "); expected at most one")
    old = copy.deepcopy(layers[old_train[0]]) if old_train else None
    for i in reversed(old_augmentations):
        layer = layers[i]
        if not 1 <= len(layer.bottom) <= 2 or len(layer.top) != len(layer.bottom):
            raise ValueError(f"{where}: augmentation {_describe(layer)} has {len(layer.bottom)} bottoms and "
                             f"{len(layer.top)} tops; expected image[, label] in and out")
        for bottom, top in zip(layer.bottom, layer.top):
            if bottom != top:
                _rename_after(layers, i + 1, top, bottom)
        del layers[i]
        lines.append(f"  - removed {_describe(layer, state)}, bottoms "
                     f"{', '.join(map(repr, layer.bottom))}: replaced by the AugmentationLayer below")

    # ---- the data layers and their tops
    if old is not None and image_top is None:
        data_tops = {top for layer in layers if state.active(layer, train) and _is_source(layer) for top in layer.top}
        if data_tops and old.bottom[0] not in data_tops:
            raise ValueError(f"{where}: the existing augmentation {_describe(old, state)} reads {old.bottom[0]!r}, "
                             f"not a top of the data layers ({', '.join(map(repr, sorted(data_tops)))}); put it "
                             "right after the data layer first, or remove it")
        image_top = old.bottom[0]
        if label_top is None and len(old.bottom) == 2:
            label_top = old.bottom[1]
    inputs = _find_inputs(layers, state, train, where, image_top, label_top)
    if inputs is None:
        sources = [layer.name for layer in layers if _is_source(layer)]
        staged = [layer.name for layer in layers if any(rule.stage for rule in layer.include)]
        hint = ""
        if staged:
            hint = (f"; layers {', '.join(map(repr, staged))} are included only in named stages (a DIGITS "
                    "all-in-one net?), which a plain TRAIN phase does not select")
        elif sources:
            hint = f"; its source layers {', '.join(map(repr, sources))} are not in the TRAIN phase"
        raise ValueError(f"{where}: no data layer in the TRAIN phase (Data, ImageData, WindowData, HDF5Data, Input, "
                         f"DummyData or a Python layer without bottoms){hint}")
    image_layer = layers[inputs.image_layer]
    label_name = inputs.label
    kind, why = (None, None)
    if label_name is not None:
        kind, why = _label_kind(layers, state, inputs, old, label, where)
    lines.append(f"  {_describe(image_layer, state)}: image top {inputs.image!r}")
    if label_name is not None:
        description = {"spatial": "per-pixel label map: augmented with the image",
                       "scalar": "class label: left alone", "other": "a map of another size: left alone"}[kind]
        lines.append(f"  {_describe(layers[inputs.label_layer], state)}: label top {label_name!r}, {description} "
                     f"({why})")
    else:
        lines.append("  no label top found: the image is augmented alone")
    for top, index in inputs.others:
        lines.append(f"  note: top {top!r} of {_describe(layers[index], state)} is left alone; if it is a "
                     "per-pixel map, the geometric augmentation will not be applied to it")

    # ---- the parameters: carried over (old layer, PatchDataLayer augment), then param_str
    bases = []
    if old is not None:
        where_old = f"param_str of {_describe(old)}"
        raw_old = parse_param_str(old.python_param.param_str, where_old)
        bases.append((where_old, _known_keys(raw_old, where_old, drop_unknown_keys, lines)))
    if image_layer.type == "Python" and image_layer.python_param.module == PATCH_DATA_MODULE:
        where_patch = f"param_str of {_describe(image_layer)}"
        raw_patch = parse_param_str(image_layer.python_param.param_str, where_patch)
        PATCH_DATA_SCHEMA.validate(raw_patch, where_patch)
        if raw_patch.get("augment") is not None:
            augment = raw_patch.pop("augment")
            bases.append((where_patch + " (augment)",
                          _known_keys(augment, where_patch + " 'augment'", drop_unknown_keys, lines)))
            layers[inputs.image_layer] = image_layer = copy.deepcopy(image_layer)
            image_layer.python_param.param_str = _literal(raw_patch)
            lines.append(f"  {_describe(image_layer, state)}: moved its 'augment' entry into the AugmentationLayer "
                         "(the data layer no longer augments)")
    given = {}
    given_where = "param_str"
    if param_str is not None:
        if isinstance(param_str, Mapping):
            given = dict(param_str)
        else:
            given = parse_param_str(param_str, "param_str")
        AUGMENT_SCHEMA.validate(given, given_where)
    elif not bases:
        raise ValueError(f"{where}: no param_str given and no existing augmentation layer to take one from")
    raw = {}
    for source_where, values in bases:
        AUGMENT_SCHEMA.validate(values, source_where)
        raw.update(values)
    raw.update(given)
    params = AUGMENT_SCHEMA.validate(raw, "the combined augmentation param_str")
    for source_where, values in bases:
        overridden = sorted(key for key in set(given) & set(values) if given[key] != values[key])
        lines.append(f"  carried over {len(values)} key(s) from {source_where}"
                     + (f"; the given param_str overrides {', '.join(overridden)}" if overridden else ""))

    # channel order and input range
    written = dict(raw)
    bgr_source = image_layer.type in TRANSFORMING_TYPES
    if params["hed"]:
        if "channel_order" not in raw and bgr_source:
            written["channel_order"] = "BGR"
            lines.append(f"  channel_order: BGR ({image_layer.type} layers deliver OpenCV/DIGITS BGR images; hed needs "
                         "to know which channel is red)")
        elif bgr_source and raw.get("channel_order") == "RGB":
            lines.append(f"  note: channel_order RGB was given, but {image_layer.type} layers normally deliver BGR")
        elif "channel_order" not in raw and not (
                image_layer.type == "Python" and image_layer.python_param.module == PATCH_DATA_MODULE):
            lines.append(f"  note: the channel order of {image_layer.type} data cannot be read from the prototxt: hed "
                         "assumes RGB (set channel_order if it is BGR)")
    if input_range == 1:
        too_small = [key for key in ("clip_max", "max_value") if key in raw and params[key] <= 1]
        if too_small:
            raise ValueError(f"{where}: input_range 1 divides the param_str's intensity values by 255, but "
                             + ", ".join(f"{key}={params[key]!r}" for key in too_small)
                             + " already look like 0-1 values; give them in 0-255 grey levels (as "
                             "caffe-stain-estimate prints them)")
        for key in _INTENSITY_KEYS:
            written[key] = params[key] / 255.0
        lines.append("  input range 0-1: " + ", ".join(f"{key} {params[key]:g} -> {written[key]:.6g}"
                                                       for key in _INTENSITY_KEYS))
    elif not bgr_source and not any(key in raw for key in _INTENSITY_KEYS) and not (
            image_layer.type == "Python" and image_layer.python_param.module == PATCH_DATA_MODULE):
        lines.append(f"  note: the data of {_describe(image_layer)} is assumed to be in 0-255 (clip_max 255); for "
                     "0-1 data use input range 1 (--input-range 1)")
    ordered = {key: written[key] for key in AUGMENT_SCHEMA.keys if key in written}
    final_str = _literal(ordered)
    params = AUGMENT_SCHEMA.validate(parse_param_str(final_str, "the written param_str"), "the written param_str")
    if not any(params[key] for key in _GEOMETRY_KEYS + ("color", "hed")):
        lines.append("  note: the param_str turns no augmentation on (rotate, flip, rotate_any, color, hed all off)")
    geometry = any(params[key] for key in _GEOMETRY_KEYS)
    if kind == "other" and geometry:
        raise ValueError(f"{where}: label top {label_name!r} is not the image's size, so the geometric augmentation "
                         "(rotate/flip/rotate_any) would misalign it; turn those off or feed a full-size label")
    second_labels = [top for top, _ in inputs.others if top in _loss_fed(layers, state, train)]
    if second_labels and geometry:
        raise ValueError(f"{where}: data top(s) {', '.join(map(repr, second_labels))} also feed a loss, but the "
                         f"AugmentationLayer carries one label ({label_name!r}) with the image: rotate/flip/rotate_any "
                         "would misalign the other; turn the geometric augmentation off (colour and hed only)")

    # ---- notes about the data layers as they are
    for phase in _PHASES:
        for index, layer in enumerate(layers):
            if not (state.active(layer, phase) and _is_source(layer)):
                continue
            words = _tokens(layer.python_param.param_str)
            if phase == train and layer.type == "Python" and any("mean" in word for word in words):
                lines.append(f"  note: {_describe(layer, state)} has a 'mean' in its param_str; if it subtracts a "
                             "mean, the augmentation sees centred data (move the centring after the augmentation "
                             "by hand)")
            if layer.type not in TRANSFORMING_TYPES and layer.HasField("transform_param") and phase == train:
                lines.append(f"  note: {_describe(layer, state)} has a transform_param, which Caffe's {layer.type} "
                             "layer ignores; left as is")

    # ---- per phase: the image producer's transform moves after the augmentation
    phase_inputs = {train: inputs}
    test_tops = {top for layer in layers if state.active(layer, test) and _is_source(layer) for top in layer.top}
    if test_tops:
        phase_inputs[test] = _find_inputs(
            layers, state, test, where, inputs.image if inputs.image in test_tops else None,
            label_name if label_name in test_tops else "")
    ops_by_phase = {}
    taken_ops = {}
    for phase, found in phase_inputs.items():
        index = found.image_layer
        producer = layers[index]
        ops = []
        if producer.type in TRANSFORMING_TYPES:
            if index not in taken_ops:
                layers[index] = producer = copy.deepcopy(producer)
                param = producer.transform_param
                crop = (f"{param.crop_size}×{param.crop_size}" if param.crop_size else
                        f"{param.crop_h}×{param.crop_w}" if param.crop_h and param.crop_w else None)
                had_mean_file = param.HasField("mean_file")
                taken_ops[index] = _take_transform(producer, lines, state)
                if had_mean_file and crop and centring == "keep":
                    lines.append(f"  note: {_describe(producer, state)} crops to {crop}, so its mean file (full image "
                                 "size) can no longer be subtracted pixel by pixel after the crop: MeanSubtractLayer "
                                 "falls back to the file's per-channel mean when the sizes differ (the output differs "
                                 "from the old one by the mean image's deviation from its channel means over the "
                                 "crop; not at all if the mean image is flat)")
            ops = list(taken_ops[index])
        if centring == "patchmean":
            ops = [("mvn",)] + [op for op in ops if op[0] == "scale"]
        ops_by_phase[phase] = (found.image, ops)
    if centring == "patchmean":
        centred = [layer.name for layer in layers
                   if inputs.image in layer.bottom and (layer.type == "MVN" or (
                       layer.type == "Python" and layer.python_param.module == MEAN_SUBTRACT_MODULE))]
        if centred:
            raise ValueError(f"{where}: {inputs.image!r} is already centred by layer(s) "
                             f"{', '.join(map(repr, centred))}; remove them to switch to per-patch centring")

    # label layers: independent random crops/mirrors
    if kind == "spatial" and inputs.label_layer != inputs.image_layer:
        label_param = layers[inputs.label_layer].transform_param
        image_param = image_layer.transform_param
        if (label_param.mirror or image_param.mirror or label_param.crop_size or image_param.crop_size) and \
                layers[inputs.label_layer].type in TRANSFORMING_TYPES:
            lines.append(f"  note: image and label come from separate layers ({image_layer.name!r}, "
                         f"{layers[inputs.label_layer].name!r}) with random mirror/crop in transform_param; Caffe "
                         "draws those independently for each layer, so image and label may not match (left as is; the "
                         "AugmentationLayer's own flips and rotations keep them aligned)")

    # ---- build the new layers
    taken = {layer.name for layer in layers}
    augment_blobs = [inputs.image] + ([label_name] if kind == "spatial" else [])
    augment = _python_layer(_unique_name("augment", taken), AUGMENTATION_MODULE, AUGMENTATION_LAYER, final_str,
                            augment_blobs)
    if not params["test_augment"]:
        augment.include.add(phase=train)
    # One chain for both phases when they need the same; else one per phase (include { phase }).
    if len(ops_by_phase) == 2 and ops_by_phase[train] == ops_by_phase[test]:
        blob, ops = ops_by_phase[train]
        chains = [(None, ops, _op_layers(ops, blob, taken))]
    else:
        chains = [(phase, ops, _op_layers(ops, blob, taken, phase)) for phase, (blob, ops) in ops_by_phase.items()]
    if params["test_augment"] and test in phase_inputs and kind == "spatial" and \
            phase_inputs[test].label != label_name:
        raise ValueError(f"{where}: test_augment is on, but the TEST phase has no label top {label_name!r}")

    source_indices = [found.image_layer for found in phase_inputs.values()]
    source_indices += [found.label_layer for found in phase_inputs.values() if found.label_layer is not None]
    train_end = max(i for i in (inputs.image_layer, inputs.label_layer) if i is not None)
    all_end = max(source_indices)
    new_layers = []
    inserted = set()  # positions of the new layers in new_layers (and in the output net)
    for index, layer in enumerate(layers):
        new_layers.append(layer)
        if index == train_end:
            inserted.add(len(new_layers))
            new_layers.append(augment)
        if index == all_end:
            for _, _, chain in chains:
                inserted.update(range(len(new_layers), len(new_layers) + len(chain)))
                new_layers.extend(chain)

    # ---- report the insertions
    lines.append(f"  + {_describe(augment, state)}, in place on "
                 f"{' and '.join(map(repr, augment_blobs))}, after {_describe(layers[train_end], state)}: "
                 f"param_str {final_str}")
    for phase, ops, chain in chains:
        for layer in chain:
            lines.append(f"  + {_describe(layer, state)}, in place on {layer.bottom[0]!r}")
        if ops:
            lines.append(f"    ({'both phases' if phase is None else _PHASES[phase]}: {_describe_ops(ops)}; "
                         "after the augmentation)")

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    out.layer.extend(new_layers)

    # ---- check: every bottom is produced in each phase where the input net was whole, and every
    # original consumer of the image/label reads them after the inserted layers
    for phase in _PHASES:
        if broken_before[phase] is None:
            problem = _check_flow(out.layer, state, phase)
            if problem is not None:
                raise ValueError(f"{where}: after the rewrite, layer {problem[0]!r} would read {problem[1]!r} before "
                                 f"any layer produces it in the {_PHASES[phase]} phase; the net's layer order is not "
                                 "one this rewrite understands")
        active = [(i, layer) for i, layer in enumerate(out.layer) if state.active(layer, phase)]
        for blob in augment_blobs:
            last = max((i for i, layer in active if i in inserted and blob in layer.top), default=None)
            if last is None:
                continue
            early = [layer.name for i, layer in active if i < last and i not in inserted and blob in layer.bottom]
            if early:
                raise ValueError(f"{where}: layer(s) {', '.join(map(repr, early))} read {blob!r} before the data "
                                 f"layers of the {_PHASES[phase]} phase are all done; move them after the data layers")
    for phase in _PHASES:
        if broken_before[phase] is not None and phase == train:
            lines.append(f"  note: the input net is not whole in the TRAIN phase (layer {broken_before[phase][0]!r} "
                         f"reads {broken_before[phase][1]!r}, which no earlier layer produces)")
    if image_layer.type in ("Input", "DummyData"):
        lines.append(f"  note: the new layers work in place on {inputs.image!r}: {image_layer.type} does not refill "
                     "it on every forward (Input: set it before each forward; a constant DummyData filler would be "
                     "changed anew by every pass)")

    deployed = None
    if deploy is not None:
        test_ops = ops_by_phase.get(test, ops_by_phase[train])[1]
        deployed = _retrofit_deploy(deploy, inputs.image, centring, test_ops, lines)
    return RetrofitResult(net=out, deploy=deployed, lines=lines, params=params, param_str=final_str)


def _retrofit_deploy(deploy, image, centring, ops, lines):
    deploy, notes = upgrade_net(deploy, "deploy net")
    lines.extend(f"deploy net: {note}" for note in notes)
    if centring != "patchmean":
        lines.append("deploy net: unchanged (upgraded to the V2 format if it was older); the TEST-phase output of the "
                     "train net is unchanged, so keep preparing the deploy input as before")
        return deploy
    state = _State(deploy)
    inputs = [(index, top) for index, layer in enumerate(deploy.layer) if layer.type == "Input"
              and state.active(layer, caffe_pb2.TEST) for top in layer.top]
    chosen = [(index, top) for index, top in inputs if top == image] or (inputs if len(inputs) == 1 else [])
    if not chosen:
        raise ValueError("deploy net: cannot find its image input: "
                         + (f"Input tops {', '.join(repr(t) for _, t in inputs)}, none named {image!r}" if inputs
                            else "it has no Input layer (nor input fields)"))
    index, top = chosen[0]
    centred = [layer.name for layer in deploy.layer if top in layer.bottom and layer.type == "MVN"]
    if centred:
        raise ValueError(f"deploy net: {top!r} is already centred by MVN layer(s) {', '.join(map(repr, centred))}")
    taken = {layer.name for layer in deploy.layer}
    chain = _op_layers(ops, top, taken)
    layers = list(deploy.layer)
    layers[index + 1:index + 1] = chain
    deploy.ClearField("layer")
    deploy.layer.extend(layers)
    for layer in chain:
        lines.append(f"deploy net: + {_describe(layer)}, in place on {top!r}, after {_describe(layers[index])}")
    scale = [op[1] for op in ops if op[0] == "scale"]
    lines.append(f"deploy net: {_describe_ops(ops)}. It now takes the raw image, as the train net's data layer "
                 "delivers it: do not subtract a mean before calling it"
                 + (f", and do not multiply by {scale[0]:g} either (the net does)" if scale else ""))
    return deploy


# =========================================================================== files

def net_to_text(net, header=None):
    """Prototxt text of a ``NetParameter`` (``header``: comment lines on top)."""
    head = "".join(f"# {line}\n" for line in (header or []))
    return head + text_format.MessageToString(net)


def retrofit_files(source, out, param_str=None, *, centring="keep", input_range=255, label="auto",
                   image_top=None, label_top=None, deploy=None, deploy_out=None, overwrite=False,
                   drop_unknown_keys=False):
    """Read ``source``, :func:`retrofit` it, write ``out`` (and ``deploy_out``) atomically.

    ``param_str`` may be the text itself or ``@file`` (see :func:`read_param_str_source`).
    Nothing is written if anything fails; no input file is ever replaced, and existing outputs
    only with ``overwrite``.

    Returns
    -------
    RetrofitResult
    """
    if (deploy is None) != (deploy_out is None):
        raise ValueError("a deploy net needs both the deploy prototxt and the deploy output path")
    inputs = [("the input net", source)] + ([("the deploy net", deploy)] if deploy is not None else [])
    outputs = [("the output", out)] + ([("the deploy output", deploy_out)] if deploy_out is not None else [])
    for out_what, out_path in outputs:
        for in_what, in_path in inputs:
            if same_file(out_path, in_path):
                raise ValueError(f"{out_path}: {out_what} would replace {in_what}; write it elsewhere")
    if len(outputs) == 2 and same_file(out, deploy_out):
        raise ValueError(f"{out}: the output and the deploy output are the same file")
    for _, out_path in outputs:
        out_path = Path(out_path)
        if out_path.is_dir():
            raise IsADirectoryError(f"{out_path}: is a folder, cannot write a file there")
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path}: already exists (use --overwrite to replace it)")
        folder = out_path.parent if str(out_path.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(f"{out_path}: output folder {folder} does not exist")
    given = None
    if param_str is not None:
        given, given_where = read_param_str_source(param_str)
        AUGMENT_SCHEMA.validate(given, given_where)  # named for the option, before anything else
    raw_net = parse_net(_read_text(source, "net prototxt"), str(source))
    raw_deploy = parse_net(_read_text(deploy, "deploy prototxt"), str(deploy)) if deploy is not None else None
    result = retrofit(raw_net, given, centring=centring, input_range=input_range, label=label,
                      image_top=image_top, label_top=label_top, deploy=raw_deploy,
                      drop_unknown_keys=drop_unknown_keys, where=str(source))
    header = [f"Retrofitted by caffe-stain-retrofit from {Path(source).name}: AugmentationLayer after the data "
              f"layers (TRAIN), centring {centring}."]
    texts = [(out, net_to_text(result.net, header))]
    if deploy_out is not None:
        texts.append((deploy_out, net_to_text(result.deploy, [f"Deploy twin of {Path(out).name}, from "
                                                             f"{Path(deploy).name} (centring {centring})."])))
    for path, text in texts:
        write_atomic(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)
    return result


def _read_text(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text prototxt ({error})") from None
