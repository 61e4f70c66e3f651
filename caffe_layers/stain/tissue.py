"""Tissue masks: which pixels of an H&E image are tissue rather than white glass.

"Tissue" is every pixel whose grey level -- the plain *mean of the R, G and B values* (not a
weighted luminance: stains absorb in different channels and the plain mean treats them alike)
-- is at or below ``white_threshold``, in the image's own units (200 for uint8; e.g. 200/255
for float images in [0, 1]). Blank (all-white) images are normal input: functions that need
tissue warn with :class:`NoTissueWarning` and return the image unchanged.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from ..image_io import check_rgb

__all__ = ["NoTissueWarning", "background_planes", "check_mask", "check_white_threshold", "masked_channel_means", "resolve_masks", "tissue_mask"]


class NoTissueWarning(UserWarning):
    """An image (or its mask) has no tissue pixels; it was returned unchanged."""


def check_mask(mask, image, name):
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"{name} must have shape {image.shape[:2]} (the image's H, W); "
            f"got {mask.shape}"
        )
    if mask.dtype != bool:
        raise ValueError(f"{name} must be a boolean array; got dtype {mask.dtype}")
    return mask


def check_white_threshold(white_threshold):
    """Return ``white_threshold`` as a float, or raise ValueError if it is not a number or NaN.

    Every value of a number is meaningful (below 0: no pixel is tissue; +inf: every pixel is).
    """
    try:
        value = float(white_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"white_threshold must be a number; got {white_threshold!r}") from None
    if math.isnan(value):
        raise ValueError("white_threshold must be a number; got NaN (no pixel would be tissue or background)")
    return value


def _threshold_limit(white_threshold):
    """``floor(3 * t)`` clipped to [-1, 3 * 255]: the same test ``R + G + B <= 3 t`` for uint8 pixels."""
    if white_threshold < 0:
        return -1
    if white_threshold >= 255:
        return 3 * 255
    return math.floor(3 * white_threshold)


def tissue_mask(rgb, white_threshold=200, min_size=0, fill_holes=False):
    """Boolean mask of tissue (non-background) pixels of an RGB image.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8 or float
        Input image.
    white_threshold : float, optional
        A pixel is tissue when the mean of its R, G, B values is at or below
        this value, in the image's own units (200 for uint8; e.g. 200/255 for
        float images in [0, 1]).
    min_size : int, optional
        Remove connected tissue components (8-connectivity) smaller than this
        many pixels. 0 keeps everything.
    fill_holes : bool, optional
        Fill enclosed background holes (e.g. lumina) with
        :func:`scipy.ndimage.binary_fill_holes`.

    Returns
    -------
    mask : ndarray, shape (H, W), bool
        True on tissue.
    """
    rgb = check_rgb(rgb, "rgb")
    white_threshold = check_white_threshold(white_threshold)
    if min_size < 0 or int(min_size) != min_size:
        raise ValueError(f"min_size must be a non-negative integer; got {min_size!r}")
    if rgb.dtype == np.uint8:
        mask = _uint8_tissue(rgb, white_threshold)
    else:
        mask = rgb.mean(axis=-1) <= white_threshold
    if min_size > 1 and mask.any():
        labels, n_labels = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
        keep = sizes >= min_size
        keep[0] = False  # label 0 is background
        mask = keep[labels]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def _uint8_tissue(rgb, white_threshold):
    """``R + G + B <= 3 * white_threshold`` for uint8 RGB, in one SIMD OpenCV pass.

    The sum of a pixel is an integer, so the test is ``S <= L`` with ``L = floor(3 t)``.
    ``cv2.transform`` with the fixed-point matrix ``[1, 1, 1 | 254 - L]`` computes
    ``saturate_uint8(S + 254 - L)``, exactly (a test checks every one of the 2**24 colours):
    at most 254 for tissue, 255 for background. Its 3-row form is vectorised (~3 ms for 4
    megapixels; the 1-row form is not, and numpy's channel-by-channel uint16 sum takes ~2-3x as
    long, which is kept for images OpenCV cannot view).
    """
    limit = _threshold_limit(white_threshold)
    if limit < 0:
        return np.zeros(rgb.shape[:2], bool)
    if limit >= 3 * 255:
        return np.ones(rgb.shape[:2], bool)
    if rgb.flags.c_contiguous:
        matrix = np.zeros((3, 4))
        matrix[0] = (1.0, 1.0, 1.0, 254.0 - limit)
        return cv2.extractChannel(cv2.transform(rgb, matrix), 0) <= 254
    # Integer sum in uint16 (3*255 fits) avoids a float copy of the image;
    # channel-by-channel accumulation is ~10x faster than sum(axis=-1).
    grey_sum = rgb[..., 0].astype(np.uint16)
    grey_sum += rgb[..., 1]
    grey_sum += rgb[..., 2]
    return grey_sum <= limit


def background_planes(rgb, white_threshold=200):
    """Background of a uint8 RGB image as 3-channel planes: 255 in every channel of a
    background pixel, 0 on tissue (the complement of :func:`tissue_mask`), or None.

    Two SIMD OpenCV passes -- the fixed-point ``cv2.transform`` of :func:`tissue_mask`
    (``saturate(S + 254 - L)``, 255 exactly on background) in all three rows, then a threshold
    at 254 -- give an operand for unmasked saturating arithmetic (``cv2.subtract`` blacks out
    the background) and a mask for ``cv2.copyTo``, without a boolean pass. None when OpenCV
    cannot view the image (not C-contiguous): use :func:`tissue_mask` then.
    """
    if rgb.dtype != np.uint8 or not rgb.flags.c_contiguous:
        return None
    limit = _threshold_limit(check_white_threshold(white_threshold))
    if limit < 0 or limit >= 3 * 255:
        return np.full(rgb.shape, 255 if limit < 0 else 0, np.uint8)
    matrix = np.tile([1.0, 1.0, 1.0, 254.0 - limit], (3, 1))
    planes = cv2.transform(rgb, matrix)
    cv2.threshold(planes, 254, 255, cv2.THRESH_BINARY, dst=planes)  # in place: no second image-sized buffer
    return planes


def resolve_masks(image, reference, mask, reference_mask, ignore_white, white_threshold):
    """Masks to use for image and reference (None means "every pixel")."""
    if mask is not None:
        mask = check_mask(mask, image, "mask")
    elif ignore_white:
        mask = tissue_mask(image, white_threshold)
    if reference_mask is not None:
        reference_mask = check_mask(reference_mask, reference, "reference_mask")
    elif ignore_white:
        reference_mask = tissue_mask(reference, white_threshold)
    return mask, reference_mask


def masked_channel_means(image, mask, name):
    """Per-channel means of ``image`` over ``mask`` (all pixels when None)."""
    if mask is None:
        return image.mean(axis=(0, 1), dtype=np.float64)
    count = np.count_nonzero(mask)
    if count == 0:
        raise ValueError(f"{name} has no tissue pixels (empty mask); cannot compute its mean")
    # `where=` sums in place: no boolean-indexed copy of the image.
    sums = image.sum(axis=(0, 1), dtype=np.float64, where=mask[..., None])
    return sums / count

