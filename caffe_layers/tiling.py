"""Tiled, streamed inference of a nuclei segmenter on images of any size (pure numpy).

:func:`tile_grid` and :func:`segment_tiled` work with any ``predict`` callable mapping an
``N×3×h×w`` float32 batch (RGB, 0–255) to ``N×2×h×w`` probabilities (channel 1 = nucleus);
:class:`caffe_layers.net.inference.caffe_engine.CaffeSegmenter` is one for a Caffe deploy net. The
defaults of every tool that tiles (:data:`DEFAULT_TILE`, :data:`DEFAULT_OVERLAP`,
:data:`DEFAULT_THRESHOLD`, :data:`DEFAULT_MULTIPLE`) are defined here once.

Overlap and receptive field: a tile's output is exact (equal to one pass over the whole image)
wherever the net's receptive field stays inside the tile. Each tile keeps only its centre, at
least ``overlap // 2`` pixels from any side facing another tile, so tiling is seam-free when
the receptive-field radius is at most ``overlap // 2``. The commands take the radius from the
prototxt (:func:`caffe_layers.net.inference.receptive_field.receptive_radius`) and overlap by
twice it unless told otherwise; :data:`DEFAULT_OVERLAP` is for nets it cannot follow. The U-Net templates of
:mod:`caffe_layers.net.training.templates` (depth 2, 3×3 convolutions, mean-file centring) have a radius of 23
pixels (26 with ``upsample_kernel=4``; measured: an input pixel changes outputs at most that
far away), i.e. a field about 47 pixels wide, so they need ``overlap >= 46`` (52); the default
:data:`DEFAULT_OVERLAP` = 64 leaves a margin. The radius roughly doubles with every extra
level of depth. Mean-file centring is tile-independent as long as the mean subtracted is the
same everywhere: :class:`caffe_layers.mean_subtract.MeanSubtractLayer` subtracts the mean image
pixel by pixel only for inputs of exactly its size, so with a non-flat mean file (one written
without ``--patch-size``) avoid tiles of that size. Per-tile centring (``"patchmean"``, Caffe
``MVN``) depends on the whole tile and can never be exactly tile-independent; larger tiles make
it closer to one pass.
"""
import math

import numpy as np

from .image_io import check_rgb

DEFAULT_TILE = 256
"""Default tile side in pixels."""
DEFAULT_OVERLAP = 64
"""Default tile overlap in pixels: at least twice the receptive-field radius (23) of the
depth-2 U-Net templates, plus a margin (see the module docstring)."""
DEFAULT_THRESHOLD = 0.5
"""Default probability above which a pixel is nucleus."""
DEFAULT_MULTIPLE = 4
"""Default multiple of the net's input sides (``2**depth`` for the depth-2 U-Net templates)."""

__all__ = ["DEFAULT_MULTIPLE", "DEFAULT_OVERLAP", "DEFAULT_THRESHOLD", "DEFAULT_TILE", "check_threshold",
           "dihedral_tta", "segment_tiled", "tile_grid"]


