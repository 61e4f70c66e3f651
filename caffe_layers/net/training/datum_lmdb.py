"""Caffe ``Datum`` LMDBs from image files, for Caffe's own ``Data`` layer (``backend: LMDB``).

Two layouts, the ones Caffe's ``convert_imageset`` and DIGITS produce::

    # segmentation: an 'image mask' list file -> <output>/images and <output>/labels
    write_segmentation_lmdbs(read_pair_list("train.txt"), "train_db")
    # classification: root/<class>/*.png (class names sorted -> 0, 1, ...) -> one LMDB
    items, names = class_folder_items("photos")
    write_classification_lmdb(items, "train_lmdb", class_names=names)   # + labels.txt beside it

Conventions (what a ``Data`` layer then gives the net, before its ``transform_param``):

* every value is a serialised ``caffe_pb2.Datum`` with raw pixels (``encoded: false``), uint8,
  channel-first: images C×H×W in ``channel_order`` (default **BGR**, as ``convert_imageset`` and
  DIGITS write and classic Caffe models were trained on; this package's own U-Net templates
  take RGB, so build their LMDBs with ``channel_order="RGB"``); segmentation labels 1×H×W class
  indices (mask > 0 -> 1), classification labels in ``Datum.label``;
* keys are the entry's index zero-padded to 8 digits (``00000000``, ``00000001``, ...; wider
  only past 10**8 entries), so LMDB's sorted key order -- the order a ``Data`` layer reads --
  is the list order (or the ``shuffle`` order); a segmentation image and its label share a key;
* all entries of a database have one shape: images of another size are refused unless
  ``resize`` is given (bilinear for images, nearest-neighbour for masks, as OpenCV's
  ``cv::resize`` in ``convert_imageset``);
* a database is built in a temporary folder next to the target (``.<name>.<random>.partial``)
  and renamed to the target only when complete, so an interrupt or an error leaves no
  half-written database under the target's name; an existing target is refused unless
  ``overwrite``, and only a database folder (one holding ``data.mdb``, or a segmentation
  layout of two) is ever replaced;
* the LMDB map size is computed from the data (entries × pages per entry, with headroom) and
  grown if a transaction still finds the map full.

Files are read by :mod:`caffe_layers.image_io` (formats and rules are documented there); every
error names the file.
"""
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import lmdb
import numpy as np
from caffe.proto import caffe_pb2

from ...image_io import find_images, read_mask, read_rgb, write_atomic
from ...patches import list_file_lines

__all__ = ["CHANNEL_ORDERS", "LABELS_FILE", "SEGMENTATION_PARTS", "LMDBSummary", "check_output",
           "class_folder_items", "datum_to_array", "image_datum", "iter_datums", "read_label_list",
           "write_classification_lmdb", "write_segmentation_lmdbs"]

#: The channel orders an image database can be written in (the first is the default).
CHANNEL_ORDERS = ("BGR", "RGB")
#: Subfolders of a segmentation output: the image LMDB and the label LMDB.
SEGMENTATION_PARTS = ("images", "labels")
LABELS_FILE = "labels.txt"

_KEY_DIGITS = 8
_HEADROOM = 1.5  # map size = estimated pages × this + a fixed reserve
_RESERVE_BYTES = 1 << 20
_TXN_BYTES = 64 << 20  # commit at least every 64 MiB of values ...
_TXN_ENTRIES = 1000  # ... or every 1000 entries


@dataclass(frozen=True)
class LMDBSummary:
    """What was written to one database."""

    path: Path
    entries: int
    shape: tuple  # (C, H, W) of every Datum
    content: str  # e.g. "BGR images", "class indices {0, 1}"
    note: str = ""

    def __str__(self):
        shape = "×".join(map(str, self.shape))
        note = f"; {self.note}" if self.note else ""
        return f"wrote {self.path}: {self.entries} entries, {shape} uint8 {self.content}{note}"


# --------------------------------------------------------------------------- Datum

def image_datum(array, label=None):
    """A raw-pixel ``Datum`` from a C×H×W uint8 array (``encoded: false``).

    Serialised directly, not through ``caffe.io.array_to_datum`` (broken under numpy 2).
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"a Datum holds a C×H×W uint8 array; got shape {array.shape} {array.dtype}")
    datum = caffe_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2],
                            data=array.tobytes(), encoded=False)
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum):
    """The C×H×W uint8 array of a raw-pixel ``Datum`` (the inverse of :func:`image_datum`)."""
    if datum.encoded:
        raise ValueError("the Datum holds an encoded image (PNG/JPEG bytes), not raw pixels")
    shape = (datum.channels, datum.height, datum.width)
    if datum.float_data:
        return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)
    return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)


def iter_datums(path):
    """Yield ``(key, array, label)`` for every entry of a Datum LMDB, in key order."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: not an LMDB database folder (no data.mdb)")
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                datum = caffe_pb2.Datum()
                datum.ParseFromString(value)
                yield key.decode("ascii"), datum_to_array(datum), datum.label
    finally:
        env.close()


