"""Caffe mean files (``.binaryproto``) for mean-image centring of RGB 0-255 training data.

A mean file is a ``BlobProto`` of shape 1×3×H×W, channels in the order of the data it is
subtracted from -- RGB here, by project convention (Caffe's own ``compute_image_mean`` tool
writes BGR because its data layers read BGR; do not mix the two). The files written here are
read both by ``caffe.io.blobproto_to_array`` and by Caffe's ``transform_param { mean_file }``.

``caffe_layers.mean_subtract.MeanSubtractLayer`` applies a mean file inside a net: a Python layer (such as the patch
data layer) has no ``transform_param``, so the centring has to be a layer of its own.

Console entry ``caffe-stain-meanfile``::

    caffe-stain-meanfile --list data/train_list.txt --output data/mean.binaryproto --patch-size 96
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


__all__ = [
    "compute_mean_image",
    "main",
    "read_mean_binaryproto",
    "write_mean_binaryproto",
]

def _as_rgb(image, where):
    image = np.asarray(image)
    # RGBA files are common (PNG exports); the alpha channel carries no stain.
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected an H×W×3 RGB image, got shape {image.shape}")
    return image


def compute_mean_image(images, patch_size=None):
    """Mean image of RGB training images, as a Caffe mean blob's 3×H×W array.

    Two kinds of mean, chosen by ``patch_size``:

    * ``patch_size=None``: the true per-pixel mean of whole images, which must all have the
      same size -- for nets that see whole images.
    * ``patch_size=P``: the per-channel mean over *all* training pixels, broadcast to
      3×P×P. A patch net sees patches cut at random positions, so the expected value at a
      patch coordinate is the same for every coordinate: the per-pixel mean of random
      patches converges to exactly this flat image, which is computed here without the
      sampling noise (and from images of any size).

    Parameters
    ----------
    images : iterable of (H, W, 3) or (H, W, 4) array
        RGB(A) images with values in 0-255 (any numeric dtype; alpha is ignored). Consumed
        once, so a generator that reads files lazily is fine.
    patch_size : int, optional
        Side of the square training patches.

    Returns
    -------
    mean : (3, H, W) float32 array
        RGB mean, channel-first like a Caffe blob (H = W = ``patch_size`` if given).

    Raises
    ------
    ValueError
        If there are no images, an image is not RGB, or (without ``patch_size``) the images
        differ in size.
    """
    if patch_size is not None and (int(patch_size) != patch_size or patch_size < 1):
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    # float64 accumulators: summing millions of 0-255 pixels in float32 loses precision.
    total = None
    count = 0
    for index, image in enumerate(images):
        image = _as_rgb(image, f"image {index}").astype(np.float64)
        if patch_size is None:
            if total is not None and image.shape != total.shape:
                raise ValueError(
                    f"image {index} has shape {image.shape} but earlier images have {total.shape}; "
                    "a per-pixel mean needs equal sizes (pass patch_size for a per-channel mean)")
            total = image if total is None else total + image
            count += 1
        else:
            channel_sum = image.reshape(-1, 3).sum(axis=0)
            total = channel_sum if total is None else total + channel_sum
            count += image.shape[0] * image.shape[1]
    if total is None:
        raise ValueError("compute_mean_image needs at least one image")
    mean = total / count
    if patch_size is None:
        return np.ascontiguousarray(mean.transpose(2, 0, 1), dtype=np.float32)
    size = int(patch_size)
    return np.broadcast_to(mean[:, None, None], (3, size, size)).astype(np.float32)


def write_mean_binaryproto(path, mean):
    """Write a mean image as a Caffe mean file (1×C×H×W ``BlobProto``).

    Parameters
    ----------
    path : str or Path
        Output ``.binaryproto`` file; its directory is created if needed.
    mean : (C, H, W) or (1, C, H, W) array
        The mean image, channel-first.
    """
    import caffe.io

    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 3:
        mean = mean[None]
    if mean.ndim != 4 or mean.shape[0] != 1:
        raise ValueError(f"mean must be C×H×W or 1×C×H×W, got shape {mean.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())


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
    import caffe.io
    from caffe.proto import caffe_pb2
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mean file not found: {path}")
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
        mean = caffe.io.blobproto_to_array(blob)
    except (DecodeError, ValueError) as error:
        raise ValueError(f"mean file {path} is not a Caffe BlobProto (.binaryproto): {error}") from error
    if mean.size == 0:
        raise ValueError(f"mean file {path} holds an empty blob")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise ValueError(f"mean file {path} holds a blob of shape {mean.shape}; expected 1×C×H×W or C×H×W")
    return mean.astype(np.float32)


def main(argv=None):
    """``caffe-stain-meanfile``: write the mean of a list file's images as a .binaryproto."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-meanfile",
        description="Compute an RGB mean file (1×3×H×W .binaryproto) from the images of an "
                    "'image mask' list file.")
    parser.add_argument("--list", required=True, help="list file, one 'image mask' pair per line "
                        "(paths relative to the list file's directory), as for PatchDataLayer")
    parser.add_argument("--output", required=True, help="output .binaryproto")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="training patch side: write the per-channel mean as a P×P image "
                             "(default: per-pixel mean; all images must then have the same size)")
    args = parser.parse_args(argv)

    from .patches import load_image, read_pair_list

    try:
        # The data layer's own list reader and image loader, so both see the same pixels.
        pairs = read_pair_list(args.list)
        mean = compute_mean_image((load_image(image) for image, _ in pairs), args.patch_size)
    except (OSError, ValueError) as error:
        parser.exit(2, f"caffe-stain-meanfile: error: {error}\n")
    write_mean_binaryproto(args.output, mean)
    channel_mean = ", ".join(f"{value:.2f}" for value in mean.mean(axis=(1, 2)))
    print(f"wrote {args.output}: 1×{mean.shape[0]}×{mean.shape[1]}×{mean.shape[2]}, "
          f"RGB channel means {channel_mean} from {len(pairs)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
