"""From a nucleus probability map to nucleus instances (an instance label image).

The step (see ``docs/nuclei.md``):

1. threshold the probability (``prob > threshold``) and fill holes inside objects;
2. split touching nuclei with a marker-controlled watershed on the distance transform: the
   Euclidean distance to the background is smoothed (Gaussian, ``sigma``); its peaks are the
   maxima of a ``(2 min_distance + 1)²`` window, and peaks not separated by a saddle at
   least ``h`` pixels deep share one marker (the h-maximum region holding them), one marker
   per nucleus; a connected object without any peak keeps one label;
3. drop objects of fewer than ``min_size`` pixels and number the rest 1..N, in the order of
   their markers (raster order of each marker's first pixel; objects without a peak last).

Everything is deterministic (no random choice, ties broken by position). The defaults are
placeholders for values chosen on validation data; callers that report results pass them
explicitly.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_MIN_SIZE", "instances_from_probability", "label_components", "remove_small",
           "split_touching"]

#: Objects smaller than this many pixels are not nuclei (at 0.25-0.5 µm/px a nucleus of
#: 4 µm diameter covers 50-200 px): noise specks of a thresholded map.
DEFAULT_MIN_SIZE = 10

_EIGHT = np.ones((3, 3), bool)


def _binary(mask, name):
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {mask.shape}")
    return mask != 0


def remove_small(labels, min_size):
    """Drop objects of fewer than ``min_size`` pixels and renumber the rest 1..N, keeping their order.

    Parameters
    ----------
    labels : (H, W) non-negative integer array
    min_size : int
        Smallest object kept, in pixels (0 or 1 keeps every object).

    Returns
    -------
    (H, W) int32 ndarray
    """
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    keep = areas >= max(int(min_size), 1)
    keep[0] = False
    lookup = np.zeros(areas.size, np.int32)
    lookup[keep] = np.arange(1, np.count_nonzero(keep) + 1)
    return lookup[labels]


def label_components(mask, min_size=DEFAULT_MIN_SIZE):
    """Connected components (8-connectivity) of a mask, without the small ones.

    Parameters
    ----------
    mask : (H, W) array
        Nonzero is foreground.
    min_size : int
        Components of fewer pixels are dropped.

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, 1..N in raster order of each component's first pixel.
    """
    labels, _ = ndimage.label(_binary(mask, "mask"), structure=_EIGHT)
    return remove_small(labels, min_size)


def _keep_h_maxima(peaks, distance, objects, h):
    """Replace (in place) the peaks of each object by the h-maxima regions holding them.

    The h-maxima are the regional maxima of the reconstruction by dilation of
    ``distance - h`` under ``distance``: plateaus holding every peak that no saddle less
    than ``h`` deep separates. Peaks in one such region become one marker, the region
    itself; peaks outside every region are dropped. (``skimage.morphology.h_maxima`` keeps
    the tip of each of two equal peaks instead, so it would not join them.) The background
    (distance 0) separates objects, so this is done object by object, and only in objects
    with several peak pixels: a single peak is its object's maximum, always kept.
    """
    from skimage.morphology import local_maxima, reconstruction

    several = np.bincount(objects[peaks], minlength=objects.max() + 1) > 1
    several[0] = False
    boxes = ndimage.find_objects(objects)
    for index in np.flatnonzero(several):
        box = boxes[index - 1]
        inside = objects[box] == index
        height = np.where(inside, distance[box], 0.0)
        flooded = reconstruction(np.maximum(height - h, 0.0), height, method="dilation")
        tops = local_maxima(flooded, connectivity=2, allow_borders=True) & inside
        regions, _ = ndimage.label(tops, structure=_EIGHT)
        with_peak = np.unique(regions[peaks[box] & inside])
        peaks[box] = np.where(inside, np.isin(regions, with_peak[with_peak > 0]), peaks[box])


def _markers(distance, objects, min_distance, h):
    """Marker labels: the distance peaks (see the module docstring), plus every object without one."""
    size = 2 * int(min_distance) + 1
    peaks = (distance == ndimage.maximum_filter(distance, size=size)) & (distance > 0)
    if h > 0:
        _keep_h_maxima(peaks, distance, objects, h)
    markers, count = ndimage.label(peaks, structure=_EIGHT)
    without = np.ones(objects.max() + 1, bool)
    without[objects[peaks]] = False
    without[0] = False
    if without.any():
        lonely = without[objects]
        markers[lonely] = count + ndimage.label(lonely, structure=_EIGHT)[0][lonely]
    return markers


def split_touching(mask, *, min_distance=3, sigma=1.0, h=1.0):
    """Split a binary mask into objects with a distance-transform watershed (no size filter).

    Parameters
    ----------
    mask : (H, W) array
        Nonzero is foreground.
    min_distance : int
        Half-width of the window a distance peak must be the maximum of: peaks closer than
        this to a higher one are not separate nuclei.
    sigma : float
        Gaussian smoothing (pixels) of the distance transform before finding peaks; 0 for
        none. It merges the spurious peaks of ragged outlines.
    h : float
        Peaks joined by a saddle less than ``h`` pixels of distance below them (or below
        the lower of them: an h-maxima test) are one nucleus; 0 disables the test.

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background; each object 8-connected and inside one connected component of ``mask``.
    """
    from skimage.segmentation import watershed

    mask = _binary(mask, "mask")
    objects, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return np.zeros(mask.shape, np.int32)
    distance = ndimage.distance_transform_edt(mask)
    if sigma > 0:
        distance = ndimage.gaussian_filter(distance, sigma) * mask
    markers = _markers(distance, objects, min_distance, h)
    return watershed(-distance, markers, mask=mask, connectivity=2).astype(np.int32)


def instances_from_probability(prob, threshold=0.5, *, min_distance=3, min_size=DEFAULT_MIN_SIZE, sigma=1.0,
                               h=1.0, fill_holes=True):
    """Nucleus instances from a probability map (or a binary mask): threshold, watershed, size filter.

    Parameters
    ----------
    prob : (H, W) float array
        Nucleus probability (a binary mask works too: any ``threshold`` in [0, 1) keeps it).
    threshold : float
        Pixels with ``prob > threshold`` are nucleus.
    min_distance : int
        See :func:`split_touching`.
    min_size : int
        Objects (after splitting) of fewer pixels are dropped.
    sigma : float
        See :func:`split_touching`.
    h : float
        See :func:`split_touching`.
    fill_holes : bool
        Fill background enclosed by a nucleus (a nucleus has no holes; a hole is a dip of
        the probability inside it).

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, nuclei 1..N.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"probability map must be a 2-D (H, W) array, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.number) and prob.dtype != bool:
        raise ValueError(f"probability map must be numeric, got dtype {prob.dtype}")
    mask = prob > threshold
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return remove_small(split_touching(mask, min_distance=min_distance, sigma=sigma, h=h), min_size)
