"""Caffe deploy nets run by OpenCV's DNN module (``cv2.dnn.readNetFromCaffe``).

OpenCV's Caffe importer runs the U-Net templates' convolutions, pooling, ``Deconvolution``,
``Crop``, ``Concat``, ``Power`` and ``Softmax`` several times faster than this CPU Caffe, but
not everything a project net contains:

* ``MVN`` with ``normalize_variance: false`` (the per-patch centring): OpenCV's MVN layer
  refuses it at the first forward ("'normVariance' must be 'true'");
* ``MeanSubtractLayer`` (a Caffe ``Python`` layer, the mean-file centring): OpenCV cannot
  create a layer of type ``Python``.

:func:`plan_opencv_net` rewrites the ``NetParameter`` (with ``caffe_pb2``) so that OpenCV can
run it. A centring layer that sits on the input blob -- the first layer to read it, and the
only one unless it works in place, as in every template -- is dropped from the net and done
by the engine as a numpy pre-step, and the centred array is fed to the blob it wrote. One
further inside the net becomes a layer of a project type registered with
``cv2.dnn_registerLayer`` (``CaffeStainMVN``, ``CaffeStainMeanSubtract``), which computes what
Caffe's does. Any other ``Python`` layer is refused (:class:`OpenCVUnsupported`): the Caffe
engine then has to run the net.

Pre-steps compute what Caffe's layers do: the mean-file subtraction is
:class:`caffe_layers.mean_subtract.MeanSubtractLayer`'s own float32 arithmetic (the mean
image pixel by pixel for inputs of its size, else its per-channel mean), the MVN mean is
taken per sample (and per channel unless ``across_channels``) by the same float32 BLAS call as
Caffe's (``cblas_sgemv`` of the OpenBLAS that Caffe is linked to, so the centred input is
Caffe's to the bit). The only difference left from Caffe is float rounding in OpenCV's
layers (other summation orders), a few 1e-6 in the probabilities of the templates.

Mean files are read relative to the working directory, as Caffe reads them.
"""
from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import cv2
import numpy as np

from ...param_str import ParamError
from ...patches import MEAN_SUBTRACT_SCHEMA, mean_to_subtract
from ...schema import load_params
from ..checks import (check_deploy_files, check_net_param, check_weights_fit,
                      check_weights_fit_prototxt)
from ..meanfile import read_mean_binaryproto
from .caffe_engine import build_self_contained_test_net, resolve_mean_files, prototxt_blobs
from ..prototxt import layers_in_phase, read_net_prototxt
from ..proto import caffe, caffe_pb2

__all__ = ["CUSTOM_LAYER_TYPES", "OpenCVPlan", "OpenCVSegmenter", "OpenCVUnsupported", "opencv_has_caffe_importer",
           "plan_opencv_net"]

MEAN_SUBTRACT = ("caffe_layers.mean_subtract", "MeanSubtractLayer")
"""``python_param`` (module, layer) of the mean-file centring the engine implements itself."""

CUSTOM_LAYER_TYPES = {"MVN": "CaffeStainMVN", "MeanSubtract": "CaffeStainMeanSubtract"}
"""Layer types registered with ``cv2.dnn_registerLayer`` for centring layers inside a net
(project names: OpenCV's own ``MVN`` stays registered for the nets that it can run)."""


class OpenCVUnsupported(ValueError):
    """OpenCV cannot run this net (the message says which layer and why)."""


def opencv_has_caffe_importer():
    """True if this OpenCV can read Caffe nets (OpenCV 5 removed ``readNetFromCaffe``)."""
    return hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromCaffe")


# ---------------------------------------------------------------- what Caffe's layers compute

def _load_caffe_sgemv():
    """``cblas_sgemv`` of the OpenBLAS this Caffe build is linked to (loaded with it), or None."""
    try:
        library = ctypes.CDLL("libopenblas.so.0")
        function = library.cblas_sgemv
    except (OSError, AttributeError):
        return None
    floats = ctypes.POINTER(ctypes.c_float)
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, floats,
                         ctypes.c_int, floats, ctypes.c_int, ctypes.c_float, floats, ctypes.c_int]
    function.restype = None
    return function


_CAFFE_SGEMV = _load_caffe_sgemv()
_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS enums


