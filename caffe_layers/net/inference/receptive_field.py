"""How far a deploy net looks: the receptive-field radius of its output, from the prototxt alone.

Tiling is seam-free when neighbouring tiles overlap by twice the radius (see
:mod:`caffe_layers.tiling`), so the tools take the overlap from here instead of a fixed 64
pixels. Each blob is followed along one spatial axis as ``(J, a, b)``: pixel ``i`` of the blob
sits on input pixel ``J·i`` and depends on input pixels ``J·i + a … J·i + b`` (``J`` may be a
fraction after an upsampling). Every path through the graph is followed (U-Net skip
connections, Concat, Eltwise take the widest of their inputs), so the result is an upper bound
of what the weights can reach.

Convolution and Pooling ``(k, s, p, d)``: ``J' = J·s``, ``a' = a − J·p``, ``b' = b + J·(d(k−1) − p)``.
Deconvolution: output ``i`` takes inputs ``j`` with ``s·j − p + t = i``, ``0 ≤ t < k``, so
``J' = J/s``, ``a' = a + J(p − k + 1)/s``, ``b' = b + J·p/s`` (bounds, whatever the phase of ``i``).
Crop by ``o``: ``a + J·o``, ``b + J·o``. Layers that act pixel by pixel keep ``(J, a, b)``;
``MVN`` and the mean-subtract layer are counted as pixel by pixel (their statistics are the
tile's or the mean file's, see :mod:`caffe_layers.tiling`). Anything that mixes all positions
(InnerProduct, global pooling, Reshape, ...) has no finite field: ``None``.
"""
from __future__ import annotations

import math

from ..prototxt import caffe_pb2, layers_in_phase

__all__ = ["receptive_radius"]

# Layers whose output pixel depends on the same input pixel only.
_POINTWISE = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Dropout",
              "BatchNorm", "Scale", "Bias", "Softmax", "MVN", "Split", "Threshold", "Python", "Clip",
              "Swish"}
_MERGE = {"Concat", "Eltwise"}


def _first(values, fallback):
    return values[0] if len(values) else fallback


def _own(message, field, repeated, fallback):
    """A convolution's ``field_h`` when set, else the first of ``repeated``, else ``fallback``."""
    if message.HasField(field):
        return getattr(message, field)
    return _first(getattr(message, repeated), fallback)


def _kernel(conv):
    return (_own(conv, "kernel_h", "kernel_size", 1), _own(conv, "stride_h", "stride", 1),
            _own(conv, "pad_h", "pad", 0), _first(conv.dilation, 1))


def _step(layer, inputs):
    """``(J, a, b)`` of a layer's tops from those of its bottoms, or None (no finite field)."""
    kind = layer.type
    if kind in _MERGE:
        if len({j for j, _, _ in inputs}) != 1:
            return None
        return inputs[0][0], min(a for _, a, _ in inputs), max(b for _, _, b in inputs)
    jump, a, b = inputs[0]
    if kind in _POINTWISE:
        return jump, a, b
    if kind == "LRN":  # across channels: pointwise; within a channel: a local_size window
        within = layer.lrn_param.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        half = (layer.lrn_param.local_size - 1) / 2 if within else 0
        return jump, a - jump * half, b + jump * half
    if kind == "Convolution":
        k, s, p, d = _kernel(layer.convolution_param)
        return jump * s, a - jump * p, b + jump * (d * (k - 1) - p)
    if kind == "Pooling":
        pool = layer.pooling_param
        if pool.global_pooling:
            return None
        k = pool.kernel_h if pool.HasField("kernel_h") else pool.kernel_size
        s = pool.stride_h if pool.HasField("stride_h") else pool.stride
        p = pool.pad_h if pool.HasField("pad_h") else pool.pad
        return jump * s, a - jump * p, b + jump * (k - 1 - p)
    if kind == "Deconvolution":
        k, s, p, d = _kernel(layer.convolution_param)
        k = d * (k - 1) + 1
        return jump / s, a + jump * (p - k + 1) / s, b + jump * p / s
    if kind == "Crop":
        crop = layer.crop_param
        axis = crop.axis if crop.HasField("axis") else 2
        offset = 0
        if axis <= 2 and len(crop.offset):
            offset = crop.offset[min(len(crop.offset) - 1, 2 - axis)]
        return jump, a + jump * offset, b + jump * offset
    return None


def receptive_radius(param, output_blob, input_blob=None):
    """Receptive-field radius (input pixels, rounded up) of ``output_blob`` of a deploy net, or None.

    Parameters
    ----------
    param : caffe_pb2.NetParameter
        The deploy net (V2, as :func:`caffe_layers.net.prototxt.read_net` gives it).
    output_blob : str
    input_blob : str, optional
        The image's blob (default: the net's first input).

    Returns
    -------
    int or None
        The largest distance, along rows or columns, between an output pixel and an input pixel
        it depends on; None when a layer on the way mixes all positions or is not known here.
    """
    layers = layers_in_phase(param, caffe_pb2.TEST)
    if input_blob is None:
        inputs = list(param.input) + [top for layer in layers if layer.type == "Input" for top in layer.top]
        if not inputs:
            return None
        input_blob = inputs[0]
    fields = {input_blob: (1, 0.0, 0.0)}
    for layer in layers:
        if layer.type == "Input":
            continue
        known = [fields.get(bottom) for bottom in layer.bottom]
        if not known or any(f is None for f in known):
            result = None
        elif layer.type == "Crop":
            result = _step(layer, known[:1])  # the second bottom gives the size only
        else:
            result = _step(layer, known)
        for top in layer.top:
            fields[top] = result
    field = fields.get(output_blob)
    if field is None:
        return None
    _, a, b = field
    return int(math.ceil(max(-a, b, 0) - 1e-9))


def net_receptive_radius(deploy_prototxt, card=None):
    """:func:`receptive_radius` of a deploy prototxt's output blob (the card's, default ``prob``), or None.

    None too when the prototxt cannot be read here: the caller keeps its default overlap, and
    the engines report the file's problem themselves.
    """
    from ..prototxt import read_net

    try:
        param, _ = read_net(deploy_prototxt)
    except (OSError, ValueError):
        return None
    output = card.output_blob if card is not None else "prob"
    inputs = card.input_blob if card is not None else None
    return receptive_radius(param, output, inputs)
