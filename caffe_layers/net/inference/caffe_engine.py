"""A Caffe deploy net, in the conventions its model card describes, as a ``predict`` callable.

:class:`CaffeSegmenter` maps RGB 0-255 tiles to nucleus probabilities of the same size, whatever
the net's own conventions (:mod:`caffe_layers.model_card`: blob names, BGR, scaling, means,
raw scores, the nucleus channel) and output geometry, which is probed from the net's blob
shapes, not assumed:

* ``same`` -- the output has the input's size;
* ``margin`` -- smaller by ``m`` on each side (valid convolutions, a final Crop): the tile is
  reflect-padded by ``m`` first, so the map covers it;
* ``strided`` -- one output per ``s`` input pixels (FCN-style): the output is interpolated
  back to the input grid, aligned with the receptive-field centres;
* ``patch`` -- a patch classifier (``patch_classifier: true``): the map at each pixel is the
  classifier's output on the P×P patch centred there (the tile is reflect-padded by P/2),
  computed by batched sliding windows; with ``patch_stride: s`` only on every s-th pixel of
  each row and column (tiles start on multiples of s, so on one grid), interpolated between.

:attr:`CaffeSegmenter.context` is how many pixels of context each output pixel needs on each
side (when the geometry tells it); tools widen their tile overlap to twice that.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from ...model_card import ModelCard, card_means, preprocess
from ...param_str import parse_param_str
from ..checks import (CaffeAborted, available_memory, build_test_net, check_deploy_files, check_net_param,
                     check_weights_fit, survives_caffe)
from ..meanfile import read_mean_binaryproto
from ..prototxt import layers_in_phase, read_net_prototxt
from ..proto import caffe, caffe_pb2, require_pycaffe

__all__ = ["CaffeSegmenter", "build_self_contained_test_net", "prototxt_blobs", "resolve_mean_files", "use_cpu"]

#: Patches per forward pass of a patch classifier.
PATCH_BATCH = 256


def use_cpu():
    """Run Caffe on the CPU (this project's build has no GPU code); nothing to set without pycaffe."""
    if caffe is not None:
        caffe.set_mode_cpu()


def prototxt_blobs(param):
    """(input blob names, all top names) of a deploy ``NetParameter`` in the TEST phase."""
    inputs = set(param.input)
    tops = set(param.input)
    for layer in layers_in_phase(param, caffe_pb2.TEST):
        tops.update(layer.top)
        if getattr(layer, "type", None) == "Input":
            inputs.update(layer.top)
    return inputs, tops


def resolve_mean_files(param, folder):
    """Point relative mean files of MeanSubtractLayers at ``folder`` (the deploy's) when they are there.

    Caffe resolves them against the working directory; a model folder is self-contained when
    they resolve from the folder itself. Returns True if anything changed.
    """
    changed = False
    for layer in layers_in_phase(param, caffe_pb2.TEST):
        if getattr(layer, "type", None) != "Python" or layer.python_param.module != "caffe_layers.mean_subtract":
            continue
        values = parse_param_str(layer.python_param.param_str, f"layer {layer.name!r} param_str")
        mean = values.get("mean_file")
        if isinstance(mean, str) and not os.path.isabs(mean) and (folder / mean).is_file():
            values["mean_file"] = str((folder / mean).resolve())
            layer.python_param.param_str = json.dumps(values)
            changed = True
    return changed


def _has_mean_file_layer(param):
    return any(getattr(layer, "type", None) == "Python" and layer.python_param.module == "caffe_layers.mean_subtract"
               for layer in layers_in_phase(param, caffe_pb2.TEST))


def build_self_contained_test_net(param, path):
    """The TEST net of the deploy ``param`` read from ``path``, its mean files found beside it
    (:func:`resolve_mean_files`) whatever the working directory."""
    path = Path(path)
    if not resolve_mean_files(param, path.parent) and not _has_mean_file_layer(param):
        return build_test_net(path, path)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(text_format.MessageToString(param))
    try:
        return build_test_net(handle.name, path)
    finally:
        os.unlink(handle.name)


# Layers that keep positions where they are (the output pixel sits on the input pixel).
_POINTWISE = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Dropout",
              "BatchNorm", "Scale", "Bias", "Softmax", "MVN", "LRN", "Eltwise", "Concat", "Split", "Threshold",
              "Python"}