def check_threshold(threshold):
    """Return ``threshold`` as a float, or raise ValueError unless it is a probability in [0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise ValueError(f"threshold must be a probability in [0, 1); got {threshold!r}")
    return float(threshold)


def _pair(value, name):
    if np.ndim(value) == 0:
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _axis_origins(size, tile, overlap, multiple):
    if size <= tile:
        return np.zeros(1, dtype=np.int64)
    # Stride a multiple of `multiple` keeps every tile on the same pooling grid as the full
    # image, so a U-Net sees each pixel at the same phase in every tile.
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    count = math.ceil((size - tile) / stride) + 1
    # The last tile is pushed back inside the image instead of hanging over its edge.
    return np.minimum(np.arange(count, dtype=np.int64) * stride, size - tile)


def tile_grid(height, width, tile, overlap, multiple=1):
    """Origins of overlapping tiles that cover an image.

    Parameters
    ----------
    height, width : int
        Image size.
    tile : int or (int, int)
        Tile size (rows, cols); clipped to the image when the image is smaller.
    overlap : int
        Minimum overlap of neighbouring tiles, in pixels (the last tile of a row or column
        may overlap more: it is aligned with the image edge).
    multiple : int, optional
        Steps between tiles are multiples of this (for nets with ``log2(multiple)`` poolings).

    Returns
    -------
    origins : (N, 2) int64 array
        ``(row, col)`` of each tile's top-left corner, row-major. Every tile lies inside the
        image and together they cover every pixel.
    """
    height, width = int(height), int(width)
    tile_h, tile_w = _pair(tile, "tile")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min(tile_h, tile_w) < 1 or overlap < 0 or overlap >= min(tile_h, tile_w):
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    ys = _axis_origins(height, tile_h, overlap, multiple)
    xs = _axis_origins(width, tile_w, overlap, multiple)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2)


def _keep_ranges(origins, tile, size):
    """Part of each tile (along one axis) that writes into the output.

    Neighbouring tiles split their overlap in the middle, so each tile keeps its centre and
    drops at least overlap/2 on each side facing another tile (where a net's padding makes
    its output unreliable), while the outermost tiles keep everything up to the image edge.
    """
    origins = np.unique(origins)
    cuts = (origins[1:] + origins[:-1] + tile) // 2
    # The padded image is larger than the real one: clip, a tile may then keep nothing.
    starts = np.minimum(np.concatenate([[0], cuts]), size)
    stops = np.minimum(np.concatenate([cuts, [size]]), size)
    return {int(o): (int(a), int(b)) for o, a, b in zip(origins, starts, stops)}


def _reflect(index, size):
    # numpy 'reflect' padding (edge not repeated), valid for any overhang, even size 1.
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def _read_tile(image, y0, y1, x0, x1):
    """``image[y0:y1, x0:x1, :3]`` of the image reflect-padded at the bottom/right, as float32.

    Only the rows and columns the tile needs are read, so a memmap stays on disk.
    """
    height, width = image.shape[:2]
    rows = _reflect(np.arange(y0, y1), height)
    cols = _reflect(np.arange(x0, x1), width)
    block = np.asarray(image[rows.min():rows.max() + 1, cols.min():cols.max() + 1, :3])
    if y1 > height or x1 > width:
        block = block[np.ix_(rows - rows.min(), cols - cols.min())]
    # HWC -> 1×3×h×w, RGB order kept (the project's nets are trained on RGB).
    return np.ascontiguousarray(block.transpose(2, 0, 1)[None], dtype=np.float32)


def segment_tiled(predict, rgb, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP, multiple=DEFAULT_MULTIPLE,
                  progress=False, out=None, batch_size=1, skip=None, stats=None, pad_batches=False):
    """Nucleus probability map of an image, predicted tile by tile.

    Tiles are streamed: each one is read from ``rgb``, predicted and written into the output
    before the next is read, so memory is the output map plus one tile. Each tile writes only
    its centre (it drops half the overlap on every side that faces another tile), so the
    result has no seams: with a net whose receptive field radius is at most ``overlap // 2``
    it equals one pass over the whole image, except within that radius of the bottom/right
    edges when the image is reflect-padded there (sides not multiples of ``multiple``).
    A net that centres each input on its own statistics (``MVN``) depends on the whole tile,
    so its tiled output only approximates one pass.

    Parameters
    ----------
    predict : callable
        ``predict(batch)`` with ``batch`` an ``(n, 3, h, w)`` float32 array (RGB, 0–255,
        ``n <= batch_size``), returning ``(n, C, h, w)`` probabilities, ``C >= 2``; channel 1
        is nucleus.
    rgb : (H, W, 3) array
        Image (uint8 usually; extra channels such as alpha are ignored). May be a
        ``np.memmap`` or a tifffile memmap.
    tile : int or (int, int)
        Tile size; rounded up to a multiple of ``multiple`` and clipped to the padded image.
    overlap : int
        Overlap of neighbouring tiles (at least twice the net's receptive field radius for
        seam-free output). The default, 64, suits the depth-2 U-Net templates (radius 23).
    multiple : int
        The net's input size must be a multiple of this (``2**depth`` for a U-Net). The
        image is reflect-padded at the bottom/right up to a multiple of it.
    progress : bool or str
        Show a tqdm progress bar over tiles (a string is used as its label).
    out : (H, W) float32 array, optional
        Where to write the result, e.g. a ``np.memmap``.
    batch_size : int
        Tiles per ``predict`` call (all tiles have the same shape); memory grows with it.
    skip : callable, optional
        ``skip(y0, y1, x0, x1)`` of the part of the image a tile writes; True leaves that part
        0 without running the net (e.g. glass of a whole slide).
    stats : dict, optional
        Filled with ``tiles`` (tiles that write something), ``skipped`` (how many of them
        ``skip`` spared), ``skipped_pixels`` (pixels written as 0 by skipped tiles) and
        ``net_pixels`` (input pixels the net was run on, padding tiles included).
    pad_batches : bool
        Fill a last, partial batch up to ``batch_size`` with copies of its last tile, so that
        ``predict`` always sees one input shape: an engine reallocates its buffers when the
        shape changes (tens of milliseconds on the CPU), which costs more than a few extra
        tiles when many small images or slide blocks are segmented one after the other.

    Returns
    -------
    prob : (H, W) float32 array
        Nucleus probability (``out`` if given).
    """
    check_rgb(rgb, "image", alpha=True, finite=False)
    height, width = rgb.shape[:2]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    tile_h, tile_w = (_round_up(t, multiple) for t in _pair(tile, "tile"))
    padded_h, padded_w = _round_up(height, multiple), _round_up(width, multiple)
    overlap = int(overlap)
    if not 0 <= overlap < min(tile_h, tile_w):
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile "
                         f"{tile_h}x{tile_w}")
    tile_h, tile_w = min(tile_h, padded_h), min(tile_w, padded_w)
    # A small image is one tile along that axis; the overlap then no longer matters.
    origins = tile_grid(padded_h, padded_w, (tile_h, tile_w), min(overlap, min(tile_h, tile_w) - 1),
                        multiple)
    keep_y = _keep_ranges(origins[:, 0], tile_h, height)
    keep_x = _keep_ranges(origins[:, 1], tile_w, width)

    if out is None:
        out = np.zeros((height, width), dtype=np.float32)
    elif out.shape != (height, width):
        raise ValueError(f"out has shape {out.shape}, expected {(height, width)}")

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(origins), unit="tile",
                   desc=progress if isinstance(progress, str) else None)
    # Tiles that write something, in groups of batch_size: all have the same shape.
    useful = [(int(y), int(x)) for y, x in origins
              if keep_y[int(y)][1] > keep_y[int(y)][0] and keep_x[int(x)][1] > keep_x[int(x)][0]]
    if bar is not None:
        bar.update(len(origins) - len(useful))  # tiles entirely in the padding
    if skip is not None:
        run, spared = [], 0
        for y, x in useful:
            (ky0, ky1), (kx0, kx1) = keep_y[y], keep_x[x]
            if skip(ky0, ky1, kx0, kx1):
                out[ky0:ky1, kx0:kx1] = 0
                spared += (ky1 - ky0) * (kx1 - kx0)
            else:
                run.append((y, x))
        if stats is not None:
            stats.update(tiles=len(useful), skipped=len(useful) - len(run), skipped_pixels=spared)
        if bar is not None:
            bar.update(len(useful) - len(run))
        useful = run
    elif stats is not None:
        stats.update(tiles=len(useful), skipped=0, skipped_pixels=0)
    net_pixels = 0
    try:
        for start in range(0, len(useful), batch_size):
            group = useful[start:start + batch_size]
            batch = np.concatenate([_read_tile(rgb, y, y + tile_h, x, x + tile_w) for y, x in group])
            if pad_batches and len(group) < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(group), axis=0)])
            net_pixels += batch.shape[0] * batch.shape[2] * batch.shape[3]
            prob = np.asarray(predict(batch))
            if prob.ndim != 4 or prob.shape[0] != len(batch) or prob.shape[1] < 2 \
                    or prob.shape[2:] != batch.shape[2:]:
                raise ValueError(f"predict returned shape {prob.shape} for input "
                                 f"{batch.shape}; expected ({len(batch)}, 2, {tile_h}, {tile_w})")
            for index, (y, x) in enumerate(group):
                (ky0, ky1), (kx0, kx1) = keep_y[y], keep_x[x]
                out[ky0:ky1, kx0:kx1] = prob[index, 1, ky0 - y:ky1 - y, kx0 - x:kx1 - x]
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    if stats is not None:
        stats["net_pixels"] = net_pixels
    return out


_DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def dihedral_tta(predict):
    """Test-time augmentation: ``predict`` averaged over the 8 rotations/flips of each batch.

    Each view is mapped back before averaging, so the result is aligned with the input.
    Non-square tiles take the 4 views that keep their shape (0/180 degrees, with and without
    a flip).
    """
    def averaged(batch):
        square = batch.shape[2] == batch.shape[3]
        views = [(k, flip) for k, flip in _DIHEDRAL if square or k % 2 == 0]
        total = None
        for k, flip in views:
            view = batch[..., ::-1] if flip else batch
            prob = np.asarray(predict(np.ascontiguousarray(np.rot90(view, k, axes=(2, 3)))), dtype=np.float64)
            prob = np.rot90(prob, -k, axes=(2, 3))
            prob = prob[..., ::-1] if flip else prob
            total = prob if total is None else total + prob
        return (total / len(views)).astype(np.float32)

    return averaged
