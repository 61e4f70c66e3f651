"""Nucleus annotation readers: Aperio ImageScope XML outlines and instance label images.

Conventions (see ``docs/nuclei.md``):

* An instance label image is an ``(H, W) int32`` array: 0 is background, every other value
  is one nucleus.
* ImageScope XML (``Annotations/Annotation/Regions/Region/Vertices/Vertex X= Y=``, as MoNuSeg
  and ImageScope write it) gives each nucleus as a polygon whose vertices are *pixel-corner*
  coordinates: the centre of pixel column ``c`` is at ``X = c + 0.5``. The reader therefore
  shifts every vertex by -0.5 px (``col = X - 0.5``, ``row = Y - 0.5``) and fills the pixels
  whose centres lie inside the polygon or on its outline (a diagonal edge between integer
  vertices passes exactly through pixel centres: 0.2-2 % of a MoNuSeg tile's nucleus pixels).
* Label ``k`` is the ``k``-th ``Region`` of the file (1-based, in document order over all
  ``Annotation`` elements), so a label can be traced back to its outline.
* Where outlines overlap, the region drawn first keeps the shared pixels (a later region
  only fills pixels still background), the rule of the MoNuSeg instance images.
* A region with fewer than 3 vertices (a point or a line) encloses no area and gets no
  pixel; so does a region whose pixels all belong to earlier regions or lie outside the
  image. Its label number is then absent from the image.
* ``NegativeROA`` (ImageScope's exclusion regions) is not interpreted: every region is a
  nucleus.
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET

import numpy as np

__all__ = ["imagescope_regions", "read_ground_truth", "read_imagescope_xml", "read_instance_image",
           "write_instance_image", "xml_microns_per_pixel"]

# ImageScope writes vertices at pixel corners; the pixel grid used here has pixel centres at
# integer positions, so every vertex moves by this much in both axes.
CORNER_TO_CENTRE = -0.5


def _parse(path, root_only=False):
    """The root ``Annotations`` element of an ImageScope XML (``root_only``: its attributes,
    without reading the rest of the file); one-line errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation XML {path!r} does not exist (or is not a file)")
    try:
        root = next(ET.iterparse(path, events=("start",)))[1] if root_only else ET.parse(path).getroot()
    except (ET.ParseError, StopIteration) as error:
        raise ValueError(f"annotation XML {path!r} is not well-formed XML: {error}") from None
    if root.tag != "Annotations":
        raise ValueError(f"annotation XML {path!r} has root element <{root.tag}>; expected "
                         f"<Annotations> (Aperio ImageScope format)")
    return root


def _coordinate(path, region_number, vertex, axis):
    text = vertex.get(axis)
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"annotation XML {path!r}: Region {region_number} has a Vertex with "
                         f"{axis}={text!r}; expected a finite number")
    return value


def imagescope_regions(path):
    """Outlines of every ``Region`` of an ImageScope XML, in document order.

    Parameters
    ----------
    path : str or path-like
        Aperio ImageScope annotation XML.

    Returns
    -------
    list of (K, 2) float64 ndarray
        One array per region, rows ``(x, y)`` exactly as written in the file (pixel-corner
        coordinates, no shift). ``K`` may be below 3 for degenerate regions.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, malformed XML, a root other than ``Annotations`` or a vertex without a
        finite ``X``/``Y``; the message names the file.
    """
    root = _parse(path)
    regions = []
    for number, region in enumerate(root.iter("Region"), start=1):
        vertices = [(v.get("X"), v.get("Y")) for v in region.iter("Vertex")]
        try:
            array = np.array(vertices, dtype=np.float64).reshape(-1, 2)
            valid = np.isfinite(array).all()
        except (TypeError, ValueError):
            valid = False
        if not valid:  # find the culprit for the message
            array = np.array([(_coordinate(path, number, v, "X"), _coordinate(path, number, v, "Y"))
                              for v in region.iter("Vertex")]).reshape(-1, 2)
        regions.append(array)
    return regions


def xml_microns_per_pixel(path):
    """The ``MicronsPerPixel`` attribute of an ImageScope XML's root, or None if absent, empty or not > 0.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    float or None
    """
    # The root's attributes only: no need to parse megabytes of vertices.
    text = _parse(path, root_only=True).get("MicronsPerPixel")
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _check_shape(shape, what):
    try:
        height, width = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: shape must be (height, width), got {shape!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"{what}: shape must be positive, got {shape!r}")
    return height, width


