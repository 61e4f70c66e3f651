"""Tiled, streamed inference of a nuclei segmenter on images of any size.

The tiling core (:func:`tile_grid`, :func:`segment_tiled`) is pure numpy and works with any
``predict`` callable mapping an ``N×3×h×w`` float32 batch (RGB, 0–255) to ``N×2×h×w``
probabilities (channel 1 = nucleus). :class:`CaffeSegmenter` is such a callable for a Caffe
deploy net; Caffe is imported only when one is built.

Command line (``segment_main``)::

    caffe-stain-segment --model deploy.prototxt --weights w.caffemodel IMAGE... --out DIR

Overlap and receptive field: a tile's output is exact (equal to one pass over the whole image)
wherever the net's receptive field stays inside the tile. Each tile keeps only its centre, at
least ``overlap // 2`` pixels from any side facing another tile, so tiling is seam-free when
the receptive-field radius is at most ``overlap // 2``. The U-Net templates of
:mod:`caffe_layers.unet` (depth 2, 3×3 convolutions, mean-file centring) have a radius of 23
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
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from .imageio import IMAGE_SUFFIXES, read_rgb

DEFAULT_OVERLAP = 64
"""Default tile overlap in pixels: at least twice the receptive-field radius (23) of the
depth-2 U-Net templates, plus a margin (see the module docstring)."""

__all__ = [
    "DEFAULT_OVERLAP",
    "tile_grid",
    "segment_tiled",
    "CaffeSegmenter",
    "segment_image",
    "overlay",
    "segment_files",
    "segment_main",
]


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


def _check_rgb(rgb):
    shape = getattr(rgb, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] < 3:
        raise ValueError(f"expected an RGB image of shape H×W×3, got shape {shape}")


def segment_tiled(predict, rgb, tile=256, overlap=DEFAULT_OVERLAP, multiple=4, progress=False,
                  out=None):
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
        ``predict(batch)`` with ``batch`` a ``(1, 3, h, w)`` float32 array (RGB, 0–255),
        returning ``(1, C, h, w)`` probabilities, ``C >= 2``; channel 1 is nucleus.
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

    Returns
    -------
    prob : (H, W) float32 array
        Nucleus probability (``out`` if given).
    """
    _check_rgb(rgb)
    height, width = rgb.shape[:2]
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
    try:
        for y, x in origins:
            (ky0, ky1), (kx0, kx1) = keep_y[int(y)], keep_x[int(x)]
            if ky1 <= ky0 or kx1 <= kx0:  # tile entirely in the padding
                continue
            batch = _read_tile(rgb, y, y + tile_h, x, x + tile_w)
            prob = np.asarray(predict(batch))
            if prob.ndim != 4 or prob.shape[0] != 1 or prob.shape[1] < 2 \
                    or prob.shape[2:] != batch.shape[2:]:
                raise ValueError(f"predict returned shape {prob.shape} for input "
                                 f"{batch.shape}; expected (1, 2, {tile_h}, {tile_w})")
            out[ky0:ky1, kx0:kx1] = prob[0, 1, ky0 - y:ky1 - y, kx0 - x:kx1 - x]
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out


def _prototxt_blobs(path):
    """(input blob names, all top names) of a deploy prototxt, parsed without building it.

    Caffe aborts the whole process on a malformed net; checking first gives a clear error.
    """
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    param = caffe_pb2.NetParameter()
    try:
        text_format.Merge(Path(path).read_text(), param)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid Caffe prototxt: {error}") from None
    inputs = set(param.input)
    tops = set(param.input)
    for layer in list(param.layer) + list(param.layers):
        tops.update(layer.top)
        if getattr(layer, "type", None) == "Input":
            inputs.update(layer.top)
    return inputs, tops


