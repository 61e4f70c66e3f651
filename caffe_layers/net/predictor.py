"""A Caffe deploy net as a ``predict`` callable for :func:`caffe_layers.tiling.segment_tiled`."""
from pathlib import Path

import caffe
import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf import text_format

__all__ = ["CaffeSegmenter", "prototxt_blobs", "use_cpu"]


def use_cpu():
    """Run Caffe on the CPU (this project's build has no GPU code)."""
    caffe.set_mode_cpu()


def prototxt_blobs(path):
    """(input blob names, all top names) of a deploy prototxt, parsed without building it.

    Caffe aborts the whole process on a malformed net; checking first gives a clear error.
    """
    param = caffe_pb2.NetParameter()
    try:
        text_format.Merge(Path(path).read_text(), param)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid Caffe prototxt: {error}") from None
    inputs = set(param.input)
    tops = set(param.input)
    for layer in list(param.layer) + list(param.layers):
        tops.update(layer.top)
        if getattr(layer, "type", None) == "Input":
            inputs.update(layer.top)
    return inputs, tops


class CaffeSegmenter:
    """A Caffe deploy net as a ``predict`` callable for :func:`segment_tiled`.

    Parameters
    ----------
    deploy_prototxt : path
        Deploy net with an input blob ``data`` (``N×3×H×W`` RGB 0–255) and a softmax output
        blob ``prob`` (``N×2×H×W``).
    weights : path
        ``.caffemodel`` with the trained weights.

    Notes
    -----
    The compute mode (CPU/GPU) is left as the caller set it.
    """

    def __init__(self, deploy_prototxt, weights):
        deploy_prototxt, weights = Path(deploy_prototxt), Path(weights)
        for what, path in (("deploy prototxt", deploy_prototxt), ("weights", weights)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}")
        if weights.stat().st_size == 0:
            raise ValueError(f"weights file is empty: {weights}")
        inputs, tops = prototxt_blobs(deploy_prototxt)
        if "data" not in inputs:
            raise ValueError(f"{deploy_prototxt}: the net has no input blob 'data' "
                             f"(inputs: {sorted(inputs) or 'none'})")
        if "prob" not in tops:
            raise ValueError(f"{deploy_prototxt}: the net has no output blob 'prob'")
        self.deploy_prototxt, self.weights = deploy_prototxt, weights
        self.net = caffe.Net(str(deploy_prototxt), str(weights), caffe.TEST)

    def __call__(self, batch):
        """Forward ``batch`` ``(N, 3, h, w)`` float32; return ``prob`` ``(N, C, h, w)``."""
        batch = np.asarray(batch, dtype=np.float32)
        data = self.net.blobs["data"]
        if tuple(data.data.shape) != batch.shape:
            # Reshape only when the tile size changes: reshaping reallocates every blob.
            data.reshape(*batch.shape)
            self.net.reshape()
        data.data[...] = batch
        self.net.forward()
        return self.net.blobs["prob"].data.copy()
