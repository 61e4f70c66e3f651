"""Caffe deploy nets run by ONNX Runtime (CPU), converted by :mod:`caffe_layers.net.inference.onnx_export`.

:class:`OnnxSegmenter` has the contract of the other engines (``N×3×h×w`` float32 RGB 0-255 in,
``prob`` ``N×C×h×w`` out) for nets in the project's own convention (input ``data``, output
``prob``). It converts the deploy net when it is built (a fraction of a second for the
templates), or loads a model ``caffe-stain-export`` wrote (``onnx_model``: e.g. the int8 one).
Sessions use graph optimisation level ALL and a fixed number of intra-op threads (one per
core unless told); ONNX Runtime keeps its buffers in an arena between runs, so one input
shape costs its allocation once.

``onnxruntime`` and ``onnx`` are the optional extra ``caffe-stain-augment[onnx]``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checks import check_deploy_files
from .onnx_export import OnnxUnsupported, caffe_to_onnx

__all__ = ["OnnxSegmenter", "OnnxUnsupported", "import_onnxruntime", "onnxruntime_version", "session"]


def import_onnxruntime():
    """The ``onnxruntime`` module, or :class:`OnnxUnsupported` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise OnnxUnsupported(f"the onnxruntime engine needs onnxruntime (pip install "
                              f"'caffe-stain-augment[onnx]'): {error}") from None
    return onnxruntime


def onnxruntime_version():
    """ONNX Runtime's version, or None when it is not installed."""
    try:
        return import_onnxruntime().__version__
    except OnnxUnsupported:
        return None


def session(model, threads=None):
    """An ONNX Runtime CPU session of ``model`` (bytes or a path), optimisation level ALL."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


class OnnxSegmenter:
    """A Caffe deploy net run by ONNX Runtime, as a ``predict`` callable.

    Parameters
    ----------
    deploy_prototxt, weights : path
        The net; converted here unless ``onnx_model`` is given.
    threads : int, optional
        ONNX Runtime's intra-op threads (default: its own, one per core).
    onnx_model : path, optional
        A converted model (``caffe-stain-export``) to run instead of converting the net.

    Raises
    ------
    OnnxUnsupported
        onnxruntime missing, or a layer the converter does not cover (named).
    """

    engine = "onnxruntime"

    def __init__(self, deploy_prototxt, weights, *, threads=None, onnx_model=None):
        deploy_prototxt, weights = check_deploy_files(deploy_prototxt, weights)
        import_onnxruntime()
        self.deploy_prototxt, self.weights, self.threads = deploy_prototxt, weights, threads
        if onnx_model is None:
            model = caffe_to_onnx(deploy_prototxt, weights).SerializeToString()
            self.notes = ["converted to ONNX by caffe_layers.net.inference.onnx_export"]
        else:
            onnx_model = Path(onnx_model)
            if not onnx_model.is_file():
                raise ValueError(f"{onnx_model}: no such ONNX model")
            model = onnx_model
            self.notes = [f"ONNX model {onnx_model}"]
        try:
            self.session = session(model, threads)
        except Exception as error:  # onnxruntime's own exception classes
            raise OnnxUnsupported(f"{deploy_prototxt}: ONNX Runtime cannot load the converted net: "
                                  f"{str(error).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, batch):
        """Forward ``batch`` ``(N, 3, h, w)`` float32; return ``prob`` ``(N, C, h, w)``."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"batch must be N×C×H×W, got shape {batch.shape}")
        try:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as error:
            raise OnnxUnsupported(f"{self.deploy_prototxt}: ONNX Runtime cannot run the net on a "
                                  f"{'×'.join(map(str, batch.shape))} batch: {str(error).splitlines()[0]}") from None