def _row_means(rows):
    """Each row's mean as Caffe's MVN computes it: ``gemv(NoTrans, 1/n, rows, ones)`` in float32.

    In double the mean would be closer to the exact value, but not to Caffe's: its float32
    mean of a large tile is off by up to ~2e-4 grey levels, which a trained net turns into
    |Δp| of several 1e-5 at 1024-pixel tiles. Without Caffe's OpenBLAS, numpy's float32
    product (the same to the bit for power-of-two tile sides in the measurements, ~1e-4 grey
    levels apart otherwise).
    """
    count, size = rows.shape
    ones = np.ones(size, np.float32)
    if _CAFFE_SGEMV is None:
        return (rows @ ones) * np.float32(1.0 / size)
    means = np.zeros(count, np.float32)
    floats = ctypes.POINTER(ctypes.c_float)
    _CAFFE_SGEMV(_ROW_MAJOR, _NO_TRANS, count, size, ctypes.c_float(1.0 / size), rows.ctypes.data_as(floats),
                 size, ones.ctypes.data_as(floats), 1, ctypes.c_float(0.0), means.ctypes.data_as(floats), 1)
    return means


def mvn_centre(batch, across_channels=False):
    """Caffe ``MVN`` with ``normalize_variance: false``: subtract each sample's (channel's) mean.

    The means are Caffe's float32 ones (:func:`_row_means`), subtracted in float32 as Caffe does.
    """
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    n, c = batch.shape[:2]
    rows = batch.reshape(n if across_channels else n * c, -1)
    return batch - _row_means(rows).reshape((n, 1, 1, 1) if across_channels else (n, c, 1, 1))


def mvn_normalize(batch, across_channels=False, eps=1e-9):
    """Caffe ``MVN`` with ``normalize_variance: true``: ``(x - mean) / (std + eps)``."""
    axes = (1, 2, 3) if across_channels else (2, 3)
    centred = batch.astype(np.float64) - batch.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = np.sqrt((centred ** 2).mean(axis=axes, keepdims=True))
    return (centred / (std + eps)).astype(np.float32)


