"""Image/mask pairs on disk -> random training patches (pure numpy, no Caffe).

The pieces, in the order the data layer uses them::

    pairs = read_pair_list("train.txt")            # [(image_path, mask_path), ...]
    images, masks = load_pairs(pairs)              # uint8 H×W×3 RGB, uint8 H×W {0, 1}
    sampler = PatchSampler(images, masks, patch_size=128, batch_size=8, seed=0,
                           names=[image for image, _ in pairs])
    data, label = sampler.next_batch()             # N×3×P×P, N×1×P×P float32

Conventions: images are RGB (never BGR) in 0-255; a mask pixel is nucleus when > 0. Files are
read by :mod:`caffe_layers.image_io` (formats and rules are documented there).
"""
import os

import numpy as np

from .image_io import check_rgb, read_mask, read_rgb
from .schema import INT64_MAX, INT_MAX, REQUIRED, Param, Schema
from .transforms.schema import AUGMENT_SCHEMA

__all__ = [
    "MEAN_SUBTRACT_SCHEMA",
    "PATCH_DATA_SCHEMA",
    "MAX_LIST_BYTES",
    "list_file_lines",
    "read_pair_list",
    "load_pairs",
    "PatchSampler",
    "compute_mean_image",
    "mean_to_subtract",
    "derived_seed",
]


# --------------------------------------------------------------------------- layer parameters
# The keys of the patch data and mean-subtract layers live here, beside the code those layers
# run, because the layer modules import caffe and the keys must be readable without it
# (caffe-stain-retrofit and the OpenCV engine check them).

PATCH_DATA_SCHEMA = Schema(
    [
        Param("source", "str", REQUIRED, doc="list file of image/label pairs"),
        Param("root", "str", None, optional=True,
              doc="base directory of relative paths in the list file (None: the list file's directory)"),
        Param("batch_size", "int", 8, min=1, max=4096,
              doc="samples per batch (at most 4096, and batch_size*3*patch_size**2 <= INT_MAX)"),
        Param("patch_size", "int", 128, min=1, max=8192,
              doc="side of the square patches, pixels (at most 8192, and batch_size*3*patch_size**2 <= INT_MAX)"),
        Param("shuffle", "bool", True, doc="shuffle the list every epoch"),
        Param("seed", "int", None, optional=True, min=0, max=INT64_MAX,
              doc="random seed for numpy.random.default_rng, 0 to 2**63-1; None draws fresh entropy"),
    ],
    nested={"augment": AUGMENT_SCHEMA},
    name="patch data",
    # Caffe refuses a blob of more than INT_MAX elements; the data top is N×3×P×P.
    size_limits=[(("batch_size", 3, "patch_size", "patch_size"), INT_MAX,
                  "elements in the N×3×P×P data blob (Caffe's limit is INT_MAX)")],
)
"""Parameters of the patch data layer; ``augment`` (None: no augmentation) uses :data:`AUGMENT_SCHEMA`."""

MEAN_SUBTRACT_SCHEMA = Schema(
    [Param("mean_file", "str", REQUIRED, doc="Caffe mean file (.binaryproto), 1×C×H×W or C×H×W"),
     Param("crop_centre", "bool", False,
           doc="an input smaller than the mean image gets the mean's centre crop (Caffe's TEST-phase crop of a "
               "mean file) instead of its per-channel mean")],
    name="mean subtract",
)
"""Parameters of :class:`~caffe_layers.mean_subtract.MeanSubtractLayer`."""


# --------------------------------------------------------------------------- list files

#: Larger list files are refused unread (a million pairs fit in less).
MAX_LIST_BYTES = 64 * 1024 * 1024

