"""Per-colour work on uint8 RGB images: a colour-wise map and a fixed-seed pixel sample.

An 8-bit RGB image of a few megapixels holds far fewer distinct colours than pixels (the
2000×2000 H&E tile of the benchmark: 4 000 000 pixels, 216 608 colours). Any normaliser whose
output pixel depends only on the input pixel's colour -- Reinhard's LAB transfer, Vahadane's
sparse unmixing -- can then be computed once per distinct colour and looked up for every pixel
(:func:`map_colours`). Statistics are fitted on a random sample of the tissue pixels drawn with a
fixed seed (:func:`sample_pixels`), so every run on the same image gives the same result.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["DEFAULT_SAMPLE_SIZE", "TABLE_MIN_PIXELS", "map_colours", "sample_pixels"]

#: Tissue pixels the normalisers fit their statistics on (all of them in smaller images).
DEFAULT_SAMPLE_SIZE = 100_000
#: From this many pixels on, :func:`map_colours` computes per distinct colour; below it, per pixel.
TABLE_MIN_PIXELS = 1 << 19

_CODES = 1 << 24  # one entry per 24-bit colour


def map_colours(image, function, table_min_pixels=TABLE_MIN_PIXELS):
    """``function`` applied to every pixel of ``image``, computed once per distinct colour.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), uint8
    function : callable
        Takes a C-contiguous (K, 3) uint8 array of colours and returns their (K, 3) uint8 images.
        It must treat each colour on its own (no statistics over the array it is given).
    table_min_pixels : int, optional
        Images with fewer pixels are mapped pixel by pixel (the 16-million-entry tables cost
        ~10 ms to scan, more than a small image's work); the result is the same.

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
        A new array.

    Notes
    -----
    Each pixel becomes a little-endian 24-bit code (one OpenCV RGB→RGBA pass viewed as uint32,
    alpha masked off, as an index array); a boolean table of the 2**24 codes marks the colours present; ``function``
    runs on those; a 2**24-entry uint32 table (64 MB, touched only where colours are present)
    maps every pixel's code to its packed output, unpacked by one RGBA→RGB pass.
    """
    image = np.ascontiguousarray(image)
    flat = image.reshape(-1, 3)
    if flat.shape[0] < table_min_pixels:
        return _checked(function(flat), flat.shape[0]).reshape(image.shape)
    codes = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA).view("<u4").reshape(-1)
    np.bitwise_and(codes, np.uint32(0xFFFFFF), out=codes)
    codes = codes.astype(np.intp)  # numpy indexes with intp; converting once is ~2x faster than twice
    present = np.zeros(_CODES, np.bool_)
    present[codes] = True
    colour_codes = np.flatnonzero(present).astype("<u4")
    colours = np.ascontiguousarray(colour_codes.view(np.uint8).reshape(-1, 4)[:, :3])
    packed = np.zeros((colours.shape[0], 4), np.uint8)
    packed[:, :3] = _checked(function(colours), colours.shape[0])
    table = np.empty(_CODES, "<u4")
    table[colour_codes] = packed.view("<u4").reshape(-1)
    mapped = table.take(codes).view(np.uint8).reshape(*image.shape[:2], 4)
    return cv2.cvtColor(mapped, cv2.COLOR_RGBA2RGB)


def _checked(result, count):
    result = np.asarray(result)
    if result.shape != (count, 3) or result.dtype != np.uint8:
        raise ValueError(f"the colour function must return a ({count}, 3) uint8 array; got "
                         f"{result.shape} {result.dtype}")
    return result


def sample_pixels(image, mask, sample_size=DEFAULT_SAMPLE_SIZE, seed=0):
    """The pixels of ``image`` under ``mask``, or a fixed-seed random sample of about
    ``sample_size`` of them.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), uint8
    mask : ndarray, shape (H, W), bool or uint8 (non-zero: selected), or None for every pixel
    sample_size : int or None, optional
        None, or at least as many selected pixels as there are, keeps them all. Otherwise pixel
        positions are drawn uniformly with replacement by ``numpy.random.default_rng(seed)``,
        ``sample_size * H*W / count`` of them over the whole image, and the selected ones kept
        (in image order): about ``sample_size`` pixels, a uniform sample of the selection,
        without listing the selection first (that scan would cost more than the sample).
    seed : int, optional

    Returns
    -------
    pixels : ndarray, shape (K, 3), uint8
        C-contiguous.
    count : int
        How many pixels the mask selects (before sampling).
    """
    flat = np.ascontiguousarray(image).reshape(-1, 3)
    total = flat.shape[0]
    selected = None if mask is None else np.asarray(mask).reshape(-1)
    count = total if selected is None else int(np.count_nonzero(selected))
    if sample_size is None or count <= sample_size:
        if selected is None:
            return flat, count
        index = np.flatnonzero(selected)
    else:
        rng = np.random.default_rng(seed)
        draws = int(math.ceil(sample_size * total / count))
        if selected is None or draws < total // 4:
            index = rng.integers(0, total, draws)
            index.sort()
            if selected is not None:
                index = index[selected.take(index) != 0]
        else:  # a small selection: list it, then draw from it
            index = np.flatnonzero(selected)
            chosen = rng.integers(0, count, int(sample_size))
            chosen.sort()
            index = index[chosen]
    # Gathering 3-byte records is ~3x faster than fancy indexing rows of a (N, 3) array.
    return flat.view("V3").reshape(-1).take(index).view(np.uint8).reshape(-1, 3), count