class CaffeSegmenter:
    """A Caffe deploy net as a ``predict`` callable for :func:`segment_tiled`.

    Parameters
    ----------
    deploy_prototxt : path
        Deploy net with an input blob ``data`` (``N×3×H×W`` RGB 0–255) and a softmax output
        blob ``prob`` (``N×2×H×W``).
    weights : path
        ``.caffemodel`` with the trained weights.

    Notes
    -----
    ``caffe`` is imported here, not at module import. The compute mode (CPU/GPU) is left as
    the caller set it.
    """

    def __init__(self, deploy_prototxt, weights):
        deploy_prototxt, weights = Path(deploy_prototxt), Path(weights)
        for what, path in (("deploy prototxt", deploy_prototxt), ("weights", weights)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}")
        if weights.stat().st_size == 0:
            raise ValueError(f"weights file is empty: {weights}")
        import caffe

        inputs, tops = _prototxt_blobs(deploy_prototxt)
        if "data" not in inputs:
            raise ValueError(f"{deploy_prototxt}: the net has no input blob 'data' "
                             f"(inputs: {sorted(inputs) or 'none'})")
        if "prob" not in tops:
            raise ValueError(f"{deploy_prototxt}: the net has no output blob 'prob'")
        self.deploy_prototxt, self.weights = deploy_prototxt, weights
        self.net = caffe.Net(str(deploy_prototxt), str(weights), caffe.TEST)

    def __call__(self, batch):
        """Forward ``batch`` ``(N, 3, h, w)`` float32; return ``prob`` ``(N, C, h, w)``."""
        batch = np.asarray(batch, dtype=np.float32)
        data = self.net.blobs["data"]
        if tuple(data.data.shape) != batch.shape:
            # Reshape only when the tile size changes: reshaping reallocates every blob.
            data.reshape(*batch.shape)
            self.net.reshape()
        data.data[...] = batch
        self.net.forward()
        return self.net.blobs["prob"].data.copy()


def segment_image(deploy, weights, rgb, tile=256, overlap=DEFAULT_OVERLAP, threshold=0.5,
                  multiple=4, progress=False):
    """Segment one image with a Caffe deploy net.

    Parameters
    ----------
    deploy, weights : path
        See :class:`CaffeSegmenter`.
    rgb : (H, W, 3) array
    tile, overlap, multiple, progress
        See :func:`segment_tiled`.
    threshold : float
        A pixel is nucleus where its probability is greater than this.

    Returns
    -------
    prob : (H, W) float32 array
    mask : (H, W) bool array
    """
    prob = segment_tiled(CaffeSegmenter(deploy, weights), rgb, tile=tile, overlap=overlap,
                         multiple=multiple, progress=progress)
    return prob, prob > threshold


def overlay(rgb, mask, color=(0, 255, 0), mode="outline", alpha=0.4):
    """Draw nuclei on an image.

    Parameters
    ----------
    rgb : (H, W, 3) array
        Image (uint8, or anything convertible to it).
    mask : (H, W) array
        Nonzero where nucleus.
    color : (3,) sequence of int
    mode : {'outline', 'tint'}
        Colour the inner boundary pixels of each nucleus, or blend the whole nucleus with
        ``color`` at opacity ``alpha``.
    alpha : float

    Returns
    -------
    (H, W, 3) uint8 array
        A new image; the input is not modified.
    """
    _check_rgb(rgb)
    mask = np.asarray(mask) != 0
    if mask.shape != tuple(rgb.shape[:2]):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    result = np.array(rgb[..., :3], dtype=np.uint8)
    color = np.asarray(color, dtype=np.float64)
    if mode == "outline":
        result[mask & ~ndimage.binary_erosion(mask)] = color.astype(np.uint8)
    elif mode == "tint":
        result[mask] = np.round((1 - alpha) * result[mask] + alpha * color).astype(np.uint8)
    else:
        raise ValueError(f"mode must be 'outline' or 'tint', got {mode!r}")
    return result


