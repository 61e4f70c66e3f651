"""Caffe deploy nets to ONNX: the project's own converter (no caffe2onnx), layer by layer.

:func:`caffe_to_onnx` reads a deploy prototxt (upgraded to V2 by :mod:`caffe_layers.net.prototxt`)
and its ``.caffemodel`` (parsed with ``caffe_pb2``; pycaffe is not needed) and writes one ONNX
node group per Caffe layer, in the prototxt's order. The graph takes what the net's input blob
takes (for the project's nets: RGB 0-255, ``N×3×H×W``, batch and sides left free unless a layer
needs them fixed) and gives the net's output blob under its own name.

Layers converted (their TEST-phase behaviour): ``Input``, ``Convolution``, ``Deconvolution``,
``Pooling`` (MAX, AVE, global; Caffe's ceil rounding), ``ReLU`` (with ``negative_slope``),
``PReLU``, ``Concat``, ``Crop``, ``Eltwise`` (SUM with coefficients, PROD, MAX), ``BatchNorm``,
``Scale``, ``Bias``, ``InnerProduct``, ``Dropout`` and ``Split`` (identities), ``Softmax``,
``MVN``, ``Power``, ``Sigmoid``, ``TanH``, ``AbsVal`` and the project's mean-file centring
(``Python`` layer ``caffe_layers.mean_subtract.MeanSubtractLayer``: the mean image for inputs
of its size, else its per-channel mean, as the layer does). Any other layer raises
:class:`OnnxUnsupported` naming it and its type.

The converted net is checked against Caffe by the caller (``caffe-stain-export`` and the
``auto`` engine forward a probe tile through both).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...param_str import ParamError
from ...patches import MEAN_SUBTRACT_SCHEMA
from ...schema import load_params
from ..meanfile import read_mean_binaryproto
from ..prototxt import caffe_pb2, layers_in_phase, read_net
from .caffe_engine import resolve_mean_files

__all__ = ["OPSET", "SUPPORTED_LAYERS", "OnnxUnsupported", "caffe_to_onnx", "import_onnx", "read_caffemodel"]

OPSET = 18
SUPPORTED_LAYERS = ("Input", "Convolution", "Deconvolution", "Pooling", "ReLU", "PReLU", "Concat", "Crop", "Eltwise",
                    "BatchNorm", "Scale", "Bias", "InnerProduct", "Dropout", "Split", "Softmax", "MVN", "Power",
                    "Sigmoid", "TanH", "AbsVal", "Python (caffe_layers.mean_subtract.MeanSubtractLayer)")
MEAN_SUBTRACT = ("caffe_layers.mean_subtract", "MeanSubtractLayer")


class OnnxUnsupported(ValueError):
    """The net holds something the converter cannot express (the message names the layer)."""


def import_onnx():
    """The ``onnx`` module, or a ValueError saying how to install the optional extra."""
    try:
        import onnx
    except ImportError as error:
        raise ValueError(f"ONNX export needs the onnx package (pip install 'caffe-stain-augment[onnx]'): "
                         f"{error}") from None
    return onnx


def _blob_array(blob):
    if len(blob.shape.dim):
        shape = tuple(blob.shape.dim)
    else:  # legacy num/channels/height/width
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
    values = blob.data if len(blob.data) else blob.double_data
    return np.asarray(values, dtype=np.float32).reshape(shape)


def read_caffemodel(path):
    """``{layer name: [float32 arrays]}`` of a ``.caffemodel`` (V1 or V2 layers)."""
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(open(path, "rb").read())
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable .caffemodel ({error})") from None
    return {layer.name: [_blob_array(blob) for blob in layer.blobs]
            for layer in list(param.layer) + list(param.layers) if len(layer.blobs)}


def _first(values, fallback):
    return values[0] if len(values) else fallback


def _pair(message, single, repeated, fallback):
    """(h, w) of a convolution/pooling field given as ``single_h/_w``, a repeated field, or a default."""
    if message.HasField(single + "_h") or message.HasField(single + "_w"):
        return int(getattr(message, single + "_h")), int(getattr(message, single + "_w"))
    values = getattr(message, repeated)
    if not hasattr(values, "__len__"):  # pooling: one optional scalar
        return (int(values), int(values)) if message.HasField(repeated) else (fallback, fallback)
    if len(values) == 0:
        return fallback, fallback
    return int(values[0]), int(values[-1] if len(values) > 1 else values[0])


class _Graph:
    """ONNX nodes and initialisers under construction; Caffe blob names -> current tensor names."""

    def __init__(self, onnx, where):
        self.onnx, self.helper, self.where = onnx, onnx.helper, where
        self.nodes, self.initializers, self.tensors, self.names = [], [], {}, set()

    def fresh(self, base):
        name, count = base, 1
        while name in self.names:
            name, count = f"{base}_{count}", count + 1
        self.names.add(name)
        return name

    def const(self, base, array, dtype=np.float32):
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(self, op, inputs, base, **attributes):
        output = self.fresh(base)
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def bottom(self, layer, index=0):
        blob = layer.bottom[index]
        if blob not in self.tensors:
            raise OnnxUnsupported(f"{self.where}: layer {layer.name!r} reads blob {blob!r}, which no layer before "
                                  "it writes")
        return self.tensors[blob]


def _blobs(weights, layer, count, where):
    blobs = weights.get(layer.name, [])
    if len(blobs) < count:
        raise ValueError(f"{where}: layer {layer.name!r} ({layer.type}) needs {count} weight blob(s) in the "
                         f".caffemodel, found {len(blobs)}")
    return blobs


def _convolution(graph, layer, weights, transpose):
    conv = layer.convolution_param
    kernel = _pair(conv, "kernel", "kernel_size", 1)
    stride = _pair(conv, "stride", "stride", 1)
    pad = _pair(conv, "pad", "pad", 0)
    dilation = (int(_first(conv.dilation, 1)),) * 2
    blobs = _blobs(weights, layer, 2 if conv.bias_term else 1, graph.where)
    filters = blobs[0]
    if filters.ndim != 4:
        raise ValueError(f"{graph.where}: layer {layer.name!r}: weights of shape {filters.shape}, expected 4-D")
    inputs = [graph.bottom(layer), graph.const(layer.name + "_W", filters)]
    if conv.bias_term:
        inputs.append(graph.const(layer.name + "_B", blobs[1].reshape(-1)))
    attributes = dict(kernel_shape=list(kernel), strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]],
                      dilations=list(dilation), group=int(conv.group))
    return graph.node("ConvTranspose" if transpose else "Conv", inputs, layer.top[0], **attributes)


def _pooling(graph, layer):
    pool = layer.pooling_param
    x = graph.bottom(layer)
    method = caffe_pb2.PoolingParameter
    if pool.pool not in (method.MAX, method.AVE):
        raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r}: STOCHASTIC pooling has no ONNX conversion")
    if pool.global_pooling:
        return graph.node("GlobalMaxPool" if pool.pool == method.MAX else "GlobalAveragePool", [x], layer.top[0])
    kernel = _pair(pool, "kernel", "kernel_size", 0)
    stride = _pair(pool, "stride", "stride", 1)
    pad = _pair(pool, "pad", "pad", 0)
    attributes = dict(kernel_shape=list(kernel), strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]],
                      ceil_mode=1)  # Caffe rounds the output size up
    if pool.pool == method.MAX:
        return graph.node("MaxPool", [x], layer.top[0], **attributes)
    if any(pad):  # Caffe divides by the window clipped to the padded input: ONNX has no such mode
        raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r}: average pooling with padding divides by "
                              "Caffe's clipped window, which ONNX cannot express")
    return graph.node("AveragePool", [x], layer.top[0], count_include_pad=0, **attributes)


def _channel_shape(values):
    return np.asarray(values, np.float32).reshape(-1, 1, 1)


def _affine(graph, layer, x, scale=None, shift=None):
    """``x * scale + shift`` with per-channel (C, 1, 1) or scalar constants."""
    if scale is not None:
        x = graph.node("Mul", [x, graph.const(layer.name + "_scale", scale)], layer.top[0])
    if shift is not None:
        x = graph.node("Add", [x, graph.const(layer.name + "_shift", shift)], layer.top[0])
    return x


def _batch_norm(graph, layer, weights):
    mean, variance, factor = _blobs(weights, layer, 3, graph.where)[:3]
    factor = float(factor.reshape(-1)[0])
    factor = 0.0 if factor == 0 else 1.0 / factor
    eps = layer.batch_norm_param.eps if layer.batch_norm_param.HasField("eps") else 1e-5
    mean, variance = mean.reshape(-1) * factor, variance.reshape(-1) * factor
    scale = 1.0 / np.sqrt(variance.astype(np.float64) + eps)
    return _affine(graph, layer, graph.bottom(layer), _channel_shape(scale), _channel_shape(-mean * scale))


def _scale(graph, layer, weights):
    param = layer.scale_param if layer.type == "Scale" else layer.bias_param
    if len(layer.bottom) != 1:
        raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r}: {layer.type} of two bottoms has no ONNX "
                              "conversion here")
    if param.axis != 1 or param.num_axes != 1:
        raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r}: {layer.type} over axis {param.axis} "
                              f"(num_axes {param.num_axes}); only per-channel (axis 1, num_axes 1) is converted")
    x = graph.bottom(layer)
    if layer.type == "Bias":
        return _affine(graph, layer, x, shift=_channel_shape(_blobs(weights, layer, 1, graph.where)[0]))
    blobs = _blobs(weights, layer, 2 if param.bias_term else 1, graph.where)
    return _affine(graph, layer, x, _channel_shape(blobs[0]),
                   _channel_shape(blobs[1]) if param.bias_term else None)


def _crop(graph, layer):
    crop = layer.crop_param
    axis = crop.axis if crop.HasField("axis") else 2
    if axis < 0:
        axis += 4
    x, reference = graph.bottom(layer, 0), graph.bottom(layer, 1)
    axes = list(range(axis, 4))
    offsets = [int(crop.offset[0] if len(crop.offset) == 1 else crop.offset[i]) if len(crop.offset) else 0
               for i in range(len(axes))]
    shape = graph.node("Shape", [reference], layer.name + "_ref_shape")
    sizes = graph.node("Slice", [shape, graph.const(layer.name + "_from", [axis], np.int64),
                                 graph.const(layer.name + "_to", [4], np.int64)], layer.name + "_sizes")
    starts = graph.const(layer.name + "_starts", offsets, np.int64)
    ends = graph.node("Add", [starts, sizes], layer.name + "_ends")
    return graph.node("Slice", [x, starts, ends, graph.const(layer.name + "_axes", axes, np.int64)], layer.top[0])


def _eltwise(graph, layer):
    param = layer.eltwise_param
    inputs = [graph.bottom(layer, i) for i in range(len(layer.bottom))]
    operation = caffe_pb2.EltwiseParameter
    if param.operation == operation.PROD:
        op = "Mul"
    elif param.operation == operation.MAX:
        op = "Max"
    else:
        op = "Sum"
        if len(param.coeff):
            inputs = [x if c == 1 else graph.node("Mul", [x, graph.const(layer.name + "_coeff", c)], layer.name + "_x")
                      for x, c in zip(inputs, param.coeff)]
    return graph.node(op, inputs, layer.top[0])


def _inner_product(graph, layer, weights):
    param = layer.inner_product_param
    blobs = _blobs(weights, layer, 2 if param.bias_term else 1, graph.where)
    matrix = blobs[0].reshape(blobs[0].shape[-2:]) if blobs[0].ndim > 2 else blobs[0]
    flat = graph.node("Flatten", [graph.bottom(layer)], layer.name + "_flat", axis=int(param.axis))
    inputs = [flat, graph.const(layer.name + "_W", matrix)]
    if param.bias_term:
        inputs.append(graph.const(layer.name + "_B", blobs[1].reshape(-1)))
    return graph.node("Gemm", inputs, layer.top[0], transB=0 if param.transpose else 1)


def _mvn(graph, layer):
    param = layer.mvn_param
    axes = [1, 2, 3] if param.across_channels else [2, 3]
    x = graph.bottom(layer)
    axes_name = graph.const(layer.name + "_axes", axes, np.int64)
    mean = graph.node("ReduceMean", [x, axes_name], layer.name + "_mean", keepdims=1)
    centred = graph.node("Sub", [x, mean], layer.top[0])
    if not param.normalize_variance:
        return centred
    square = graph.node("Mul", [centred, centred], layer.name + "_square")
    variance = graph.node("ReduceMean", [square, axes_name], layer.name + "_var", keepdims=1)
    spread = graph.node("Add", [graph.node("Sqrt", [variance], layer.name + "_std"),
                                graph.const(layer.name + "_eps", param.eps)], layer.name + "_std_eps")
    return graph.node("Div", [centred, spread], layer.top[0])


def _power(graph, layer):
    param = layer.power_param
    x = _affine(graph, layer, graph.bottom(layer), None if param.scale == 1 else np.float32(param.scale),
                None if param.shift == 0 else np.float32(param.shift))
    if param.power != 1:
        x = graph.node("Pow", [x, graph.const(layer.name + "_power", param.power)], layer.top[0])
    elif x == graph.bottom(layer):
        x = graph.node("Identity", [x], layer.top[0])
    return x


def _mean_subtract(graph, layer):
    where = f"{graph.where}: layer {layer.name!r} param_str"
    try:
        params = load_params(layer.python_param.param_str, MEAN_SUBTRACT_SCHEMA, where)
        mean = read_mean_binaryproto(params["mean_file"]).astype(np.float32)
    except (OSError, ParamError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    if params["crop_centre"]:
        raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r}: MeanSubtractLayer with crop_centre has no "
                              "ONNX conversion here")
    x = graph.bottom(layer)
    channel_mean = mean.mean(axis=(1, 2))[:, None, None]
    if np.array_equal(mean, np.broadcast_to(channel_mean, mean.shape)):  # flat: one value per channel
        return graph.node("Sub", [x, graph.const(layer.name + "_mean", channel_mean)], layer.top[0])
    # The mean image for inputs of its size, else its per-channel mean (mean_to_subtract's rule).
    helper, onnx = graph.helper, graph.onnx
    shape = graph.node("Shape", [x], layer.name + "_shape")
    sides = graph.node("Slice", [shape, graph.const(layer.name + "_two", [2], np.int64),
                                 graph.const(layer.name + "_four", [4], np.int64)], layer.name + "_sides")
    same = graph.node("Equal", [sides, graph.const(layer.name + "_mean_sides", mean.shape[1:], np.int64)],
                      layer.name + "_same_sides")
    both = graph.node("ReduceMin", [graph.node("Cast", [same], layer.name + "_same_int", to=onnx.TensorProto.INT64)],
                      layer.name + "_both", keepdims=0)
    condition = graph.node("Cast", [both], layer.name + "_is_mean_size", to=onnx.TensorProto.BOOL)
    branches = {}
    for branch, value in (("image", mean), ("channels", channel_mean)):
        constant = graph.fresh(f"{layer.name}_{branch}_mean")
        out = graph.fresh(f"{layer.name}_{branch}_out")
        subgraph = helper.make_graph(
            [helper.make_node("Constant", [], [constant], value=onnx.numpy_helper.from_array(value, constant)),
             helper.make_node("Sub", [x, constant], [out])],
            f"{layer.name}_{branch}", [], [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                                                            [None] * 4)])
        branches[branch] = subgraph
    return graph.node("If", [condition], layer.top[0], then_branch=branches["image"],
                      else_branch=branches["channels"])


_SIMPLE = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "Dropout": "Identity"}


def _layer(graph, layer, weights):
    """The ONNX tensor of ``layer``'s first top (its other tops, e.g. a Split's, alias it)."""
    kind = layer.type
    if kind in ("Convolution", "Deconvolution"):
        return _convolution(graph, layer, weights, transpose=kind == "Deconvolution")
    if kind == "Pooling":
        return _pooling(graph, layer)
    if kind == "ReLU":
        slope = layer.relu_param.negative_slope
        if slope:
            return graph.node("LeakyRelu", [graph.bottom(layer)], layer.top[0], alpha=float(slope))
        return graph.node("Relu", [graph.bottom(layer)], layer.top[0])
    if kind == "PReLU":
        slope = _blobs(weights, layer, 1, graph.where)[0].reshape(-1)
        slope = slope if layer.prelu_param.channel_shared else _channel_shape(slope)
        return graph.node("PRelu", [graph.bottom(layer), graph.const(layer.name + "_slope", slope)], layer.top[0])
    if kind == "Concat":
        axis = layer.concat_param.axis if not layer.concat_param.HasField("concat_dim") else \
            layer.concat_param.concat_dim
        return graph.node("Concat", [graph.bottom(layer, i) for i in range(len(layer.bottom))], layer.top[0],
                          axis=int(axis))
    if kind == "Crop":
        return _crop(graph, layer)
    if kind == "Eltwise":
        return _eltwise(graph, layer)
    if kind == "BatchNorm":
        return _batch_norm(graph, layer, weights)
    if kind in ("Scale", "Bias"):
        return _scale(graph, layer, weights)
    if kind == "InnerProduct":
        return _inner_product(graph, layer, weights)
    if kind == "Split":
        return graph.bottom(layer)
    if kind == "Softmax":
        return graph.node("Softmax", [graph.bottom(layer)], layer.top[0], axis=int(layer.softmax_param.axis))
    if kind == "MVN":
        return _mvn(graph, layer)
    if kind == "Power":
        return _power(graph, layer)
    if kind in _SIMPLE:
        return graph.node(_SIMPLE[kind], [graph.bottom(layer)], layer.top[0])
    if kind == "Python" and (layer.python_param.module, layer.python_param.layer) == MEAN_SUBTRACT:
        return _mean_subtract(graph, layer)
    what = f"Python layer {layer.python_param.module}.{layer.python_param.layer}" if kind == "Python" else kind
    raise OnnxUnsupported(f"{graph.where}: layer {layer.name!r} of type {what} has no ONNX conversion "
                          f"(converted: {', '.join(SUPPORTED_LAYERS)})")


def _set_output_rank(onnx, model):
    """Give the graph's output the rank shape inference finds (ONNX wants a shape on outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    output = model.graph.output[0]
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.name == output.name and info.type.tensor_type.HasField("shape"):
            rank = len(info.type.tensor_type.shape.dim)
            break
    else:
        rank = 4
    output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, onnx.TensorProto.FLOAT, [None] * rank))


