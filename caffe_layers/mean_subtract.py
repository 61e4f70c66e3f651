"""Caffe Python layer: subtract a mean file (``.binaryproto``) inside a net.

A Python data layer has no ``transform_param``, so mean-file centring after the
augmentation layer has to be a layer of its own::

    layer { name: "centre" type: "Python" bottom: "data" top: "centred"
      python_param { module: "caffe_layers.mean_subtract" layer: "MeanSubtractLayer"
                     param_str: '{"mean_file": "data/mean.binaryproto"}' } }
"""
import caffe

from .layer_api import layer_param_str
from .net.meanfile import read_mean_binaryproto
from .patches import MEAN_SUBTRACT_SCHEMA, mean_to_subtract
from .schema import load_params


class MeanSubtractLayer(caffe.Layer):
    """Caffe Python layer: subtract a mean file from the data blob.

    Bottom: data (N×C×H×W). Top: centred data, same shape (in place is fine).
    ``param_str``: ``{"mean_file": "path/to/mean.binaryproto"}``, path relative to the
    directory Caffe runs in.

    If the mean's H×W equals the input's, the mean image is subtracted pixel by pixel;
    with ``"crop_centre": true`` a smaller input gets the mean's centre crop (what Caffe's
    ``transform_param`` subtracts after a TEST-phase ``crop_size``); otherwise its per-channel
    mean is (:func:`caffe_layers.patches.mean_to_subtract`). That makes one mean file usable for both the training
    patches and whole-image deployment: the mean of randomly placed patches is flat anyway
    (see :func:`caffe_layers.patches.compute_mean_image`), so its per-channel value loses nothing.
    """

    def setup(self, bottom, top):
        where = "MeanSubtractLayer param_str"
        params = load_params(layer_param_str(self, "MeanSubtractLayer"), MEAN_SUBTRACT_SCHEMA, where)
        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(f"MeanSubtractLayer takes one bottom and one top, got {len(bottom)} and {len(top)}")
        try:
            self.mean = read_mean_binaryproto(params["mean_file"])
        except (OSError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        self.crop_centre = params["crop_centre"]
        self._check_shape(bottom[0].data.shape)

    def _check_shape(self, shape):
        if len(shape) != 4:
            raise ValueError(f"MeanSubtractLayer: bottom must be N×C×H×W, got shape {tuple(shape)}")
        if shape[1] != self.mean.shape[0]:
            raise ValueError(f"MeanSubtractLayer: bottom has {shape[1]} channels but the mean file has "
                             f"{self.mean.shape[0]}")

    def reshape(self, bottom, top):
        self._check_shape(bottom[0].data.shape)
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        data = bottom[0].data
        top[0].data[...] = data - mean_to_subtract(self.mean, data.shape[2:], self.crop_centre)

    def backward(self, top, propagate_down, bottom):
        # Subtracting a constant passes gradients through unchanged (normally nothing
        # below this layer learns, and Caffe does not ask).
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