def _save_png(path, array):
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def _image_name(path):
    name = Path(path).name
    for suffix in sorted({".ome.tif", ".ome.tiff", *IMAGE_SUFFIXES}, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def segment_files(segmenter, paths, out_dir, tile=256, overlap=DEFAULT_OVERLAP, threshold=0.5,
                  multiple=4, prob_format="png", progress=True):
    """Segment image files and write ``<name>_prob.png|npy``, ``_mask.png``, ``_overlay.png``.

    Memory per image, besides the net and one tile: the image (memory-mapped when
    :func:`~caffe_layers.imageio.read_rgb` can, e.g. an uncompressed TIFF, so its pages are
    page cache; decoded in process memory otherwise, 3 bytes/pixel); the float32 probability
    map (with ``prob_format='npy'`` tiles are written straight into the ``.npy`` file through
    a memory map, so it is file-backed and never an in-memory array; with ``'png'`` it is an
    in-memory array of 4 bytes/pixel, freed once the mask is made); the boolean mask
    (1 byte/pixel); and the uint8 array each PNG is encoded from (PNG needs the whole array:
    1 byte/pixel for the probability and the mask, 3 for the overlay). The overlay step is
    the peak: its image copy, outline erosion temporaries and PIL's copy add about
    10 bytes/pixel (measured on a 4000×4000 image) to the mask.

    Parameters
    ----------
    segmenter : callable
        A ``predict`` callable (e.g. :class:`CaffeSegmenter`).
    paths : list of path
    out_dir : path
        Created if missing.
    tile, overlap, threshold, multiple
        See :func:`segment_image`.
    prob_format : {'png', 'npy'}
        Probability as uint8 0–255 PNG or float32 ``.npy`` (written tile by tile, see above).
    progress : bool

    Returns
    -------
    list of dict
        Per image: ``name`` and the written paths.
    """
    if prob_format not in ("png", "npy"):
        raise ValueError(f"prob_format must be 'png' or 'npy', got {prob_format!r}")
    names = [_image_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several input images share the name(s) {duplicates}; their outputs "
                         "would overwrite each other")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, name in zip(paths, names):
        rgb = read_rgb(path, memmap=True)  # a large uncompressed TIFF stays on disk
        files = {"name": name}
        if prob_format == "npy":
            files["prob"] = out_dir / f"{name}_prob.npy"
            # Tiles go straight into a memory-mapped .npy, renamed only once complete, so a
            # failed or interrupted run leaves no incomplete <name>_prob.npy.
            partial = out_dir / f".{name}_prob.npy.partial"
            prob = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                             shape=tuple(rgb.shape[:2]))
            try:
                segment_tiled(segmenter, rgb, tile=tile, overlap=overlap, multiple=multiple,
                              progress=name if progress else False, out=prob)
                prob.flush()
            except BaseException:
                del prob
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, files["prob"])
        else:
            prob = segment_tiled(segmenter, rgb, tile=tile, overlap=overlap, multiple=multiple,
                                 progress=name if progress else False)
            files["prob"] = out_dir / f"{name}_prob.png"
            _save_png(files["prob"], np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8))
        mask = prob > threshold
        del prob
        files["mask"] = out_dir / f"{name}_mask.png"
        _save_png(files["mask"], mask.astype(np.uint8) * 255)
        files["overlay"] = out_dir / f"{name}_overlay.png"
        _save_png(files["overlay"], overlay(rgb, mask))
        written.append(files)
    return written


def segment_main(argv=None):
    """``caffe-stain-segment``: segment images with a Caffe deploy net."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-segment",
        description="Segment nuclei in RGB images with a Caffe deploy net, tile by tile.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="RGB images (PNG, TIFF, ...)")
    parser.add_argument("--model", required=True, help="deploy prototxt (input 'data', output 'prob')")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                        help="overlap of neighbouring tiles in pixels, at least twice the net's "
                             f"receptive-field radius (default {DEFAULT_OVERLAP})")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=4,
                        help="net input sizes must be multiples of this (2**depth)")
    parser.add_argument("--prob-format", choices=("png", "npy"), default="png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        segmenter = CaffeSegmenter(args.model, args.weights)
        written = segment_files(segmenter, args.images, args.out, tile=args.tile,
                                overlap=args.overlap, threshold=args.threshold,
                                multiple=args.multiple, prob_format=args.prob_format,
                                progress=not args.no_progress)
    except (OSError, ValueError) as error:
        print(f"caffe-stain-segment: error: {error}", file=sys.stderr)
        return 1
    for files in written:
        print(f"{files['name']}: {files['mask']}")
    return 0


if __name__ == "__main__":
    sys.exit(segment_main())