class MeanFile:
    """:class:`~caffe_layers.mean_subtract.MeanSubtractLayer`'s forward, without Caffe."""

    def __init__(self, param_str, where):
        where = f"{where} MeanSubtractLayer param_str"
        try:
            params = load_params(param_str, MEAN_SUBTRACT_SCHEMA, where)
            self.path = params["mean_file"]
            self.mean = read_mean_binaryproto(self.path)
        except (OSError, ParamError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        self.crop_centre = params["crop_centre"]

    def __call__(self, batch):
        if batch.ndim != 4 or batch.shape[1] != self.mean.shape[0]:
            raise ValueError(f"MeanSubtractLayer: input of shape {batch.shape} does not fit the mean file "
                             f"{self.path} ({self.mean.shape[0]} channels)")
        return batch - mean_to_subtract(self.mean, batch.shape[2:], self.crop_centre)


# ---------------------------------------------------------------- the rewrite

@dataclasses.dataclass
class OpenCVPlan:
    """A deploy net rewritten for OpenCV, and what the engine does around it."""

    net_param: caffe_pb2.NetParameter
    input_name: str  # the blob the (pre-processed) batch is fed to
    input_steps: list  # (description, callable batch -> batch), applied in order before the net
    custom_layers: list  # names of the layers OpenCV runs through a registered project layer type
    notes: list  # one sentence per change, for the engine's report

    def prototxt(self):
        return str(self.net_param)


def _centring_step(layer, where):
    """(description, numpy function, custom-layer type) of a layer OpenCV cannot run, or None."""
    if layer.type == "MVN":
        mvn = layer.mvn_param
        if mvn.normalize_variance:
            return None  # OpenCV's MVN runs it
        across = bool(mvn.across_channels)
        return (f"{layer.name!r} (MVN, normalize_variance: false"
                + (", across_channels" if across else "") + ")",
                lambda batch: mvn_centre(batch, across), CUSTOM_LAYER_TYPES["MVN"])
    if layer.type == "Python":
        module, name = layer.python_param.module, layer.python_param.layer
        if (module, name) != MEAN_SUBTRACT:
            raise OpenCVUnsupported(f"{where}: layer {layer.name!r} is a Caffe Python layer ({module}.{name}), "
                                    "which OpenCV cannot run")
        mean = MeanFile(layer.python_param.param_str, f"{where}: layer {layer.name!r}")
        return (f"{layer.name!r} ({name}, mean file {mean.path})", mean, CUSTOM_LAYER_TYPES["MeanSubtract"])
    return None


def plan_opencv_net(param, where="net"):
    """Rewrite a deploy ``NetParameter`` into one OpenCV's Caffe importer can run.

    Parameters
    ----------
    param : caffe_pb2.NetParameter
        A deploy net (its TEST-phase layers are kept, without their include/exclude rules).
    where : str
        The net's file name, for messages.

    Returns
    -------
    OpenCVPlan

    Raises
    ------
    OpenCVUnsupported
        For a net with a layer the engine cannot give OpenCV (a Python layer other than
        MeanSubtractLayer, or V1 ``layers``).
    ValueError
        For a MeanSubtractLayer whose param_str or mean file is bad.
    """
    if len(param.layers):
        raise OpenCVUnsupported(f"{where}: a V1-format net ('layers'); the OpenCV engine reads 'layer' nets only")
    layers = []
    for layer in layers_in_phase(param, caffe_pb2.TEST):
        copy = caffe_pb2.LayerParameter()
        copy.CopyFrom(layer)
        del copy.include[:]
        del copy.exclude[:]
        layers.append(copy)
    net = caffe_pb2.NetParameter()
    net.CopyFrom(param)
    del net.layer[:]
    inputs, _ = prototxt_blobs(param)
    if len(inputs) != 1:
        # More than one input: leave every centring layer to a registered layer type.
        input_name = "data"
    else:
        input_name = next(iter(inputs))
    steps, custom, notes = [], [], []
    kept = []
    reads_input_yet = False
    for index, layer in enumerate(layers):
        step = _centring_step(layer, where)
        on_input = (step is not None and not reads_input_yet and list(layer.bottom) == [input_name]
                    and len(layer.top) == 1 and len(inputs) == 1)
        if on_input:
            in_place = layer.top[0] == input_name
            later_readers = [other.name for other in layers[index + 1:] if input_name in other.bottom]
            on_input = in_place or not later_readers
        if on_input:
            description, function, _ = step
            steps.append((description, function))
            notes.append(f"{description} done as a numpy pre-step on the input {input_name!r}")
            input_name = _rename_input(net, kept, input_name, layer.top[0])
            continue
        if input_name in layer.bottom:
            reads_input_yet = True
        if step is not None:
            description, _, custom_type = step
            layer.type = custom_type
            custom.append(layer.name)
            notes.append(f"{description} run by the registered OpenCV layer type {custom_type}")
        kept.append(layer)
    net.layer.extend(kept)
    return OpenCVPlan(net, input_name, steps, custom, notes)


def _rename_input(net, kept_layers, old, new):
    """Make the net's input blob ``old`` be called ``new`` (the top of a dropped pre-step layer)."""
    if old == new:
        return new
    for index, name in enumerate(net.input):
        if name == old:
            net.input[index] = new
    for layer in kept_layers:
        if layer.type == "Input":
            for index, name in enumerate(layer.top):
                if name == old:
                    layer.top[index] = new
    return new


# ---------------------------------------------------------------- registered layer types

class _MVNLayer:
    """``CaffeStainMVN``: Caffe's MVN (either variance setting) as an OpenCV custom layer."""

    def __init__(self, params, blobs):
        self.across = bool(int(params.get("across_channels", 0)))
        self.normalize = bool(int(params.get("normalize_variance", 1)))
        self.eps = float(params.get("eps", 1e-9))

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return [inputs[0]]

    def forward(self, inputs):
        batch = np.asarray(inputs[0], dtype=np.float32)
        if self.normalize:
            return [mvn_normalize(batch, self.across, self.eps)]
        return [mvn_centre(batch, self.across)]


class _MeanSubtractLayer:
    """``CaffeStainMeanSubtract``: MeanSubtractLayer as an OpenCV custom layer."""

    def __init__(self, params, blobs):
        self.mean = MeanFile(params.get("param_str", ""), "OpenCV layer")

    def getMemoryShapes(self, inputs):  # noqa: N802
        return [inputs[0]]

    def forward(self, inputs):
        return [np.ascontiguousarray(self.mean(np.asarray(inputs[0], dtype=np.float32)), dtype=np.float32)]


_REGISTERED = set()


def _register_custom_layers():
    for kind, cls in ((CUSTOM_LAYER_TYPES["MVN"], _MVNLayer),
                      (CUSTOM_LAYER_TYPES["MeanSubtract"], _MeanSubtractLayer)):
        if kind not in _REGISTERED:
            cv2.dnn_registerLayer(kind, cls)
            _REGISTERED.add(kind)


# ---------------------------------------------------------------- the segmenter

def _one_line(error):
    lines = [line.strip(" >") for line in str(error).splitlines() if line.strip(" >")]
    return " ".join(lines) or type(error).__name__


class OpenCVSegmenter:
    """A Caffe deploy net run by OpenCV's DNN module, as a ``predict`` callable.

    The same contract as :class:`caffe_layers.net.inference.caffe_engine.CaffeSegmenter`: ``batch``
    ``N×3×h×w`` float32 RGB 0–255 in, ``prob`` ``N×C×h×w`` out.

    Parameters
    ----------
    deploy_prototxt, weights : path
        As for CaffeSegmenter. The net and the weights go through the same checks first
        (the weights against a Caffe net built from the prototxt, which runs no forward; without
        pycaffe, against the blob shapes the prototxt gives).
    threads : int, optional
        ``cv2.setNumThreads`` before each forward (a process-wide setting); None leaves
        OpenCV's own (one thread per core).

    Raises
    ------
    OpenCVUnsupported
        If OpenCV cannot run the net (no Caffe importer in this OpenCV, a layer it cannot
        create or run); the message names the layer.
    """

    engine = "opencv"

    def __init__(self, deploy_prototxt, weights, *, threads=None, check_weights=True):
        deploy_prototxt, weights = check_deploy_files(deploy_prototxt, weights)
        if not opencv_has_caffe_importer():
            raise OpenCVUnsupported(f"OpenCV {cv2.__version__} has no Caffe importer (cv2.dnn.readNetFromCaffe, "
                                    "removed in OpenCV 5); install opencv-python-headless<5")
        param = read_net_prototxt(deploy_prototxt)
        check_net_param(param, str(deploy_prototxt), caffe_pb2.TEST)
        resolve_mean_files(param, Path(deploy_prototxt).parent)  # a model folder is self-contained
        inputs, tops = prototxt_blobs(param)
        if "data" not in inputs:
            raise ValueError(f"{deploy_prototxt}: the net has no input blob 'data' "
                             f"(inputs: {sorted(inputs) or 'none'})")
        if "prob" not in tops:
            raise ValueError(f"{deploy_prototxt}: the net has no output blob 'prob'")
        if check_weights and caffe is not None:
            check_weights_fit(build_self_contained_test_net(param, deploy_prototxt), weights)
        elif check_weights:  # without pycaffe: the shapes the prototxt gives
            check_weights_fit_prototxt(param, weights)
        self.plan = plan_opencv_net(param, str(deploy_prototxt))
        if self.plan.custom_layers:
            _register_custom_layers()
        self.deploy_prototxt, self.weights, self.threads = deploy_prototxt, weights, threads
        try:
            self.net = cv2.dnn.readNetFromCaffe(np.frombuffer(self.plan.prototxt().encode(), np.uint8),
                                                np.frombuffer(weights.read_bytes(), np.uint8))
        except cv2.error as error:
            raise OpenCVUnsupported(f"{deploy_prototxt}: OpenCV {cv2.__version__} cannot read the net: "
                                    f"{_one_line(error)}") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    @property
    def notes(self):
        """What the engine does besides OpenCV (one sentence per rewritten layer)."""
        return list(self.plan.notes)

    def __call__(self, batch):
        """Forward ``batch`` ``(N, 3, h, w)`` float32; return ``prob`` ``(N, C, h, w)``."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"batch must be N×C×H×W, got shape {batch.shape}")
        data = batch
        for _, step in self.plan.input_steps:
            data = step(data)
        if data is batch:
            data = batch.copy()  # OpenCV may compute in place on its input
        if self.threads is not None:
            cv2.setNumThreads(int(self.threads))
        self.net.setInput(np.ascontiguousarray(data, dtype=np.float32), self.plan.input_name)
        try:
            prob = self.net.forward("prob")
        except cv2.error as error:
            raise OpenCVUnsupported(f"{self.deploy_prototxt}: OpenCV {cv2.__version__} cannot run the net on "
                                    f"a {'×'.join(map(str, batch.shape))} batch: {_one_line(error)}") from None
        return prob