def _receptive_field(param, output_blob):
    """``(stride, offset)``: output pixel j of ``output_blob`` is centred on input pixel offset + stride*j.

    Follows the chain of layers that produces the blob (first bottoms), composing each
    Convolution's and Pooling's kernel, stride, pad and dilation. None when the chain holds a
    layer whose geometry is not one of those (Deconvolution, Crop, InnerProduct, ...).
    """
    chain, blob = [], output_blob
    for layer in reversed(layers_in_phase(param, caffe_pb2.TEST)):
        if blob in layer.top:
            chain.append(layer)  # an in-place layer keeps the blob's name: keep looking for it
            if layer.bottom and layer.bottom[0] != blob:
                blob = layer.bottom[0]
    stride, offset = 1, 0.0
    for layer in reversed(chain):
        kind = getattr(layer, "type", None)
        if kind in _POINTWISE or kind in ("Input",):
            continue
        if kind == "Convolution":
            conv = layer.convolution_param
            kernel = (conv.kernel_size[0] if conv.kernel_size else conv.kernel_h) or 1
            step = (conv.stride[0] if conv.stride else conv.stride_h) or 1
            pad = (conv.pad[0] if conv.pad else conv.pad_h) or 0
            dilation = conv.dilation[0] if conv.dilation else 1
        elif kind == "Pooling":
            pool = layer.pooling_param
            if pool.global_pooling:
                return None
            kernel = pool.kernel_size or pool.kernel_h
            step = pool.stride or pool.stride_h or 1
            pad = pool.pad or pool.pad_h
            dilation = 1
        else:
            return None
        offset += stride * (-pad + (dilation * (kernel - 1)) / 2.0)
        stride *= step
    return stride, offset


def _softmax(scores):
    shifted = scores - scores.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def _reflect_pad(batch, top, bottom, left, right):
    if not (top or bottom or left or right):
        return batch
    return np.pad(batch, ((0, 0), (0, 0), (top, bottom), (left, right)), mode="reflect")


