"""Slide-sized outputs written with bounded memory: tiled pyramidal TIFFs and nucleus GeoJSON.

* :func:`write_pyramid` writes a 2-D uint8 array (usually a disk-backed ``np.memmap``) as a
  tiled, deflate-compressed BigTIFF with reduced-resolution levels in the following
  directories (``NewSubfileType`` 1), the layout OpenSlide's generic-TIFF reader, QuPath and
  tifffile open as a pyramid. Each level is read a row of tiles at a time.
* :func:`iter_nuclei` labels a binary mask strip by strip: objects that reach the bottom of a
  strip are carried into the next one, so a nucleus cut by any tile or strip border is one
  object (8-connectivity), while memory stays a strip plus the carried rows.
* :func:`write_geojson` streams one GeoJSON polygon per nucleus (a FeatureCollection QuPath
  imports as detections).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
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


def iter_nuclei(mask, strip=1024, max_carry=8192):
    """Connected objects (8-connectivity) of a 2-D mask read ``strip`` rows at a time.

    Yields ``(area, contour)``: the object's pixel count and its outer boundary, an ``(n, 2)``
    int array of ``(x, y)`` pixel positions in ``mask`` (``cv2.findContours``, simple chain; holes are not traced).
    An object still touching the bottom of the rows read so far is carried (with its rows only)
    into the next strip, so objects across strip borders come out whole. Objects come in a
    fixed order (strip by strip, then in ``cv2.findContours`` order). A carried object taller
    than ``max_carry`` rows (not a nucleus: e.g. a fold segmented as one blob) is yielded in
    parts, which keeps memory bounded.
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
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        # The outer contours of a binary image (the top level of RETR_CCOMP, which also has
        # objects lying in another's hole there) are its 8-connected components, one each.
        contours, hierarchy = cv2.findContours(region.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        for contour, links in zip(contours, hierarchy[0] if contours else ()):
            if links[3] != -1:
                continue  # a hole
            points = contour[:, 0, :]
            label = labels[points[0, 1], points[0, 0]]
            if not is_open[label]:
                yield int(areas[label]), points + (0, r0)
        if is_open.any():
            rows = np.flatnonzero(is_open[labels].any(axis=1))
            carry, carry_y0 = is_open[labels[rows[0]:]], r0 + rows[0]


def nucleus_polygon(contour, scale=(1.0, 1.0)):
    """Closed exterior ring ``[[x, y], ...]`` of a contour, in the coordinates of ``scale`` × pixels.

    Vertices are the boundary pixels' centres (``(x + 0.5) * scale_x``); an object too thin
    for a polygon through centres (a pixel, a straight line) gets its pixels' bounding box.
    """
    scale_y, scale_x = scale
    if len(contour) >= 3 and cv2.contourArea(contour.reshape(-1, 1, 2).astype(np.int32)) > 0:
        points = (contour + 0.5) * (scale_x, scale_y)
    else:
        (x0, y0), (x1, y1) = contour.min(axis=0), contour.max(axis=0) + 1
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float) * (scale_x, scale_y)
    ring = np.round(points, 2).tolist()
    return ring + [ring[0]]


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
