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

    Yields ``(y0, x0, crop)``: the object's bounding-box corner and its boolean crop. An
    object still touching the bottom of the rows read so far is carried (with its rows only)
    into the next strip, so objects across strip borders come out whole. Objects are yielded
    in a fixed order (strip by strip, raster order of their first pixel). A carried object
    taller than ``max_carry`` rows (not a nucleus: e.g. a fold segmented as one blob) is
    yielded in parts, which keeps memory bounded.
    """
    height = mask.shape[0]
    carry, carry_y0 = None, 0
    for s0 in range(0, height, strip):
        s1 = min(height, s0 + strip)
        new = np.asarray(mask[s0:s1]) != 0
        region, r0 = (new, s0) if carry is None else (np.vstack([carry, new]), carry_y0)
        labels, count = ndimage.label(region, structure=_EIGHT)
        carry = None
        if count == 0:
            continue
        slices = ndimage.find_objects(labels)
        is_open = np.zeros(count + 1, bool)
        if s1 < height and region.shape[0] < max_carry:
            is_open[np.unique(labels[-1])] = True
            is_open[0] = False
        for label, box in enumerate(slices, 1):
            if not is_open[label]:
                yield r0 + box[0].start, box[1].start, labels[box] == label
        if is_open.any():
            top = min(slices[label - 1][0].start for label in np.flatnonzero(is_open))
            carry, carry_y0 = is_open[labels[top:]], r0 + top


def nucleus_polygon(y0, x0, crop, scale=(1.0, 1.0)):
    """Closed exterior ring ``[[x, y], ...]`` of one object, in the coordinates of ``scale`` × pixels.

    Vertices are the boundary pixels' centres (``(x + 0.5) * scale_x``); an object too thin
    for a polygon through centres (1 or 2 pixels across) gets its pixels' bounding box.
    """
    scale_y, scale_x = scale
    contours, _ = cv2.findContours(np.pad(crop, 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=len)[:, 0, :] - 1 if contours else np.zeros((0, 2), int)
    if len(np.unique(contour, axis=0)) >= 3:
        points = (contour + 0.5 + (x0, y0)) * (scale_x, scale_y)
    else:
        h, w = crop.shape
        points = np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]], float) * (scale_x, scale_y)
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in points]
    return ring + [ring[0]]


def write_geojson(path, nuclei, scale=(1.0, 1.0), properties=None):
    """Stream a GeoJSON FeatureCollection, one Polygon per ``(y0, x0, crop)`` of ``nuclei``; returns the count.

    Each feature is a QuPath detection classified ``Nucleus``, with ``area_px`` (pixels at the
    resolution segmented). ``properties`` are added to the collection.
    """
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        head = {"type": "FeatureCollection"}
        if properties:
            head["properties"] = properties
        handle.write(json.dumps(head)[:-1] + ', "features": [\n')
        for y0, x0, crop in nuclei:
            feature = {"type": "Feature", "id": count + 1,
                       "geometry": {"type": "Polygon", "coordinates": [nucleus_polygon(y0, x0, crop, scale)]},
                       "properties": {"objectType": "detection", "classification": {"name": "Nucleus"},
                                      "area_px": int(crop.sum())}}
            handle.write(("" if count == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            count += 1
        handle.write("\n]}\n")
    return count