def list_file_lines(list_file, root=None):
    """The entries of a list file, by the project's one set of list-file rules.

    One entry per line, whitespace-separated (so paths cannot contain spaces); blank lines and
    comments are skipped (a comment starts at a token beginning with ``#``, at the start of a
    line or after the fields); relative paths are meant against ``root``, by default the list
    file's directory. The file must be UTF-8 text of at most :data:`MAX_LIST_BYTES`.

    Returns
    -------
    list_file : str
    root : str
    lines : list of (str, list of str, str)
        ``(where, tokens, line)`` per entry: ``where`` is ``"<file>:<line number>"``.
    """
    list_file = os.fspath(list_file)
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file!r} does not exist (or is not a file)")
    if root is None:
        root = os.path.dirname(os.path.abspath(list_file))
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root directory {root!r} for list file {list_file!r} "
                                f"does not exist")
    size = os.path.getsize(list_file)
    if size > MAX_LIST_BYTES:
        raise ValueError(f"list file {list_file!r} is {size} bytes; a list file is far smaller "
                         f"(limit {MAX_LIST_BYTES}): is it the right file?")
    with open(list_file, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"list file {list_file!r} is not a text file (not UTF-8 at byte {error.start})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        # Cut at the first token starting with '#': full-line and trailing comments.
        for i, token in enumerate(tokens):
            if token.startswith("#"):
                tokens = tokens[:i]
                break
        if tokens:
            lines.append((f"{list_file}:{number}", tokens, line))
    return list_file, root, lines


def read_pair_list(list_file, root=None):
    """Read a list file of ``image_path mask_path`` pairs.

    One pair per line, separated by whitespace (so paths cannot contain spaces). Blank lines
    and comments are skipped: a comment starts at a token beginning with ``#``, either at the
    start of a line or after the paths.

    Parameters
    ----------
    list_file : str or path-like
        The list file.
    root : str or path-like, optional
        Directory that relative paths are resolved against. Default: the list file's
        directory, so a list file keeps working when its data folder is moved with it.

    Returns
    -------
    pairs : list of (str, str)
        ``(image_path, mask_path)`` for each entry, in file order; relative paths joined to
        ``root``.

    Raises
    ------
    FileNotFoundError
        If the list file, ``root`` or any listed file does not exist (the message names the
        file and the list line).
    ValueError
        If a line does not hold exactly two paths, or the list holds no pairs.
    """
    list_file, root, lines = list_file_lines(list_file, root)
    pairs = []
    for where, tokens, line in lines:
        if len(tokens) != 2:
            raise ValueError(f"{where}: expected 2 whitespace-separated paths "
                             f"(image mask), got {len(tokens)}: {line.strip()!r}")
        pair = []
        for kind, token in zip(("image", "mask"), tokens):
            path = os.path.join(root, os.path.expanduser(token))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: {kind} file {path!r} does not exist")
            pair.append(path)
        pairs.append(tuple(pair))
    if not pairs:
        raise ValueError(f"list file {list_file!r} holds no image/mask pairs "
                         f"(only blank lines or comments)")
    return pairs


# --------------------------------------------------------------------------- file reading

def load_pairs(pairs):
    """Load every ``(image_path, mask_path)`` pair and check that sizes match.

    Parameters
    ----------
    pairs : iterable of (path, path)
        As returned by :func:`read_pair_list`.

    Returns
    -------
    images : list of (H_i, W_i, 3) uint8 ndarray
    masks : list of (H_i, W_i) uint8 ndarray
        Values {0, 1}.

    Raises
    ------
    ValueError
        If an image and its mask differ in size (the message names both files and sizes),
        or there are no pairs.
    """
    images, masks = [], []
    for image_path, mask_path in pairs:
        image = read_rgb(image_path)
        mask = read_mask(mask_path).astype(np.uint8)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"size mismatch: image {os.fspath(image_path)!r} is "
                             f"{image.shape[0]}×{image.shape[1]} (H×W) but its mask "
                             f"{os.fspath(mask_path)!r} is {mask.shape[0]}×{mask.shape[1]}")
        images.append(image)
        masks.append(mask)
    if not images:
        raise ValueError("no image/mask pairs to load")
    return images, masks


# --------------------------------------------------------------------------- sampling

def derived_seed(seed, stream):
    """An independent seed for sub-stream ``stream`` of ``seed`` (None stays None).

    Parameters
    ----------
    seed : int or None
    stream : int

    Returns
    -------
    int or None
    """
    if seed is None:
        return None
    # SeedSequence mixes (seed, stream) so the sampler's and augmenter's numbers are unrelated.
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint32)[0])