def read_imagescope_xml(path, shape):
    """Rasterise an ImageScope XML into an instance label image.

    Each region is shifted from pixel-corner to pixel-centre coordinates (-0.5 px) and the
    pixels whose centres fall inside it or on its outline (:func:`skimage.draw.polygon`,
    clipped to ``shape``)
    get its label, unless an earlier region already holds them (first drawn keeps shared
    pixels). See the module docstring for degenerate regions.

    Parameters
    ----------
    path : str or path-like
        Aperio ImageScope annotation XML.
    shape : (int, int)
        ``(H, W)`` of the image the outlines belong to.

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background; ``k`` the pixels of the ``k``-th Region.
    """
    from skimage.draw import polygon

    height, width = _check_shape(shape, f"annotation XML {os.fspath(path)!r}")
    regions = imagescope_regions(path)
    if len(regions) > np.iinfo(np.int32).max:
        raise ValueError(f"annotation XML {os.fspath(path)!r} has {len(regions)} regions, more than int32 labels")
    labels = np.zeros((height, width), np.int32)
    for number, vertices in enumerate(regions, start=1):
        if len(vertices) < 3:
            continue  # a point or a line: no area
        rows, cols = polygon(vertices[:, 1] + CORNER_TO_CENTRE, vertices[:, 0] + CORNER_TO_CENTRE,
                             shape=(height, width))
        free = labels[rows, cols] == 0
        labels[rows[free], cols[free]] = number
    return labels


def read_instance_image(path, shape=None):
    """Read a single-channel instance label image (16- or 8-bit PNG, TIFF, ``.npy``).

    Parameters
    ----------
    path : str or path-like
        0 = background, any other value one object (numbering need not be consecutive).
    shape : (int, int), optional
        Expected ``(H, W)``; a mismatch is an error naming the file.

    Returns
    -------
    labels : (H, W) int32 ndarray

    Raises
    ------
    ValueError
        If the file holds colour (an RGB instance rendering is not a label image: each
        colour would need decoding), is not 2-D, not integer, has negative values or values
        beyond int32, or its shape is not ``shape``. The message names the file.
    """
    from .image_io import _decode

    path = os.fspath(path)
    array = np.asarray(_decode(path, "instance label image"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        raise ValueError(f"instance label image {path!r} has {array.shape[-1]} colour channels; expected "
                         f"a single-channel label image (16- or 8-bit, 0 = background, 1..N = objects)")
    if array.ndim != 2:
        raise ValueError(f"instance label image {path!r} has shape {array.shape}; expected (H, W)")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"instance label image {path!r} has dtype {array.dtype}; expected integer labels")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > np.iinfo(np.int32).max:
            raise ValueError(f"instance label image {path!r} has values {low}..{high}; expected 0..2^31-1")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"instance label image {path!r} is {array.shape[0]}×{array.shape[1]} (H×W), "
                         f"which does not match the image's {tuple(shape)[0]}×{tuple(shape)[1]}")
    return array.astype(np.int32)


def write_instance_image(path, labels, *, overwrite=False):
    """Write instance labels as a 16-bit single-channel PNG (atomically), as
    :func:`read_instance_image` reads them back.

    Parameters
    ----------
    path : path
        A ``.png`` file.
    labels : (H, W) integer array
        0 background, 1..65535 objects.
    overwrite : bool
        Replace an existing file (default: refuse).

    Returns
    -------
    Path
    """
    from pathlib import Path

    from PIL import Image

    from .image_io import write_atomic

    path, labels = Path(path), np.asarray(labels)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: instance labels are written as .png (16-bit)")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: instance labels must be an (H, W) integer array, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"{path}: labels {labels.min()}..{labels.max()} do not fit a 16-bit PNG (0..65535)")
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16))
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"), overwrite=overwrite)


def read_ground_truth(path, shape):
    """Ground truth of an image: nucleus instances where the file holds them, else a mask.

    Parameters
    ----------
    path : str or path-like
        An Aperio ImageScope ``.xml`` (instances), or an image: a single-channel label image
        whose foreground holds several values (16- or 8-bit) gives instances; a binary mask
        (one foreground value, or an RGB file with identical channels) gives a mask.
    shape : (int, int)
        The image's ``(H, W)``; a file of another shape is an error naming it.

    Returns
    -------
    (H, W) int32 instance labels (0 background) or (H, W) bool mask
    """
    from .image_io import read_mask

    if os.fspath(path).lower().endswith(".xml"):
        return read_imagescope_xml(path, shape)
    try:
        labels = read_instance_image(path, shape)
    except ValueError:  # colour channels, floats, ...: read_mask says what it accepts
        return read_mask(path, shape)
    foreground = labels[labels > 0]
    if foreground.size and foreground.min() != foreground.max():
        return labels
    return labels > 0
