"""Slide-sized outputs written with bounded memory: tiled pyramidal TIFFs and nucleus GeoJSON.

* :func:`write_pyramid` writes a 2-D uint8 array (usually a disk-backed ``np.memmap``) as a
  tiled, deflate-compressed BigTIFF with reduced-resolution levels in the following
  directories (``NewSubfileType`` 1), the layout OpenSlide's generic-TIFF reader, QuPath and
  tifffile open as a pyramid. Each level is read a row of tiles at a time.
* :func:`iter_nuclei` labels a binary mask strip by strip: objects that reach the bottom of a
  strip are carried into the next one, so a nucleus cut by any tile or strip border is one
  object (8-connectivity), while memory stays a strip plus the carried rows. Each object is
  split into nuclei by the instance step of :mod:`caffe_layers.instances` (distance
  watershed; objects under ``DEFAULT_MIN_SIZE`` pixels, 10, are not nuclei and are not
  exported), the step tiles are scored with.
* :func:`write_geojson` streams one GeoJSON polygon per nucleus (a FeatureCollection QuPath
  imports as detections). Every polygon is valid (a simple ring with positive area, what
  shapely's ``is_valid`` and GeoPandas/QuPath expect); see ``docs/nuclei.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["downsample2", "iter_nuclei", "nucleus_polygon", "write_geojson", "write_pyramid"]

_EIGHT = np.ones((3, 3), bool)


def downsample2(source, target, mode, rows=512):
    """Halve a 2-D uint8 array into ``target`` (``ceil(h/2) × ceil(w/2)``), ``rows`` source rows at a time.

    ``mode`` is ``"max"`` (a mask: a nucleus stays visible at every zoom) or ``"mean"``
    (rounded average of the 2×2 pixels; missing ones at odd edges count as 0).
    """
    height, width = source.shape
    rows += rows % 2
    for y in range(0, height, rows):
        strip = np.asarray(source[y:y + rows])
        pad_h, pad_w = strip.shape[0] % 2, width % 2
        if pad_h or pad_w:
            strip = np.pad(strip, ((0, pad_h), (0, pad_w)))
        blocks = strip.reshape(strip.shape[0] // 2, 2, strip.shape[1] // 2, 2)
        if mode == "max":
            small = blocks.max(axis=(1, 3))
        else:
            small = ((blocks.sum(axis=(1, 3), dtype=np.uint16) + 2) // 4).astype(np.uint8)
        target[y // 2:y // 2 + small.shape[0]] = small
    return target


def _tiles(array, tile):
    height, width = array.shape
    for y in range(0, height, tile):
        strip = np.asarray(array[y:y + tile])
        for x in range(0, width, tile):
            yield strip[:, x:x + tile]


def write_pyramid(path, level0, scratch, *, mode="max", mpp=None, tile=256, smallest=1024):
    """Write ``level0`` (2-D uint8) and its halvings down to ``smallest`` pixels as a tiled pyramidal BigTIFF.

    Parameters
    ----------
    path : path
        Output file (written in place: the caller renames it into its final name).
    level0 : (H, W) uint8 array or memmap
    scratch : path
        Folder for the reduced levels' memmaps (removed by the caller).
    mode : {"max", "mean"}
        How levels are reduced (see :func:`downsample2`).
    mpp : float, optional
        Micrometres per pixel of ``level0``, written as the resolution tags of every level.
    """
    import tifffile

    levels = [level0]
    while max(levels[-1].shape) > smallest and min(levels[-1].shape) > 1:
        height, width = levels[-1].shape
        reduced = np.memmap(Path(scratch) / f"{Path(path).name}.level{len(levels)}", mode="w+", dtype=np.uint8,
                            shape=(math.ceil(height / 2), math.ceil(width / 2)))
        levels.append(downsample2(levels[-1], reduced, mode))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, array in enumerate(levels):
            options = {}
            if mpp:
                pixels_per_cm = 1e4 / (mpp * 2 ** index)
                options = dict(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
            tif.write(_tiles(array, tile), shape=array.shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                      photometric="minisblack", subfiletype=0 if index == 0 else 1, metadata=None,
                      software="caffe-stain-augment", **options)
    for array in levels[1:]:
        name = array.filename
        del array
        Path(name).unlink(missing_ok=True)
    return Path(path)


def _ring(piece):
    """Outline of a 2-D bool object (padded with background) as a simple polygon.

    Marching squares (level 0.5, diagonal neighbours joined) trace the boundary between the
    object's pixel centres and the background's: vertices sit on pixel-edge midpoints, each
    is visited once and cells never hold crossing segments, so the ring is simple (no self
    intersection, no self touching) and has area even for a 1-pixel object (a diamond).
    Holes are not traced (the outermost boundary is kept); collinear vertices are dropped.
    Returns ``(n, 2)`` float ``(x, y)`` in the padded array's pixel-index coordinates, open
    (first vertex not repeated).
    """
    from skimage.measure import find_contours

    contours = find_contours(piece.astype(np.float32), 0.5, fully_connected="high")
    closed = contours[0] if len(contours) == 1 else max(contours, key=_enclosed_area)
    points = closed[:, ::-1]  # (x, y); closed, so points[-1] == points[0]
    steps = np.diff(points, axis=0)  # steps[i]: from vertex i to i + 1
    before = np.concatenate([steps[-1:], steps[:-1]])
    turning = before[:, 0] * steps[:, 1] - before[:, 1] * steps[:, 0] != 0
    return points[:-1][turning]


def _enclosed_area(closed):
    """Area inside a closed ``(n, 2)`` contour (last point == first), shoelace formula."""
    return abs(float(np.dot(closed[:-1, 0], closed[1:, 1]) - np.dot(closed[1:, 0], closed[:-1, 1]))) / 2


def _nuclei_of_components(labels, closed, r0, instance_options, chunk):
    """``(area, ring)`` of the nuclei of the components ``closed`` of ``labels``, via the instance step.

    Components are processed in column chunks (by where they start) with background around
    them, so memory stays a strip × ``chunk`` columns whatever the slide's width.
    """
    from ..instances import instances_from_probability

    boxes = ndimage.find_objects(labels)
    starts = np.array([boxes[index - 1][1].start for index in closed])
    for group in np.unique(starts // chunk):
        members = closed[starts // chunk == group]
        y0 = min(boxes[i - 1][0].start for i in members)
        y1 = max(boxes[i - 1][0].stop for i in members)
        x0 = min(boxes[i - 1][1].start for i in members)
        x1 = max(boxes[i - 1][1].stop for i in members)
        selected = np.zeros(labels.max() + 1, bool)
        selected[members] = True
        mask = np.pad(selected[labels[y0:y1, x0:x1]], 1)
        nuclei = instances_from_probability(mask, 0.5, **instance_options)
        for index, box in enumerate(ndimage.find_objects(nuclei), start=1):
            if box is None:
                continue
            grown = tuple(slice(b.start - 1, b.stop + 1) for b in box)  # the pad keeps this inside
            piece = nuclei[grown] == index
            # Padded-crop index -> mask pixel corners: -1 (pad), + box and chunk origin, +0.5 (centre).
            offset = (x0 + grown[1].start - 1 + 0.5, r0 + y0 + grown[0].start - 1 + 0.5)
            yield int(np.count_nonzero(piece)), _ring(piece) + offset


def iter_nuclei(mask, strip=1024, max_carry=8192, *, chunk=2048, **instance_options):
    """Nuclei of a 2-D mask read ``strip`` rows at a time, each as ``(area, ring)``.

    The mask's connected objects (8-connectivity) are split into nuclei by the package's
    instance step, :func:`caffe_layers.instances.instances_from_probability` (hole filling,
    distance-transform watershed, objects under ``min_size`` pixels dropped), with its
    defaults unless ``instance_options`` say otherwise. ``area`` is the nucleus's pixel
    count; ``ring`` an ``(n, 2)`` float array of ``(x, y)`` outline vertices in pixel-corner
    coordinates of ``mask`` (pixel ``(r, c)`` covers ``[c, c+1) × [r, r+1)``), a simple
    polygon (see :func:`_ring`).

    An object still touching the bottom of the rows read so far is carried (with its rows
    only) into the next strip, so objects across strip borders come out whole and are split
    as one. Each object is split with only the objects starting in its ``chunk`` columns of
    the strip around it, so a nucleus within a few pixels of another object processed
    separately can be split slightly differently than in one whole-image call. Objects come
    in a fixed order (strip by strip, chunk by chunk, then by watershed marker). A carried
    object taller than ``max_carry`` rows (not a nucleus: e.g. a fold segmented as one blob)
    is processed in parts, which keeps memory bounded.
    """
    height = mask.shape[0]
    carry, carry_y0 = None, 0
    for s0 in range(0, height, strip):
        s1 = min(height, s0 + strip)
        new = np.asarray(mask[s0:s1]) != 0
        region, r0 = (new, s0) if carry is None else (np.vstack([carry, new]), carry_y0)
        carry = None
        labels, count = ndimage.label(region, structure=_EIGHT)
        if count == 0:
            continue
        is_open = np.zeros(count + 1, bool)
        if s1 < height and region.shape[0] < max_carry:
            is_open[np.unique(labels[-1])] = True
            is_open[0] = False
        closed = np.flatnonzero(~is_open[1:]) + 1
        if closed.size:
            yield from _nuclei_of_components(labels, closed, r0, instance_options, chunk)
        if is_open.any():
            rows = np.flatnonzero(is_open[labels].any(axis=1))
            carry, carry_y0 = is_open[labels[rows[0]:]], r0 + rows[0]


def nucleus_polygon(ring, scale=(1.0, 1.0)):
    """Closed exterior ring ``[[x, y], ...]`` of an outline from :func:`iter_nuclei`, scaled.

    ``ring`` is in pixel-corner coordinates of the segmented mask; ``scale`` ``(sy, sx)``
    takes it to the output's (e.g. level-0 pixels of the slide). Rounded to 0.01.
    """
    scale_y, scale_x = scale
    points = np.round(np.asarray(ring, float) * (scale_x, scale_y), 2).tolist()
    return points + [points[0]]


def write_geojson(path, nuclei, scale=(1.0, 1.0), properties=None):
    """Stream a GeoJSON FeatureCollection, one Polygon per ``(area, contour)`` of ``nuclei``; returns the count.

    Each feature is a QuPath detection classified ``Nucleus``, with ``area_px`` (pixels at the
    resolution segmented). ``properties`` are added to the collection.
    """
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        head = {"type": "FeatureCollection"}
        if properties:
            head["properties"] = properties
        handle.write(json.dumps(head)[:-1] + ', "features": [\n')
        for area, contour in nuclei:
            feature = {"type": "Feature", "id": count + 1,
                       "geometry": {"type": "Polygon", "coordinates": [nucleus_polygon(contour, scale)]},
                       "properties": {"objectType": "detection", "classification": {"name": "Nucleus"},
                                      "area_px": area}}
            handle.write(("" if count == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            count += 1
        handle.write("\n]}\n")
    return count