def _positive_int(value, name):
    # bool is an int subclass; True as a patch size is a mistake, not 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class PatchSampler:
    """Random square patches from in-memory image/mask pairs.

    Sampling: the sampler walks through *epochs*. An epoch lists every image once per whole
    P×P tile it holds (at least once), so large images give proportionally more patches and
    an epoch covers about as many pixels as the data set; with ``shuffle`` the epoch's order
    is a fresh random permutation, otherwise list order. Batches are consecutive slices of
    that stream and run across epoch boundaries. Each patch's top-left corner is uniform over
    all positions where it fits, whatever ``shuffle`` says. Every draw comes from one
    ``numpy.random.Generator`` seeded with ``seed``, so the same seed and data give the same
    batches.

    Parameters
    ----------
    images : sequence of (H_i, W_i, 3) uint8 ndarray
        RGB images.
    masks : sequence of (H_i, W_i) ndarray
        Masks, nucleus where > 0.
    patch_size : int
        Side P of the square patches; must fit in every image.
    batch_size : int
        Patches per batch N.
    shuffle : bool, optional
        Random epoch order (True) or list order (False).
    seed : int or None, optional
        Seed of the generator; None for fresh OS entropy.
    names : sequence of str, optional
        One name per image (e.g. its path) for error messages.

    Attributes
    ----------
    epoch : int
        Number of epochs started so far (1 during the first).
    epoch_length : int
        Patches per epoch.
    last_indices : (N,) int ndarray
        Image index of each patch in the last batch.
    last_corners : (N, 2) int ndarray
        ``(row, col)`` of each patch's top-left corner in the last batch.

    Raises
    ------
    TypeError, ValueError
        At construction, for bad sizes, mismatched inputs, or a patch that does not fit in an
        image (the message names the image and both sizes).
    """

    def __init__(self, images, masks, patch_size, batch_size, shuffle=True, seed=None,
                 names=None):
        self.patch_size = _positive_int(patch_size, "patch_size")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__} {shuffle!r}")
        self.shuffle = bool(shuffle)
        images, masks = list(images), list(masks)
        if not images:
            raise ValueError("PatchSampler needs at least one image")
        if len(masks) != len(images):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        names = [f"image #{i}" for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        self.names = names

        P = self.patch_size
        self._images, self._masks = [], []
        self._image_windows, self._mask_windows = [], []
        shapes = []
        for name, image, mask in zip(names, images, masks):
            image, mask = np.asarray(image), np.asarray(mask)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"{name}: expected an H×W×3 uint8 RGB image, got shape "
                                 f"{image.shape} dtype {image.dtype}")
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{name}: mask shape {mask.shape} does not match image size "
                                 f"{image.shape[:2]}")
            height, width = image.shape[:2]
            if height < P or width < P:
                raise ValueError(f"patch_size {P} does not fit in {name}, which is "
                                 f"{height}×{width} (H×W); every image must be at least {P}×{P}")
            if mask.dtype != np.uint8 or mask.max() > 1:
                mask = (mask > 0).astype(np.uint8)
            # Sliding-window views (no copy): window[y, x] is the patch with corner (y, x),
            # already channel-first for images, so a batch is one fancy index per image.
            self._image_windows.append(np.lib.stride_tricks.sliding_window_view(
                image, (P, P), axis=(0, 1)))            # (H-P+1, W-P+1, 3, P, P)
            self._mask_windows.append(np.lib.stride_tricks.sliding_window_view(
                mask, (P, P)))                         # (H-P+1, W-P+1, P, P)
            self._images.append(image)
            self._masks.append(mask)
            shapes.append((height, width))

        shapes = np.array(shapes, dtype=np.int64)
        self._positions = shapes - P + 1               # valid corners per axis
        tiles = np.maximum(1, (shapes[:, 0] // P) * (shapes[:, 1] // P))
        self._epoch_base = np.repeat(np.arange(len(images)), tiles)
        self.epoch_length = int(self._epoch_base.size)
        self._rng = np.random.default_rng(seed)
        self._order = self._epoch_base[:0]
        self._cursor = 0
        self.epoch = 0
        self.last_indices = np.zeros(0, dtype=np.int64)
        self.last_corners = np.zeros((0, 2), dtype=np.int64)

    def __len__(self):
        """Number of images."""
        return len(self._images)

    def _next_indices(self, count):
        parts = []
        while count > 0:
            if self._cursor == self._order.size:
                self._order = (self._rng.permutation(self._epoch_base) if self.shuffle
                               else self._epoch_base)
                self._cursor = 0
                self.epoch += 1
            take = min(count, self._order.size - self._cursor)
            parts.append(self._order[self._cursor:self._cursor + take])
            self._cursor += take
            count -= take
        return np.concatenate(parts)

    def next_batch(self):
        """Draw the next batch.

        Returns
        -------
        data : (N, 3, P, P) float32 ndarray
            RGB patches, values 0-255.
        label : (N, 1, P, P) float32 ndarray
            Mask patches, values {0, 1}.
        """
        N, P = self.batch_size, self.patch_size
        indices = self._next_indices(N)
        rows = self._rng.integers(0, self._positions[indices, 0])
        cols = self._rng.integers(0, self._positions[indices, 1])
        data = np.empty((N, 3, P, P), dtype=np.float32)
        label = np.empty((N, 1, P, P), dtype=np.float32)
        for i in np.unique(indices):
            sel = np.flatnonzero(indices == i)
            data[sel] = self._image_windows[i][rows[sel], cols[sel]]
            label[sel, 0] = self._mask_windows[i][rows[sel], cols[sel]]
        self.last_indices = indices
        self.last_corners = np.stack([rows, cols], axis=1)
        return data, label


# --------------------------------------------------------------------------- mean image

def mean_to_subtract(mean, size, crop_centre=False):
    """What a mean file subtracts from an input of ``size`` (MeanSubtractLayer's rule).

    Parameters
    ----------
    mean : ndarray, shape (C, H, W)
    size : (int, int)
        The input's height and width.
    crop_centre : bool
        For a smaller input, the mean's centre crop at Caffe's TEST offsets ((H - h) // 2, (W - w) // 2).

    Returns
    -------
    ndarray, shape (C, H, W), (C, h, w) or (C, 1, 1)
        The mean image, its centre crop, or its per-channel mean.
    """
    height, width = size
    if (height, width) == mean.shape[1:]:
        return mean
    if crop_centre and height <= mean.shape[1] and width <= mean.shape[2]:
        top, left = (mean.shape[1] - height) // 2, (mean.shape[2] - width) // 2
        return mean[:, top:top + height, left:left + width]
    return mean.mean(axis=(1, 2))[:, None, None]


def compute_mean_image(images, patch_size=None, names=None):
    """Mean image of RGB training images, as a Caffe mean blob's 3×H×W array.

    Two kinds of mean, chosen by ``patch_size``:

    * ``patch_size=None``: the true per-pixel mean of whole images, which must all have the
      same size -- for nets that see whole images.
    * ``patch_size=P``: the per-channel mean over *all* training pixels, broadcast to
      3×P×P. A patch net sees patches cut at random positions, so the expected value at a
      patch coordinate is the same for every coordinate: the per-pixel mean of random
      patches converges to exactly this flat image, which is computed here without the
      sampling noise (and from images of any size).

    Parameters
    ----------
    images : iterable of (H, W, 3) or (H, W, 4) array
        RGB(A) images with values in 0-255 (any numeric dtype; alpha is ignored). Consumed
        once, so a generator that reads files lazily is fine.
    patch_size : int, optional
        Side of the square training patches.
    names : sequence of str, optional
        The images' names (e.g. file names), for the messages.

    Returns
    -------
    mean : (3, H, W) float32 array
        RGB mean, channel-first like a Caffe blob (H = W = ``patch_size`` if given).

    Raises
    ------
    ValueError
        If there are no images, an image is not RGB, or (without ``patch_size``) the images
        differ in size.
    """
    if patch_size is not None and (int(patch_size) != patch_size or patch_size < 1):
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    # float64 accumulators: summing millions of 0-255 pixels in float32 loses precision.
    total = None
    count = 0
    for index, image in enumerate(images):
        name = f"image {index}" if names is None else f"image {names[index]}"
        image = check_rgb(image, name, alpha=True).astype(np.float64)
        if patch_size is None:
            if total is not None and image.shape != total.shape:
                raise ValueError(
                    f"{name} has shape {image.shape} but earlier images have {total.shape}; "
                    "a per-pixel mean needs equal sizes (pass patch_size for a per-channel mean)")
            total = image if total is None else total + image
            count += 1
        else:
            channel_sum = image.reshape(-1, 3).sum(axis=0)
            total = channel_sum if total is None else total + channel_sum
            count += image.shape[0] * image.shape[1]
    if total is None:
        raise ValueError("compute_mean_image needs at least one image")
    mean = total / count
    if patch_size is None:
        return np.ascontiguousarray(mean.transpose(2, 0, 1), dtype=np.float32)
    size = int(patch_size)
    return np.broadcast_to(mean[:, None, None], (3, size, size)).astype(np.float32)