# --------------------------------------------------------------------------- inputs

def read_label_list(list_file, root=None):
    """Read a classification list file of ``image_path label`` lines.

    The project's list-file rules (as :func:`caffe_layers.patches.read_pair_list`): one entry
    per line, whitespace-separated (paths without spaces), blank lines and ``#`` comments
    skipped, relative paths resolved against ``root`` (default: the list file's folder).

    Returns
    -------
    items : list of (str, int)
        ``(image_path, label)`` in file order; labels are integers >= 0.
    """
    list_file, root, lines = list_file_lines(list_file, root)
    items = []
    for where, tokens, line in lines:
        if len(tokens) != 2:
            raise ValueError(f"{where}: expected 'image_path label' (2 whitespace-separated fields), "
                             f"got {len(tokens)}: {line.strip()!r}")
        path, label = tokens
        if not (label.isascii() and label.isdigit()) or not int(label) < 2 ** 31:  # int32 in the Datum; no sign
            raise ValueError(f"{where}: label {label!r} is not an integer in [0, 2**31)")
        path = os.path.join(root, os.path.expanduser(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
        items.append((path, int(label)))
    if not items:
        raise ValueError(f"list file {list_file!r} holds no 'image label' lines (only blank lines or comments)")
    return items


def class_folder_items(root):
    """``root/<class>/<image>`` -> items and class names, as ``convert_imageset``/DIGITS number them.

    Class names are the subfolder names, sorted; a class's label is its index in that order.
    Hidden subfolders (``.name``) are skipped; every class folder must hold images.

    Returns
    -------
    items : list of (Path, int)
        Images of each class in sorted file order, classes in label order.
    names : list of str
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected root/<class>/<images>)")
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError as error:
        raise ValueError(f"{root}: cannot read this folder ({error})") from error
    if not names:
        raise ValueError(f"{root}: no class subfolders (expected root/<class>/<images>)")
    items = [(path, label) for label, name in enumerate(names) for path in find_images([root / name])]
    return items, names


# --------------------------------------------------------------------------- writing

def _key(index, digits):
    return f"{index:0{digits}d}".encode("ascii")


def _check_size(size):
    if size is None:
        return None
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"resize must be (height, width); got {size!r}")
    height, width = size
    for value in size:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 16384:
            raise ValueError(f"resize must be (height, width) with sides in [1, 16384]; got {size!r}")
    return int(height), int(width)


def _check_order(channel_order):
    order = str(channel_order).upper()
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}; got {channel_order!r}")
    return order


def _permutation(count, shuffle, seed):
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(count)


class _Sizer:
    """All entries have the first entry's size, or are resized to ``size``."""

    def __init__(self, size):
        self.size = size
        self.first = None  # (path, (H, W)) of the first image without resize

    def image(self, rgb, path):
        if self.size is not None:
            if rgb.shape[:2] != self.size:
                rgb = cv2.resize(rgb, self.size[::-1], interpolation=cv2.INTER_LINEAR)
            return rgb
        if self.first is None:
            self.first = (path, rgb.shape[:2])
        elif rgb.shape[:2] != self.first[1]:
            (h0, w0), (h, w) = self.first[1], rgb.shape[:2]
            raise ValueError(f"image {os.fspath(path)!r} is {h}×{w} (H×W) but the first image "
                             f"{os.fspath(self.first[0])!r} is {h0}×{w0}; one database holds one size "
                             f"(resize them, e.g. --resize {h0}x{w0})")
        return rgb

    def mask(self, mask):
        if self.size is not None and mask.shape != self.size:
            mask = cv2.resize(mask, self.size[::-1], interpolation=cv2.INTER_NEAREST)
        return mask


def _to_chw(rgb, channel_order):
    if channel_order == "BGR":
        rgb = rgb[..., ::-1]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _map_size(entries, value_bytes, key_bytes, page):
    """Bytes of map for ``entries`` values of about ``value_bytes``, with headroom.

    A value larger than about half a page lives on its own overflow pages (rounded up to whole
    pages, with a 16-byte header); smaller ones share leaf pages. Branch pages are a few per
    thousand leaves; the headroom covers them and the free-page bookkeeping of the commits.
    """
    node = value_bytes + key_bytes + 16
    if node > page // 2:
        pages = math.ceil((value_bytes + 16) / page) + (key_bytes + 16) / page
    else:
        pages = node / page * 2  # leaves are at least half full
    total = entries * pages * page * _HEADROOM + _RESERVE_BYTES
    return int(math.ceil(total / page) * page)


class _Writer:
    """Batched puts into one LMDB environment, growing the map if it is ever full."""

    def __init__(self, path, map_size):
        # meminit (LMDB's default): the unused bytes of each page are zeros, not whatever this
        # process's heap held there, so the same input and seed give byte-identical files.
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=True, map_async=False)
        self.batch = []
        self.batch_bytes = 0

    def put(self, key, value):
        self.batch.append((key, value))
        self.batch_bytes += len(value)
        if len(self.batch) >= _TXN_ENTRIES or self.batch_bytes >= _TXN_BYTES:
            self.flush()

    def flush(self):
        while self.batch:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.batch:
                        if not txn.put(key, value, overwrite=False):
                            raise RuntimeError(f"duplicate LMDB key {key!r}")  # a bug, never the user's
            except lmdb.MapFullError:  # the estimate was short: the aborted batch is retried
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                continue
            self.batch, self.batch_bytes = [], 0

    def close(self, complete=True):
        """Commit what is pending and close (``complete``), or just close (the build failed)."""
        try:
            if complete:
                self.flush()
                self.env.sync(True)
        finally:
            self.env.close()


def _is_database(path):
    """A folder this module may replace: an LMDB, or a segmentation output of two LMDBs."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        return True
    return path.is_dir() and all((path / part / "data.mdb").is_file() for part in SEGMENTATION_PARTS)


def check_output(output, overwrite=False):
    """Refuse an output path that exists (unless ``overwrite`` and it is a database) or has no folder."""
    output = Path(output)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{output}: already exists (use --overwrite to replace it)")
        if output.is_symlink() or not _is_database(output):
            raise FileExistsError(f"{output}: exists and is not an LMDB database folder; "
                                  f"refusing to replace it even with --overwrite")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{output}: output folder {parent} does not exist")
    return output


def _build(output, overwrite, fill):
    """``fill(tmp_dir)`` builds the database in a temporary folder next to ``output``; then rename."""
    output = check_output(output, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the database private to its writer
        result = fill(tmp)
        _swap_in(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _swap_in(new, output):
    """Rename ``new`` to ``output``; an existing ``output`` (``--overwrite``) is moved aside first,
    put back if the rename fails, and removed once the new one is in place."""
    if not output.exists():
        os.replace(new, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    moved = aside / output.name
    try:
        os.replace(output, moved)
        os.replace(new, output)
    except BaseException:
        if moved.exists() and not output.exists():
            os.replace(moved, output)
        raise
    finally:
        if output.exists():  # else the old database stays in ``aside``, rather than being lost
            shutil.rmtree(aside, ignore_errors=True)


def _page_size():
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def write_segmentation_lmdbs(pairs, output, *, channel_order="BGR", resize=None, shuffle=False, seed=0,
                             overwrite=False):
    """An image LMDB and an aligned label LMDB from image/mask pairs, as DIGITS lays them out.

    Parameters
    ----------
    pairs : sequence of (path, path)
        ``(image, mask)`` files, e.g. from :func:`caffe_layers.patches.read_pair_list`.
    output : path
        Folder to create, holding ``images/`` (C×H×W Datums) and ``labels/`` (1×H×W class
        indices: mask > 0 -> 1) under the same keys.
    channel_order : {"BGR", "RGB"}
    resize : (int, int), optional
        (H, W) of every entry; without it all images must have one size.
    shuffle, seed :
        Write the pairs in a random order (the same for both databases) drawn from ``seed``.
    overwrite : bool
        Replace an existing output (only if it is such a database folder).

    Returns
    -------
    list of LMDBSummary
        The image database's, then the label database's.
    """
    pairs = [(os.fspath(image), os.fspath(mask)) for image, mask in pairs]
    if not pairs:
        raise ValueError("no image/mask pairs to write")
    channel_order, size = _check_order(channel_order), _check_size(resize)
    order = _permutation(len(pairs), shuffle, seed)
    digits = max(_KEY_DIGITS, len(str(len(pairs) - 1)))

    def fill(tmp):
        sizer, writers, shape, complete = _Sizer(size), None, None, False
        try:
            for index, pair_index in enumerate(order):
                image_path, mask_path = pairs[pair_index]
                rgb = read_rgb(image_path)
                mask = read_mask(mask_path)
                if rgb.shape[:2] != mask.shape:
                    raise ValueError(f"size mismatch: image {image_path!r} is {rgb.shape[0]}×{rgb.shape[1]} "
                                     f"(H×W) but its mask {mask_path!r} is {mask.shape[0]}×{mask.shape[1]}")
                rgb = sizer.image(rgb, image_path)
                label = sizer.mask(mask.astype(np.uint8))
                image_value = image_datum(_to_chw(rgb, channel_order)).SerializeToString()
                label_value = image_datum(label[None]).SerializeToString()
                if writers is None:
                    shape = (3, *rgb.shape[:2])
                    writers = [_Writer(tmp / part, _map_size(len(pairs), len(value), digits, _page_size()))
                               for part, value in zip(SEGMENTATION_PARTS, (image_value, label_value))]
                key = _key(index, digits)
                writers[0].put(key, image_value)
                writers[1].put(key, label_value)
            complete = True
        finally:
            for writer in writers or ():
                writer.close(complete)
        return shape

    shape = _build(output, overwrite, fill)
    output = Path(output)
    shuffled = f"shuffled with seed {seed}" if shuffle else "list order"
    return [LMDBSummary(output / "images", len(pairs), shape, f"{channel_order} images", shuffled),
            LMDBSummary(output / "labels", len(pairs), (1, *shape[1:]), "class indices {0, 1} (mask > 0)",
                        f"same keys as {output / 'images'}")]


def _labels_text(names):
    return "".join(f"{name}\n" for name in names)


def write_classification_lmdb(items, output, *, class_names=None, channel_order="BGR", resize=None,
                              shuffle=False, seed=0, overwrite=False):
    """One LMDB of labelled images (``Datum.label``), plus ``labels.txt`` beside it.

    Parameters
    ----------
    items : sequence of (path, int)
        ``(image, label)``, e.g. from :func:`class_folder_items` or :func:`read_label_list`.
    output : path
        The LMDB folder to create.
    class_names : sequence of str, optional
        Name of each label, in label order; written to ``labels.txt`` in the output's folder (an
        existing one with other content is refused unless ``overwrite``; one with the same
        content, e.g. from the training set's build, is kept). Without names none is written.
    channel_order, resize, shuffle, seed, overwrite :
        As for :func:`write_segmentation_lmdbs`.

    Returns
    -------
    LMDBSummary
    """
    items = [(os.fspath(path), label) for path, label in items]
    if not items:
        raise ValueError("no images to write")
    for path, label in items:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < 2 ** 31:
            raise ValueError(f"{path}: label {label!r} is not an integer in [0, 2**31)")
    channel_order, size = _check_order(channel_order), _check_size(resize)
    output = Path(output)
    labels_file = None
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        bad = [name for name in class_names if not name or "\n" in name]
        if bad:
            raise ValueError(f"class names must be non-empty single lines; got {bad[0]!r}")
        top = max(label for _, label in items)
        if top >= len(class_names):
            raise ValueError(f"label {top} has no class name ({len(class_names)} names given)")
        labels_file = output.parent / LABELS_FILE
        if output.name == LABELS_FILE:
            raise ValueError(f"{output}: the database cannot be named {LABELS_FILE} (its class names go there)")
        if labels_file.exists() and not labels_file.is_file():
            raise FileExistsError(f"{labels_file}: exists and is not a file")
        if labels_file.exists() and not overwrite \
                and labels_file.read_text(encoding="utf-8") != _labels_text(class_names):
            raise FileExistsError(f"{labels_file}: already exists with other class names "
                                  f"(use --overwrite to replace it)")
    order = _permutation(len(items), shuffle, seed)
    digits = max(_KEY_DIGITS, len(str(len(items) - 1)))

    def fill(tmp):
        sizer, writer, shape, complete = _Sizer(size), None, None, False
        try:
            for index, item_index in enumerate(order):
                path, label = items[item_index]
                rgb = sizer.image(read_rgb(path), path)
                value = image_datum(_to_chw(rgb, channel_order), label).SerializeToString()
                if writer is None:
                    shape = (3, *rgb.shape[:2])
                    # + 5: the label's varint can be longer than the first entry's
                    writer = _Writer(tmp, _map_size(len(items), len(value) + 5, digits, _page_size()))
                writer.put(_key(index, digits), value)
            complete = True
        finally:
            if writer is not None:
                writer.close(complete)
        return shape

    shape = _build(output, overwrite, fill)
    classes = len({label for _, label in items})
    notes = [f"{classes} classes"]
    if labels_file is not None:
        text = _labels_text(class_names)
        if not (labels_file.is_file() and labels_file.read_text(encoding="utf-8") == text):
            write_atomic(labels_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True)
        notes.append(f"names in {labels_file}")
    else:
        notes.append(f"no {LABELS_FILE} (no class names)")
    notes.append(f"shuffled with seed {seed}" if shuffle else "input order")
    return LMDBSummary(output, len(items), shape, f"{channel_order} images with labels", ", ".join(notes))
