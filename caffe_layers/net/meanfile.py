"""Caffe mean files (``.binaryproto``) for mean-image centring of RGB 0-255 training data.

A mean file is a ``BlobProto`` of shape 1×3×H×W, channels in the order of the data it is
subtracted from -- RGB here, by project convention (Caffe's own ``compute_image_mean`` tool
writes BGR because its data layers read BGR; do not mix the two). The files written here are
read both by pycaffe's ``caffe.io.blobproto_to_array`` and by Caffe's ``transform_param { mean_file }``.
The mean image itself is computed by :func:`caffe_layers.patches.compute_mean_image`.

:class:`caffe_layers.mean_subtract.MeanSubtractLayer` applies a mean file inside a net: a
Python layer (such as the patch data layer) has no ``transform_param``, so the centring has
to be a layer of its own.
"""
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from ..image_io import write_atomic
from .proto import caffe_pb2

__all__ = ["read_mean_binaryproto", "write_mean_binaryproto"]


def _array_to_blobproto(array):
    """``caffe.io.array_to_blobproto`` without pycaffe: the shape as ``shape.dim``, float data."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(array.shape)
    blob.data.extend(array.astype(float).flat)
    return blob


def _blobproto_to_array(blob):
    """``caffe.io.blobproto_to_array`` without pycaffe: a legacy num/channels/height/width shape
    when any of them is set, else ``shape.dim`` (ValueError if the data does not fit it)."""
    data = np.array(blob.data)
    if any(blob.HasField(field) for field in ("num", "channels", "height", "width")):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(blob.shape.dim)


def write_mean_binaryproto(path, mean, *, overwrite=False):
    """Write a mean image as a Caffe mean file (1×C×H×W ``BlobProto``).

    Parameters
    ----------
    path : str or Path
        Output ``.binaryproto`` file; its directory is created if needed.
    mean : (C, H, W) or (1, C, H, W) array
        The mean image, channel-first.
    overwrite : bool
        Replace an existing file (default: refuse). Written atomically either way.
    """
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 3:
        mean = mean[None]
    if mean.ndim != 4 or mean.shape[0] != 1:
        raise ValueError(f"mean must be C×H×W or 1×C×H×W, got shape {mean.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _array_to_blobproto(mean).SerializeToString()
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def read_mean_binaryproto(path):
    """Read a Caffe mean file.

    Parameters
    ----------
    path : str or Path
        A ``.binaryproto`` holding one ``BlobProto`` of shape 1×C×H×W or C×H×W (legacy
        num/channels/height/width fields or ``shape``).

    Returns
    -------
    mean : (C, H, W) float32 array

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If the file is not a BlobProto of a supported shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mean file not found: {path}")
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
        mean = _blobproto_to_array(blob)
    except (DecodeError, ValueError) as error:
        raise ValueError(f"mean file {path} is not a Caffe BlobProto (.binaryproto): {error}") from error
    if mean.size == 0:
        raise ValueError(f"mean file {path} holds an empty blob")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise ValueError(f"mean file {path} holds a blob of shape {mean.shape}; expected 1×C×H×W or C×H×W")
    if not np.isfinite(mean).all():
        raise ValueError(f"mean file {path} holds NaN or infinite values")
    return mean.astype(np.float32)
