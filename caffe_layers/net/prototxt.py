"""Caffe prototxts: read (size-limited), upgrade V0/V1 nets to V2, filter layers by phase, write.

The one place the package reads and writes ``NetParameter`` and ``SolverParameter`` text, used by
the pre-flight checks, retrofit and the template generator:

* :func:`read_text_file` -- a prototxt's text, refused unread above :data:`MAX_PROTOTXT_BYTES`
  or when it is not UTF-8 (a binary ``.caffemodel`` given in its place);
* :func:`parse_net`, :func:`read_net_prototxt`, :func:`read_solver_prototxt` -- parsed as they
  are; :func:`read_net` -- parsed and upgraded to V2 with :func:`upgrade_net`, which follows
  Caffe's ``upgrade_proto.cpp`` step by step;
* :func:`layer_in_phase`, :func:`layers_in_phase` -- which layers Caffe's ``Net::FilterNet``
  keeps in a phase;
* :func:`net_to_text` -- prototxt text of a message, under optional comment lines.
"""
from __future__ import annotations

import copy
from pathlib import Path

from google.protobuf import text_format

from .proto import caffe_pb2

__all__ = [
    "MAX_PROTOTXT_BYTES",
    "is_repeated_field",
    "layer_in_phase",
    "layers_in_phase",
    "net_to_text",
    "parse_net",
    "read_net",
    "read_net_prototxt",
    "read_solver_prototxt",
    "read_text_file",
    "upgrade_net",
]

#: Larger text prototxts are refused unread (a real net is a few hundred kilobytes at most).
MAX_PROTOTXT_BYTES = 16 * 1024 * 1024


# =========================================================================== reading, writing

def read_text_file(path, what):
    """A prototxt's text: FileNotFoundError if missing, ValueError if too large or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_PROTOTXT_BYTES:
        raise ValueError(f"{what} {path} is {size} bytes, more than a text prototxt can be "
                         f"({MAX_PROTOTXT_BYTES} bytes); is it a binary file?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not a text prototxt (not UTF-8 at byte {error.start}); "
                         "a binary .caffemodel or .binaryproto given in its place?") from None


def _parse(text, message, where):
    # Merge, not Parse: a field given twice keeps its last value instead of failing the read,
    # so the checks after it can name the value that is wrong.
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as error:
        raise ValueError(f"{where} is not a valid prototxt: {error}") from None
    return message


def parse_net(text, where="net prototxt"):
    """Parse prototxt text into a ``NetParameter`` (no upgrade); ValueError naming ``where``."""
    return _parse(text, caffe_pb2.NetParameter(), where)


def read_net_prototxt(path):
    """Parse a net prototxt file (V1 ``layers`` or V2 ``layer``, not upgraded) into a ``NetParameter``."""
    return parse_net(read_text_file(path, "net prototxt"), f"net prototxt {path}")


def read_solver_prototxt(path):
    """Parse a solver prototxt file into a ``SolverParameter``."""
    return _parse(read_text_file(path, "solver prototxt"), caffe_pb2.SolverParameter(), f"solver prototxt {path}")


def read_net(path):
    """Read a net prototxt (V0, V1 or V2) and upgrade it to V2.

    Returns
    -------
    (net, notes) : (NetParameter, list of str)
        ``notes`` says which upgrades were applied.
    """
    return upgrade_net(read_net_prototxt(path), where=str(path))


def net_to_text(message, header=None):
    """Prototxt text of a ``NetParameter`` (or any message, e.g. a ``SolverParameter``);
    ``header``: comment lines on top."""
    head = "".join(f"# {line}\n" for line in (header or []))
    # str() is protobuf's own text printer (shortest floats: "power: 1"), which the committed
    # templates were written with; text_format.MessageToString would print "power: 1.0".
    return head + str(message)


# =========================================================================== upgrading V0/V1 to V2

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
    if is_repeated_field(descriptor):
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
            if (descriptor.message_type is not None and not is_repeated_field(descriptor)
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


def is_repeated_field(descriptor):
    """Whether a protobuf field descriptor is a repeated field, on old and new protobuf alike."""
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5; older ones have only ``label``
    return flag if flag is not None else descriptor.label == descriptor.LABEL_REPEATED



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


def layers_in_phase(net, phase, level=0, stages=()):
    """The layers (V2 ``layer`` or V1 ``layers``) of ``net`` that a net built in ``phase`` contains, in order."""
    return [layer for layer in list(net.layer) + list(net.layers) if layer_in_phase(layer, phase, level, stages)]
