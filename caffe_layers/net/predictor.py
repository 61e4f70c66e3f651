"""A Caffe deploy net as a ``predict`` callable for :func:`caffe_layers.tiling.segment_tiled`."""
from pathlib import Path

import caffe
import numpy as np

from .checks import check_net_param, check_weights_fit, layers_in_phase, read_net_prototxt

__all__ = ["CaffeSegmenter", "prototxt_blobs", "use_cpu"]


def use_cpu():
    """Run Caffe on the CPU (this project's build has no GPU code)."""
    caffe.set_mode_cpu()


def prototxt_blobs(param):
    """(input blob names, all top names) of a deploy ``NetParameter`` in the TEST phase."""
    inputs = set(param.input)
    tops = set(param.input)
    for layer in layers_in_phase(param, caffe.TEST):
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
        # Everything Caffe would abort on is checked first: the net, then the weights against it.
        param = read_net_prototxt(deploy_prototxt)
        check_net_param(param, str(deploy_prototxt), caffe.TEST)
        inputs, tops = prototxt_blobs(param)
        if "data" not in inputs:
            raise ValueError(f"{deploy_prototxt}: the net has no input blob 'data' "
                             f"(inputs: {sorted(inputs) or 'none'})")
        if "prob" not in tops:
            raise ValueError(f"{deploy_prototxt}: the net has no output blob 'prob'")
        self.deploy_prototxt, self.weights = deploy_prototxt, weights
        self.net = caffe.Net(str(deploy_prototxt), caffe.TEST)
        check_weights_fit(self.net, weights)
        self.net.copy_from(str(weights))

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
