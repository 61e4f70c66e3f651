"""Image resolution (micrometres per pixel) and resampling to the scale a net was trained at.

A model card's ``mpp`` says at how many micrometres per pixel the net saw its training
images. A plain image is segmented at that scale: :func:`segmentation_scale` gives the factor
from the image's own resolution (:func:`image_mpp`, or a value the user gives), the image is
resampled by it (:func:`resample_rgb`), and the probability map is brought back to the
image's size (:func:`resample_probability`), so every output has the input's pixels. Whole
slides pick the pyramid level nearest to the same ``mpp`` instead
(:func:`caffe_layers.wsi.reader.choose_level`).
"""
import math

import cv2
import numpy as np

__all__ = ["MAX_RECORDED_MPP", "image_mpp", "resample_probability", "resample_rgb", "segmentation_scale"]

MAX_RECORDED_MPP = 20.0
"""Coarser resolutions recorded in a file are not a microscope's: 72, 96 or 300 dpi
(353, 265, 85 µm/px) are what image software writes by default (MoNuSeg's tiles say 72 dpi).
The coarsest objectives scan at a few µm/px."""

_MICROMETRES_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


def _tiff_mpp(path):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if tag is None or unit is None:
            return None
        numerator, denominator = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        micrometres = _MICROMETRES_PER_UNIT.get(int(unit.value))
        if not numerator or not denominator or micrometres is None:
            return None
        return micrometres * denominator / numerator


def _png_mpp(path):
    from PIL import Image

    with Image.open(str(path)) as image:
        dpi = image.info.get("dpi")
    if not dpi or not dpi[0] or dpi[0] <= 0:
        return None
    return 25400.0 / float(dpi[0])


def image_mpp(path):
    """(mpp, note) of an image file's own resolution: TIFF ``XResolution``/``ResolutionUnit``
    or a PNG's ``pHYs``; mpp is None when the file records none or one coarser than
    :data:`MAX_RECORDED_MPP` (a screen or print default), and the note says which."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    reader = {"tif": _tiff_mpp, "tiff": _tiff_mpp, "png": _png_mpp}.get(suffix)
    try:
        mpp = None if reader is None else reader(path)
    except (OSError, ValueError):  # an unreadable file is reported, naming it, when it is read
        mpp = None
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        return None, "records no resolution"
    if mpp > MAX_RECORDED_MPP:
        return None, f"records {mpp:.4g} µm/px ({25400.0 / mpp:.0f} dpi), a screen or print default, not a scan's"
    return mpp, f"records {mpp:.4g} µm/px"


def segmentation_scale(path, model_mpp, given_mpp=None):
    """(scale, sentence): the factor that takes the image at ``path`` to ``model_mpp``.

    Parameters
    ----------
    path : path
        The image.
    model_mpp : float or None
        The model card's ``mpp``; None segments every image as it is.
    given_mpp : float, optional
        The image's resolution as the user gives it; wins over the file's own.

    Returns
    -------
    scale : float
        ``image mpp / model mpp`` (1.0 when either is unknown).
    sentence : str
        Says at which scale the image is segmented and why.
    """
    if model_mpp is None:
        return 1.0, "segmented as it is (no mpp in the model card)"
    if given_mpp is not None:
        mpp, source = given_mpp, f"{given_mpp:g} µm/px as given"
    else:
        mpp, note = image_mpp(path)
        if mpp is None:
            return 1.0, (f"segmented as it is: the file {note} (give its µm/px to segment it at the model's "
                         f"{model_mpp:g} µm/px)")
        source = f"the file {note}"
    scale = mpp / model_mpp
    if scale == 1:
        return 1.0, f"segmented as it is ({source}, the model's {model_mpp:g} µm/px)"
    return scale, f"segmented resampled ×{scale:.4g} to the model's {model_mpp:g} µm/px ({source})"


def resample_rgb(rgb, scale):
    """``(H, W, 3)`` uint8 -> ``(round(H·scale), round(W·scale), 3)``: area averaging when
    shrinking (no aliasing), bilinear when enlarging."""
    if scale == 1:
        return rgb
    height, width = (max(1, int(round(side * scale))) for side in rgb.shape[:2])
    return cv2.resize(np.ascontiguousarray(rgb), (width, height),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def resample_probability(prob, shape):
    """A probability map brought to ``shape`` (bilinear), float32."""
    if prob.shape == tuple(shape):
        return prob.astype(np.float32, copy=False)
    return cv2.resize(np.asarray(prob, np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