def _fixed_sides(layers):
    """Whether the graph's input sides must be fixed (a layer that flattens or reads all positions)."""
    return any(layer.type == "InnerProduct" or (layer.type == "Pooling" and layer.pooling_param.global_pooling)
               for layer in layers)


def caffe_to_onnx(deploy_prototxt, weights, *, output_blob="prob", input_blob=None):
    """Convert a deploy net and its weights to an ``onnx.ModelProto`` (checked by ``onnx.checker``).

    Parameters
    ----------
    deploy_prototxt, weights : path
        The deploy net (any Caffe prototxt version) and its ``.caffemodel``. Mean files named
        by the net are read as Caffe reads them (relative to the working directory).
    output_blob : str
        The blob the graph returns (the model card's ``output_blob``).
    input_blob : str, optional
        The image's blob (default: the net's first input).

    Returns
    -------
    onnx.ModelProto
        Input ``input_blob`` of shape ``N×C×H×W`` (N, H, W free unless an InnerProduct or
        global pooling fixes H and W to the prototxt's), output ``output_blob``.

    Raises
    ------
    OnnxUnsupported
        A layer the converter does not cover (named in the message).
    ValueError
        Unreadable files, weights missing for a layer.
    """
    onnx = import_onnx()
    where = str(deploy_prototxt)
    param, _ = read_net(deploy_prototxt)
    resolve_mean_files(param, Path(deploy_prototxt).parent)  # a model folder is self-contained
    layers = layers_in_phase(param, caffe_pb2.TEST)
    weights_by_layer = read_caffemodel(weights)
    shapes = {name: list(shape.dim) for name, shape in zip(param.input, param.input_shape)}
    if param.input_dim:
        shapes[param.input[0]] = list(param.input_dim)[:4]
    for layer in layers:
        if layer.type == "Input":
            for index, top in enumerate(layer.top):
                shape = layer.input_param.shape[min(index, len(layer.input_param.shape) - 1)]
                shapes[top] = list(shape.dim)
    if not shapes:
        raise ValueError(f"{where}: the net has no input blob")
    input_blob = input_blob or next(iter(shapes))
    if input_blob not in shapes or len(shapes[input_blob]) != 4:
        raise ValueError(f"{where}: input blob {input_blob!r} is not a 4-D input of the net")
    graph = _Graph(onnx, where)
    graph.tensors[input_blob] = graph.fresh(input_blob)
    graph.names.add(output_blob)  # the graph's output: an Identity of the blob's last tensor
    for layer in layers:
        if layer.type == "Input":
            continue
        tensor = _layer(graph, layer, weights_by_layer)
        for top in layer.top:
            graph.tensors[top] = tensor
    if output_blob not in graph.tensors:
        raise ValueError(f"{where}: the net has no output blob {output_blob!r}")
    graph.nodes.append(onnx.helper.make_node("Identity", [graph.tensors[output_blob]], [output_blob],
                                             name=output_blob + "_output"))
    output = output_blob
    channels, fixed = shapes[input_blob][1], _fixed_sides(layers)
    dims = ["N", channels] + (shapes[input_blob][2:] if fixed else ["H", "W"])
    model_graph = onnx.helper.make_graph(
        graph.nodes, "caffe-stain-augment:" + (param.name or "net"),
        [onnx.helper.make_tensor_value_info(graph.tensors[input_blob], onnx.TensorProto.FLOAT, dims)],
        [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)], graph.initializers)
    model = onnx.helper.make_model(model_graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="caffe-stain-augment")
    _set_output_rank(onnx, model)
    model.ir_version = min(model.ir_version, 8)  # readable by every onnxruntime of the pinned range
    onnx.checker.check_model(model)
    return model
