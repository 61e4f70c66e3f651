"""Histogram matching of RGB images, optionally on tissue pixels only (white glass ignored).

Pure numpy. ``uint8`` images take a fast path (two channels per uint16 element); floating
images are matched exactly, like scikit-image's ``match_histograms``.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..image_io import check_rgb
from .tissue import NoTissueWarning, resolve_masks

__all__ = ["MAX_NBINS", "check_reference", "match_histograms"]


#: Most histogram bins: more than uint16 levels buys nothing and costs time linear in nbins.
MAX_NBINS = 65536


def _check_nbins(nbins):
    if nbins is None:
        return None
    if isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or not 2 <= nbins <= MAX_NBINS:
        raise ValueError(f"nbins must be an integer in [2, {MAX_NBINS}] or None; got {nbins!r}")
    return int(nbins)


def check_reference(reference, reference_mask=None, name="reference"):
    """Refuse a reference that cannot define a histogram to match: a flat channel.

    :func:`match_histograms` maps every image to a uniform one for such a reference, as
    scikit-image does; tools call this first to refuse a single-colour (or, when white is not
    ignored, blank) template. ``reference_mask`` (bool, H×W) restricts the check to the pixels
    used.
    """
    pixels = reference.reshape(-1, 3) if reference_mask is None else reference[reference_mask]
    if pixels.size == 0:
        return
    low, high = pixels.min(axis=0), pixels.max(axis=0)
    flat = np.flatnonzero(low == high)
    if flat.size:
        channels = ", ".join("RGB"[c] for c in flat)
        raise ValueError(f"{name} is flat in channel {channels} (every pixel used has value "
                         f"{low[flat[0]]!r}); matching to it would make that channel of every image uniform")


def _quantised_reference(values, counts, nbins, low, high):
    """Re-bin a reference histogram into ``nbins`` equal bins like MATLAB's imhist.

    Bin centres are ``linspace(low, high, nbins)`` and every value goes to the
    nearest centre, so matched outputs can only take those ``nbins`` levels.
    """
    centres = np.linspace(low, high, nbins)
    bin_index = np.rint((np.asarray(values, float) - low) * (nbins - 1) / (high - low))
    bin_index = np.clip(bin_index, 0, nbins - 1).astype(np.intp)
    binned = np.bincount(bin_index, weights=counts, minlength=nbins)
    used = binned > 0
    return centres[used], binned[used]


def _map_quantiles(source_quantiles, reference_quantiles, reference_values, discrete):
    """Matched value for each source quantile.

    Exact mode interpolates the reference's inverse CDF (as scikit-image does).
    Discrete (``nbins``) mode picks, like MATLAB's ``histeq``, the reference
    level whose cumulative quantile is nearest, so outputs stay on the levels.
    """
    if not discrete:
        return np.interp(source_quantiles, reference_quantiles, reference_values)
    above = np.searchsorted(reference_quantiles, source_quantiles, side="left")
    above = np.minimum(above, len(reference_quantiles) - 1)
    below = np.maximum(above - 1, 0)
    nearer_below = np.abs(reference_quantiles[below] - source_quantiles) < np.abs(
        reference_quantiles[above] - source_quantiles
    )
    return reference_values[np.where(nearer_below, below, above)]


def _uint8_lut(source_counts, reference_counts, nbins):
    """256-entry look-up table mapping source grey levels to matched levels."""
    source_quantiles = np.cumsum(source_counts) / source_counts.sum()
    reference_values = np.flatnonzero(reference_counts)
    reference_weights = reference_counts[reference_values]
    if nbins is not None:
        reference_values, reference_weights = _quantised_reference(
            reference_values, reference_weights, nbins, 0.0, 255.0
        )
    reference_quantiles = np.cumsum(reference_weights) / reference_weights.sum()
    matched = _map_quantiles(
        source_quantiles, reference_quantiles, reference_values, nbins is not None
    )
    # Round (not truncate) and clip so nothing wraps around in uint8.
    return np.clip(np.rint(matched), 0, 255).astype(np.uint8)


# Fast uint8 path. An RGB uint8 image viewed as little-endian uint16 holds two
# bytes per element, i.e. two channel values at once: for each pair of pixels
# (RGB RGB) the three uint16 "phases" are (R0,G0), (B0,R1), (G1,B1). Histograms
# and look-ups on 65536-entry tables then touch half as many elements as
# per-channel work, which is where the speed over scikit-image comes from.
_PAIR_CHANNELS = ((0, 1), (2, 0), (1, 2))  # (low byte, high byte) channel of each phase


def _pixel_pairs(flat_pixels):
    """(P, 3) '<u2' view of the first even number of pixels of an (N, 3) uint8 array."""
    n_even = flat_pixels.shape[0] - flat_pixels.shape[0] % 2
    return flat_pixels[:n_even].reshape(-1).view("<u2").reshape(-1, 3)


def _uint8_channel_counts(flat_pixels):
    """Histograms (3, 256) of a C-contiguous (N, 3) uint8 pixel array."""
    counts = np.zeros((3, 256), dtype=np.int64)
    pairs = _pixel_pairs(flat_pixels)
    for phase, (low, high) in enumerate(_PAIR_CHANNELS):
        joint = np.bincount(pairs[:, phase], minlength=65536).reshape(256, 256)
        counts[low] += joint.sum(axis=0)  # index = high * 256 + low
        counts[high] += joint.sum(axis=1)
    if flat_pixels.shape[0] % 2:  # odd pixel count: last pixel is not in a pair
        counts[np.arange(3), flat_pixels[-1]] += 1
    return counts


def _take_pixels(flat_pixels, index):
    """``flat_pixels.take(index, axis=0)`` for (N, 3) uint8, faster as 3-byte records."""
    return flat_pixels.view("V3").reshape(-1).take(index).view(np.uint8).reshape(-1, 3)


def _masked_channel_counts(flat_pixels, flat_mask):
    """Tissue histograms (3, 256) and the background (indices, pixels) to restore.

    Boolean indexing of a large image is slow; np.flatnonzero + take is not. We
    gather whichever side of the mask is smaller: with mostly tissue, tissue
    counts = all counts - background counts.
    """
    n_tissue = np.count_nonzero(flat_mask)
    if n_tissue * 2 >= flat_mask.size:
        background_index = np.flatnonzero(~flat_mask)
        background_pixels = _take_pixels(flat_pixels, background_index)
        counts = _uint8_channel_counts(flat_pixels) - _uint8_channel_counts(background_pixels)
        return counts, background_index, background_pixels, None
    tissue_index = np.flatnonzero(flat_mask)
    tissue_pixels = _take_pixels(flat_pixels, tissue_index)
    return _uint8_channel_counts(tissue_pixels), None, None, (tissue_index, tissue_pixels)


def _apply_channel_luts(flat_pixels, luts):
    """Apply per-channel 256-entry LUTs (3, 256) to an (N, 3) uint8 array."""
    out = np.empty_like(flat_pixels)
    pairs, out_pairs = _pixel_pairs(flat_pixels), _pixel_pairs(out)
    for phase, (low, high) in enumerate(_PAIR_CHANNELS):
        # 65536-entry table for this phase: entry high*256+low -> both outputs.
        pair_lut = np.add.outer(luts[high].astype("<u2") << 8, luts[low].astype("<u2"))
        # take() into a strided `out` goes through a hidden temporary and is
        # ~1.5x slower than taking into a fresh array and assigning the column.
        out_pairs[:, phase] = pair_lut.ravel().take(pairs[:, phase])
    if flat_pixels.shape[0] % 2:
        out[-1] = luts[np.arange(3), flat_pixels[-1]]
    return out


def _put_pixels(flat_pixels, index, pixels):
    """``flat_pixels[index] = pixels`` for (N, 3) uint8, ~3x faster via 3-byte records."""
    np.put(flat_pixels.view("V3").reshape(-1), index, pixels.view("V3").reshape(-1))


def _match_uint8(image, reference, mask, reference_mask, nbins):
    flat_image = np.ascontiguousarray(image).reshape(-1, 3)
    flat_reference = np.ascontiguousarray(reference).reshape(-1, 3)
    if reference_mask is None:
        reference_counts = _uint8_channel_counts(flat_reference)
    else:
        reference_counts = _masked_channel_counts(flat_reference, reference_mask.reshape(-1))[0]
    if mask is None:
        source_counts = _uint8_channel_counts(flat_image)
        tissue = None
    else:
        source_counts, background_index, background_pixels, tissue = _masked_channel_counts(
            flat_image, mask.reshape(-1)
        )
    luts = np.stack(
        [_uint8_lut(source_counts[c], reference_counts[c], nbins) for c in range(3)]
    )
    if tissue is not None:  # mostly background: change only the gathered tissue pixels
        tissue_index, tissue_pixels = tissue
        matched = flat_image.copy()
        _put_pixels(matched, tissue_index, luts[np.arange(3), tissue_pixels])
        return matched.reshape(image.shape)
    matched = _apply_channel_luts(flat_image, luts)
    if mask is not None:  # put background back exactly as it was
        _put_pixels(matched, background_index, background_pixels)
    return matched.reshape(image.shape)


def _match_float(image, reference, mask, reference_mask, nbins):
    matched = image.copy()
    for channel in range(3):
        source = image[..., channel] if mask is None else image[..., channel][mask]
        template = (
            reference[..., channel]
            if reference_mask is None
            else reference[..., channel][reference_mask]
        )
        source_values, source_lookup, source_counts = np.unique(
            source.ravel(), return_inverse=True, return_counts=True
        )
        template_values, template_counts = np.unique(template.ravel(), return_counts=True)
        if nbins is not None:
            # Float images in [0, 1] use that range (like MATLAB for doubles);
            # anything else is taken to be on the 0..255 scale.
            high = 1.0 if template_values[-1] <= 1.0 and source_values[-1] <= 1.0 else 255.0
            template_values, template_counts = _quantised_reference(
                template_values, template_counts, nbins, 0.0, high
            )
        source_quantiles = np.cumsum(source_counts) / source.size
        template_quantiles = np.cumsum(template_counts) / template_counts.sum()
        mapped = _map_quantiles(
            source_quantiles, template_quantiles, template_values, nbins is not None
        )
        values = mapped[source_lookup.ravel()].astype(image.dtype, copy=False)
        if mask is None:
            matched[..., channel] = values.reshape(source.shape)
        else:
            matched[..., channel][mask] = values
    return matched


def match_histograms(
    image,
    reference,
    mask=None,
    reference_mask=None,
    ignore_white=False,
    nbins=None,
    white_threshold=200,
):
    """Match the per-channel histograms of an RGB image to a reference image.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), uint8 or float
        Image to transform.
    reference : ndarray, shape (H2, W2, 3), same kind of dtype as ``image``
        Template whose colour distribution ``image`` should take on.
    mask, reference_mask : ndarray, shape (H, W) / (H2, W2), bool, optional
        Tissue pixels of ``image`` / ``reference``. When given, the mapping is
        computed from these pixels only, and only masked pixels of ``image``
        are changed: background stays bit-identical.
    ignore_white : bool, optional
        Build missing masks with :func:`tissue_mask` at ``white_threshold``.
    nbins : int, optional
        None (default) matches the exact cumulative distributions, as
        ``skimage.exposure.match_histograms(image, reference, channel_axis=-1)``
        does. An integer re-bins the reference histogram into ``nbins`` equal
        bins first, like MATLAB's ``imhistmatch(image, reference, nbins)``:
        outputs then take at most ``nbins`` levels per channel.
    white_threshold : float, optional
        Grey level above which a pixel is background (image units).

    Returns
    -------
    matched : ndarray, shape (H, W, 3), dtype of ``image``
        uint8 results are rounded and clipped (never wrapped); float results
        keep the float dtype. When ``image`` or ``reference`` has no tissue the
        image is returned unchanged (a copy) with a :class:`NoTissueWarning`.

    Notes
    -----
    The uint8 path histograms and looks up two channel values at once (the
    image viewed as uint16, 65536-entry tables); masked mode gathers only the
    smaller side of the mask with ``np.flatnonzero`` + ``take`` and puts
    background pixels back afterwards. The float path interpolates exact
    quantiles, like scikit-image.
    Unmasked histogram matching of a blank image follows scikit-image (it is
    mapped onto the reference); pass ``ignore_white=True`` to leave it alone.
    """
    image = check_rgb(image, "image")
    reference = check_rgb(reference, "reference")
    if (image.dtype == np.uint8) != (reference.dtype == np.uint8):
        raise ValueError(
            f"image and reference must both be uint8 or both float; got "
            f"{image.dtype} and {reference.dtype}"
        )
    nbins = _check_nbins(nbins)
    mask, reference_mask = resolve_masks(
        image, reference, mask, reference_mask, ignore_white, white_threshold
    )
    for name, which_mask in (("image", mask), ("reference", reference_mask)):
        if which_mask is not None and not which_mask.any():
            warnings.warn(
                f"{name} has no tissue pixels (mask empty); returning the image unchanged",
                NoTissueWarning,
                stacklevel=2,
            )
            return image.copy()
    if image.dtype == np.uint8:
        return _match_uint8(image, reference, mask, reference_mask, nbins)
    return _match_float(image, reference, mask, reference_mask, nbins)