class CaffeSegmenter:
    """A Caffe deploy net as a ``predict`` callable for :func:`~caffe_layers.tiling.segment_tiled`.

    Parameters
    ----------
    deploy_prototxt : path
        The deploy net.
    weights : path
        Its ``.caffemodel``; checked against the net before Caffe loads it.
    card : ModelCard, optional
        The net's conventions (default: the project's -- ``data`` RGB 0-255 in, ``prob``
        softmax out, nucleus = channel 1).

    Attributes
    ----------
    geometry : str
        ``same``, ``margin``, ``strided`` or ``patch``.
    context : int or None
        Pixels of context per side each output pixel needs, when known.

    Notes
    -----
    The compute mode (CPU/GPU) is left as the caller set it. The net, the card and the
    weights are all checked before Caffe builds anything: a card that does not fit (missing
    blob, class index out of range, mean of the wrong shape) is a ValueError.
    """

    def __init__(self, deploy_prototxt, weights, card=None):
        require_pycaffe("the Caffe engine")
        deploy_prototxt, weights = check_deploy_files(deploy_prototxt, weights)
        self.card = card = card if card is not None else ModelCard()
        # Everything Caffe would abort on is checked first: the net, the card, then the weights.
        param = read_net_prototxt(deploy_prototxt)
        check_net_param(param, str(deploy_prototxt), caffe_pb2.TEST)
        inputs, tops = prototxt_blobs(param)
        if card.input_blob not in inputs:
            raise ValueError(f"{deploy_prototxt}: the net has no input blob {card.input_blob!r} "
                             f"(inputs: {sorted(inputs) or 'none'}); set input_blob in the model card")
        if card.output_blob not in tops:
            raise ValueError(f"{deploy_prototxt}: the net has no output blob {card.output_blob!r} "
                             f"(blobs: {', '.join(sorted(tops))}); set output_blob in the model card")
        self.deploy_prototxt, self.weights = deploy_prototxt, weights
        self._param = param
        self._checked_shapes = set()  # input shapes already tried in a child (see _reshape)
        self.net = self._build(param, deploy_prototxt)
        check_weights_fit(self.net, weights)
        self.net.copy_from(str(weights))
        self._in = self.net.blobs[card.input_blob]
        channels = self._in.data.shape[1]
        if channels != 3:
            raise ValueError(f"{deploy_prototxt}: input blob {card.input_blob!r} has {channels} channels; "
                             "the tools feed RGB (3-channel) tiles")
        self.mean = card_means(card, read_mean_binaryproto)
        if self.mean is not None and self.mean.shape[0] not in (1, channels):
            raise ValueError(f"{card.source}: the mean has {self.mean.shape[0]} channels, the net's input {channels}")
        if self.mean is not None and self.mean.shape[0] == 1 and channels != 1:
            self.mean = np.repeat(self.mean, channels, axis=0)
        self._probe(tuple(self._in.data.shape))

    def _build(self, param, path):
        return build_self_contained_test_net(param, path)

    def check_input_shape(self, shape):
        """Refuse (ValueError) an ``(N, 3, H, W)`` input Caffe would abort on or memory could not hold."""
        self._reshape(tuple(int(s) for s in shape))

    def _reshape(self, shape):
        """Reshape the net to a ``shape`` input, first in a child for a shape not seen before:
        Caffe aborts on an input too small for a layer, and memory must suffice."""
        if shape not in self._checked_shapes:
            def trial():
                self._in.reshape(*shape)
                self.net.reshape()
                return 4 * sum(blob.count for blob in self.net.blobs.values())
            size = "×".join(map(str, shape))
            needed = survives_caffe(trial, str(self.deploy_prototxt), f"run the net on a {size} input")
            available = available_memory()
            if needed is not None and available is not None and needed > available:
                raise CaffeAborted(f"{self.deploy_prototxt}: a {size} input needs at least {needed / 2**30:.1f} GiB "
                                   f"for the net's blobs, more than the {available / 2**30:.1f} GiB of memory "
                                   "available; use a smaller --tile or --batch-tiles")
            self._checked_shapes.add(shape)
        self._in.reshape(*shape)
        self.net.reshape()

    def _output_shape(self, height, width, batch=1):
        shape = (batch, 3, height, width)
        if tuple(self._in.data.shape) != shape:
            self._reshape(shape)
        return tuple(self.net.blobs[self.card.output_blob].data.shape)

    def _check_classes(self, classes):
        if self.card.foreground_class >= classes:
            raise ValueError(f"{self.card.source}: foreground_class {self.card.foreground_class} is out of range: "
                             f"output blob {self.card.output_blob!r} has {classes} channels")
        if classes < 2 and self.card.output == "scores":
            raise ValueError(f"{self.card.source}: a softmax over 1 channel is always 1; "
                             "output: scores needs 2 or more classes")

    def _probe(self, declared):
        card, where = self.card, str(self.deploy_prototxt)
        if card.patch_classifier:
            self.patch = declared[2:]
            out = self._output_shape(*self.patch)
            if len(out) == 4 and out[2:] != (1, 1) or len(out) not in (2, 4):
                raise ValueError(f"{where}: patch_classifier is set, but a {self.patch} input gives output "
                                 f"{out}, not one score vector per patch")
            self._check_classes(out[1])
            # Output j of a tile sits on its pixel j * patch_stride (tiles start on multiples of it).
            self.stride, self.offset = card.patch_stride, 0
            self.geometry, self.context = "patch", max(self.patch) // 2 + card.patch_stride - 1
            return
        fixed = [layer.name for layer in layers_in_phase(self._param, caffe_pb2.TEST)
                 if getattr(layer, "type", None) in ("InnerProduct", "Reshape", "Flatten")]
        if fixed:
            # Reshaping such a net to another input size aborts Caffe (a CHECK in InnerProduct).
            raise ValueError(f"{where}: layer {fixed[0]!r} fixes the input size, so the net cannot map an image "
                             "to a class map; a patch classifier needs patch_classifier: true in the model card")
        multiple = card.size_multiple
        size1 = -(-64 // multiple) * multiple
        size2 = size1 + -(-32 // multiple) * multiple
        out1, out2 = self._output_shape(size1, size1), self._output_shape(size2, size2)
        if len(out1) != 4 or (out1[2:] == out2[2:]):
            raise ValueError(f"{where}: output blob {card.output_blob!r} has shape {out1} for a {size1}×{size1} input "
                             f"and {out2} for {size2}×{size2}: no class map; a patch classifier needs "
                             "patch_classifier: true in the model card")
        self._check_classes(out1[1])
        grow = out2[2] - out1[2]
        if out1[2:] == (size1, size1):
            self.geometry, self.context = "same", None
        elif grow == size2 - size1 and (size1 - out1[2]) % 2 == 0 and out1[2] < size1 and out1[2] == out1[3]:
            self.geometry, self.margin = "margin", (size1 - out1[2]) // 2
            self.context = self.margin
        elif grow > 0 and (size2 - size1) % grow == 0 and (size2 - size1) // grow > 1:
            self.geometry = "strided"
            self.stride = (size2 - size1) // grow
            field = _receptive_field(self._param, card.output_blob)
            if field is not None and field[0] == self.stride:
                self.offset = field[1]
            else:  # layers this cannot follow: assume the output grid is centred on the input
                self.offset = ((size1 - 1) - (out1[2] - 1) * self.stride) / 2.0
            self.context = self.stride
        else:
            raise ValueError(f"{where}: cannot relate the output {out1[2:]} / {out2[2:]} to inputs "
                             f"{size1} / {size2}: neither the same size, nor smaller by a margin, nor strided")

    def _forward(self, net_input):
        self._output_shape(net_input.shape[2], net_input.shape[3], net_input.shape[0])
        self._in.data[...] = net_input
        self.net.forward()
        out = np.array(self.net.blobs[self.card.output_blob].data, dtype=np.float32)
        if self.card.output == "scores":
            out = _softmax(out)
        return out[:, self.card.foreground_class]

    def _upsample(self, fg, height, width):
        """Strided map (N, oh, ow) -> (N, height, width): output j sits on input offset + j*stride."""
        from scipy import ndimage

        rows = np.clip((np.arange(height) - self.offset) / self.stride, 0, fg.shape[1] - 1)
        cols = np.clip((np.arange(width) - self.offset) / self.stride, 0, fg.shape[2] - 1)
        grid = np.meshgrid(rows, cols, indexing="ij")
        return np.stack([ndimage.map_coordinates(plane, grid, order=1, mode="nearest") for plane in fg])

    def _patch_map(self, batch):
        n, _, height, width = batch.shape
        ph, pw = self.patch
        padded = _reflect_pad(batch, ph // 2, ph - 1 - ph // 2, pw // 2, pw - 1 - pw // 2)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (ph, pw), axis=(2, 3))  # N,3,H,W,ph,pw
        step = self.stride
        windows = windows[:, :, ::step, ::step]  # the patches centred on pixels 0, step, 2·step, ...
        rows, cols = windows.shape[2:4]
        # A view (N, rows, cols, 3, ph, pw): only PATCH_BATCH windows at a time are copied out, so
        # memory stays bounded (all windows of a 256² tile with a 65×65 patch are 3.3 GB).
        windows = windows.transpose(0, 2, 3, 1, 4, 5)
        count = n * rows * cols
        fg = np.empty(count, np.float32)
        for start in range(0, count, PATCH_BATCH):
            index = np.unravel_index(np.arange(start, min(start + PATCH_BATCH, count)), (n, rows, cols))
            chunk = np.ascontiguousarray(windows[index])
            fg[start:start + len(chunk)] = self._forward(preprocess(chunk, self.card, self.mean)).reshape(len(chunk))
        fg = fg.reshape(n, rows, cols)
        return fg if step == 1 else self._upsample(fg, height, width)

    def __call__(self, batch):
        """RGB 0-255 tiles ``(N, 3, h, w)`` -> ``(N, 2, h, w)``: background and nucleus probability."""
        batch = np.asarray(batch, dtype=np.float32)
        n, _, height, width = batch.shape
        if self.geometry == "patch":
            fg = self._patch_map(batch)
        elif self.geometry == "margin":
            m = self.margin
            fg = self._forward(preprocess(_reflect_pad(batch, m, m, m, m), self.card, self.mean))
        else:
            fg = self._forward(preprocess(batch, self.card, self.mean))
            if self.geometry == "strided":
                fg = self._upsample(fg, height, width)
        if fg.shape[1:] != (height, width):
            raise ValueError(f"{self.deploy_prototxt}: the net returned a {fg.shape[1:]} map for a "
                             f"{height}×{width} tile (geometry {self.geometry})")
        return np.stack([1.0 - fg, fg], axis=1)
