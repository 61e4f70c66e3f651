"""The package's one image reader, image writer and RGB validator (numpy, Pillow, tifffile).

Every module that reads or writes pixels goes through here, so an image file means the same
thing to training (:mod:`caffe_layers.patches`), segmentation and comparison
(:mod:`caffe_layers.net`), the stain tools (:mod:`caffe_layers.cli`) and the packaged data
sets (:mod:`caffe_layers.sample_data`)::

    rgb = read_rgb("slide.svs")                     # (H, W, 3) uint8, level 0 of the pyramid
    big = read_rgb("huge.tif", memmap=True)         # np.memmap when the TIFF is uncompressed
    mask = read_mask("slide_mask.png", rgb.shape[:2])   # (H, W) bool, nucleus where > 0

Rules, the same everywhere:

* Formats: PNG, JPEG, TIFF, SVS (level 0 of series 0 of a pyramid) and ``.npy`` (read with
  ``allow_pickle=False``). TIFFs are read with tifffile, falling back to Pillow when tifffile
  cannot decode them (e.g. a codec that needs the missing ``imagecodecs``).
* Images must be colour: RGBA, palette, CMYK, ... become RGB (alpha dropped); a grey-level
  image is an error; so is anything that is not 8-bit (integers within 0..255 are accepted).
* Masks are nucleus where > 0 (binary masks and instance label maps alike); an RGB(A) mask is
  accepted only when its colour channels are identical (a grey mask saved as RGB).
* A missing file is a :class:`FileNotFoundError`; an unsupported, unreadable or corrupt file
  and every rule above is a :class:`ValueError`. Every message names the file.
* :func:`write_image` is atomic (a temporary file in the same folder, then a rename), so an
  interrupt leaves the old file or the complete new one; the format follows the file name's
  extension, and it never replaces an existing file unless asked.
"""
import math
import os
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "WRITE_FORMATS", "max_pixels", "check_rgb", "find_images", "image_shape", "image_stem", "read_mask",
           "read_rgb", "same_file", "write_atomic", "write_image"]

#: File name endings (lower case) that :func:`read_rgb` and :func:`read_mask` accept.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".npy")
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs")

# Pillow modes without colour: an RGB image is required, so these are errors in read_rgb.
_GREY_PIL_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


# --------------------------------------------------------------------------- decoding

#: Default of :func:`max_pixels`: 2**30 pixels (3 GiB as 8-bit RGB).
DEFAULT_MAX_PIXELS = 1 << 30


def max_pixels():
    """Most pixels an image file may claim before it is decoded into memory.

    ``CAFFE_STAIN_MAX_PIXELS`` in the environment overrides :data:`DEFAULT_MAX_PIXELS`. The
    claimed size is checked from the file's header, before anything is allocated, so a small
    file claiming 100000×100000 pixels is refused at once. Memory-mapped reads are not limited.
    """
    value = os.environ.get("CAFFE_STAIN_MAX_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"CAFFE_STAIN_MAX_PIXELS={value!r} is not an integer") from None
    if limit < 1:
        raise ValueError(f"CAFFE_STAIN_MAX_PIXELS={value!r} must be >= 1")
    return limit


class _TooLarge(ValueError):
    """An image claims more pixels than :func:`max_pixels` (its message says so)."""


def _check_claimed_size(path, what, shape):
    height, width = (int(s) for s in tuple(shape)[:2]) if len(shape) >= 2 else (int(shape[0]) if shape else 1, 1)
    limit = max_pixels()
    if height * width > limit:
        raise _TooLarge(f"{what} {path!r} claims {height}×{width} = {height * width} pixels, more than the "
                         f"limit of {limit} (set CAFFE_STAIN_MAX_PIXELS to allow more)")


def _read_npy(path, what, memmap):
    """``np.load`` of an ``.npy``, its header (shape, dtype, length) checked before any allocation."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(handle)
        data_start = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{what} {path!r} holds Python objects (dtype {dtype}); expected numbers")
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: a forged header cannot overflow it
    available = os.path.getsize(path) - data_start
    if claimed > available:
        raise ValueError(f"{what} {path!r} is truncated: its header claims shape {shape} ({claimed} bytes), "
                         f"the file holds {available}")
    if not memmap:
        _check_claimed_size(path, what, shape)
    # allow_pickle=False: an image file must not be a way to run code.
    return np.load(path, mmap_mode="r" if memmap else None, allow_pickle=False)


def _read_tiff(path, memmap=False):
    """Level 0 of series 0 as an array (H×W×S, planar files moved to samples last)."""
    import tifffile
    with tifffile.TiffFile(path) as tiff:
        level0 = tiff.series[0].levels[0]
        axes = level0.axes
        array = None
        if memmap and level0.dataoffset is not None:  # uncompressed, contiguous
            try:
                array = tifffile.memmap(path, mode="r")
            except ValueError:
                array = None
        if array is None:  # compressed, tiled or memmap not asked for: read it whole
            spatial = [size for axis, size in zip(axes, level0.shape) if axis in "YX"]
            _check_claimed_size(path, "image file", spatial or level0.shape)
            array = level0.asarray()
    if array.ndim == 3 and axes.startswith("S"):  # planar (samples first): C×H×W
        array = np.moveaxis(array, 0, -1)
    return array


_PIL_LOCK = threading.Lock()


def _pil_open(path):
    """``PIL.Image.open`` without Pillow's own decompression-bomb limit (89 M pixels warns, 179 M
    fails): :func:`max_pixels` is the one limit, checked from the header right after."""
    from PIL import Image
    with _PIL_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _read_pil(path, what="image"):
    with _pil_open(path) as image:
        _check_claimed_size(path, what, (image.height, image.width))  # from the header, not decoded yet
        image.load()  # decode now: the file is closed on return
    return image


def _png_bit_depth(path):
    """Bits per sample of a PNG from its IHDR chunk (None if the header is not a PNG's)."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    if len(header) < 26 or header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        return None
    return header[24]


def _read_png16(path, what):
    """A 16-bit PNG as its uint16 array (RGB order): Pillow would silently keep only the high byte
    of each 16-bit RGB sample, so the 8-bit rule (:func:`_to_uint8`) could not see it."""
    import cv2

    with _pil_open(path) as image:
        _check_claimed_size(path, what, (image.height, image.width))
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("OpenCV cannot decode this 16-bit PNG")
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return array


def _decode(path, what, memmap=False):
    """Raw pixels of an image file: an ndarray (``.npy``, TIFF) or a PIL image."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist (or is not a file)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_SUFFIXES:
        raise ValueError(f"{what} {path!r}: unsupported file type {ext!r}; "
                         f"expected one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        if ext == ".npy":
            return _read_npy(path, what, memmap)
        if ext in _TIFF_SUFFIXES:
            try:
                return _read_tiff(path, memmap=memmap)
            except _TooLarge:
                raise
            except Exception as tiff_error:  # noqa: BLE001 - Pillow may still decode it
                try:
                    with warnings.catch_warnings():  # its complaints about a file it then refuses
                        warnings.simplefilter("ignore")
                        return _read_pil(path, what)
                except Exception:  # noqa: BLE001 - report tifffile's reason, not Pillow's
                    if isinstance(tiff_error, (IndexError, KeyError, struct.error, EOFError)):
                        raise ValueError(f"a truncated or corrupt TIFF ({type(tiff_error).__name__}: "
                                         f"{tiff_error})") from None
                    raise tiff_error from None
        if ext == ".png" and _png_bit_depth(path) == 16:
            return _read_png16(path, what)
        return _read_pil(path, what)
    except (MemoryError, _TooLarge):
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure: name the file
        raise ValueError(f"{what} {path!r} cannot be read: {error}") from error


def _to_uint8(array, path):
    """Integer arrays within 0..255 become uint8; anything else is an error naming the file."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if 0 <= low and high <= 255:
            return array.astype(np.uint8)
        raise ValueError(f"image {path!r} has dtype {array.dtype} with values {low}..{high}; "
                         f"expected 8-bit values 0..255 (convert it to 8 bits first)")
    # Floats are ambiguous (0-1 or 0-255?): refuse rather than guess.
    raise ValueError(f"image {path!r} has dtype {array.dtype}; expected 8-bit values 0..255")


# --------------------------------------------------------------------------- public API

def read_rgb(path, memmap=False):
    """Read an RGB image as uint8.

    Parameters
    ----------
    path : str or path-like
        PNG, JPEG, TIFF, SVS (level 0 of the pyramid) or ``.npy`` holding an H×W×3 (or
        H×W×4) array of 8-bit values.
    memmap : bool
        Memory-map the pixels instead of loading them, for images too large to hold in
        memory: an uncompressed TIFF through ``tifffile.memmap``, a ``.npy`` through
        ``np.load(mmap_mode='r')``. Other files (compressed or tiled TIFF, PNG, JPEG) are
        read whole, as with ``memmap=False``.

    Returns
    -------
    image : (H, W, 3) uint8 ndarray or np.memmap
        RGB; alpha is dropped, palette/CMYK/... are converted. Read-only when memory-mapped.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file type is unsupported, the file cannot be decoded, the image is grey-level
        or has another number of channels, or it is not 8-bit. The message names the file.
    """
    path = os.fspath(path)
    raw = _decode(path, "image", memmap=memmap)
    if not isinstance(raw, np.ndarray):  # a PIL image
        if raw.mode in _GREY_PIL_MODES:
            raise ValueError(f"image {path!r} is grey-level (mode {raw.mode!r}, "
                             f"{raw.height}×{raw.width}); an RGB image is required")
        raw = np.asarray(raw if raw.mode == "RGB" else raw.convert("RGB"))
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[-1] in (1, 2)):
        raise ValueError(f"image {path!r} is grey-level (shape {raw.shape}); "
                         f"an RGB image (H×W×3) is required")
    if raw.ndim != 3 or raw.shape[-1] not in (3, 4):
        raise ValueError(f"image {path!r} has shape {raw.shape}; expected an RGB image H×W×3 "
                         f"(or H×W×4 with alpha)")
    if raw.shape[0] == 0 or raw.shape[1] == 0:
        raise ValueError(f"image {path!r} is empty (shape {raw.shape})")
    image = _to_uint8(raw[..., :3], path)
    if isinstance(image, np.memmap):
        return image  # a view: stays on disk
    return np.ascontiguousarray(image)


def image_shape(path):
    """``(height, width)`` of an image file from its header, without decoding its pixels.

    Raises FileNotFoundError / ValueError as :func:`read_rgb` does for a missing or unreadable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist (or is not a file)")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            return tuple(int(s) for s in _read_npy(path, "image", memmap=True).shape[:2])
        if ext in _TIFF_SUFFIXES:
            import tifffile
            try:
                with tifffile.TiffFile(path) as tiff:
                    level0 = tiff.series[0].levels[0]
                    return tuple(int(size) for axis, size in zip(level0.axes, level0.shape) if axis in "YX")[:2]
            except Exception:  # noqa: BLE001 - Pillow may still read it
                pass
        with _pil_open(path) as image:
            return int(image.height), int(image.width)
    except (MemoryError, _TooLarge):
        raise
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"image {path!r} cannot be read: {error}") from error


def read_mask(path, shape=None):
    """Read a nucleus mask as bool.

    Parameters
    ----------
    path : str or path-like
        PNG, JPEG, TIFF, SVS or ``.npy`` holding a single-channel H×W array of any numeric
        dtype: binary, or an instance label map (a palette PNG gives its indices). An RGB(A)
        file is accepted only when its colour channels are identical.
    shape : (int, int), optional
        Expected (H, W), usually ``image.shape[:2]``; a mismatch is an error naming the file.

    Returns
    -------
    mask : (H, W) bool ndarray
        True where the file is > 0 (nucleus).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file type is unsupported, the file cannot be decoded, the mask has several
        differing channels, is not 2-D or not numeric, or its shape is not ``shape``. The
        message names the file.
    """
    path = os.fspath(path)
    array = np.asarray(_decode(path, "mask"))
    if array.ndim == 3:
        channels = array.shape[-1]
        if channels in (1, 2):  # grey (+ alpha)
            array = array[..., 0]
        elif channels in (3, 4) and np.array_equal(array[..., 0], array[..., 1]) \
                and np.array_equal(array[..., 0], array[..., 2]):
            array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask {path!r} has shape {array.shape}; expected a single-channel "
                         f"H×W mask (nucleus > 0; an RGB mask must have identical channels)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"mask {path!r} has non-numeric dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"mask {path!r} is empty (shape {array.shape})")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"mask {path!r} is {array.shape[0]}×{array.shape[1]} (H×W), which "
                         f"does not match the image's {tuple(shape)[0]}×{tuple(shape)[1]}")
    return array > 0


def check_rgb(image, name="image", *, uint8=False, alpha=False, finite=True):
    """The package's one RGB check: return ``image`` as an (H, W, 3) array or raise ValueError.

    Parameters
    ----------
    image : array-like, shape (H, W, 3) (or (H, W, 4) with ``alpha``)
        uint8, or a floating dtype. A ``np.memmap`` stays a memmap (no copy is made).
    name : str
        What the image is, for the message (e.g. ``"template"`` or a file name).
    uint8 : bool
        Require dtype uint8.
    alpha : bool
        Accept a fourth (alpha) channel, which is dropped (a view).
    finite : bool
        Refuse NaN and infinite values in floating images.

    Returns
    -------
    ndarray, shape (H, W, 3)
    """
    shape = getattr(image, "shape", None)
    if shape is None:
        image = np.asarray(image)
        shape = image.shape
    channels = (3, 4) if alpha else (3,)
    if len(shape) != 3 or shape[-1] not in channels:
        expected = "(H, W, 3) or (H, W, 4)" if alpha else "(H, W, 3)"
        raise ValueError(f"{name} must be an RGB image of shape {expected}; got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")
    dtype = np.dtype(image.dtype)
    if uint8 and dtype != np.uint8:
        raise ValueError(f"{name} must be uint8; got {dtype} (convert with skimage.util.img_as_ubyte)")
    if dtype != np.uint8 and dtype.kind != "f":
        raise ValueError(f"{name} must have dtype uint8 or a floating dtype; got {dtype}")
    if shape[-1] == 4:
        image = image[..., :3]
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if finite and dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return image


def image_stem(path):
    """File name without its image extension (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    for suffix in sorted({".ome.tif", ".ome.tiff", *IMAGE_SUFFIXES}, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def find_images(entries):
    """Files given directly, plus every readable image file (sorted) of given folders.

    Parameters
    ----------
    entries : iterable of path
        Image files or folders; a folder contributes its files whose extension is one of
        :data:`IMAGE_SUFFIXES` (not its subfolders).

    Returns
    -------
    list of Path

    Raises
    ------
    FileNotFoundError
        For an entry that does not exist.
    ValueError
        For a folder without images, or one that cannot be read; the message names it.
    """
    files = []
    for entry in entries:
        entry = Path(entry)
        try:
            if entry.is_file():
                files.append(entry)
                continue
            if not entry.is_dir():
                raise FileNotFoundError(f"{entry}: no such image file or folder")
            found = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        except PermissionError as error:  # e.g. a folder without read permission
            raise ValueError(f"{entry}: cannot read this folder or file ({error})") from error
        if not found:
            raise ValueError(f"{entry}: folder contains no {'/'.join(IMAGE_SUFFIXES)} images")
        files.extend(found)
    return files


#: Output extension -> (Pillow format name, save options).
WRITE_FORMATS = {".png": ("PNG", {}), ".tif": ("TIFF", {"compression": "tiff_deflate"}),
                 ".tiff": ("TIFF", {"compression": "tiff_deflate"}), ".jpg": ("JPEG", {"quality": 95}),
                 ".jpeg": ("JPEG", {"quality": 95})}


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same file: the same inode when both exist (symbolic
    and hard links, ``./x`` and ``x``, a case-insensitive file system), else the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _replaced_mode(path):
    """Permission bits for a file written at ``path``: those of the file there, else 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, write, *, overwrite=False):
    """Write a file atomically: ``write(temporary_path)``, then rename it to ``path``.

    The temporary file is in the same folder (a rename there is atomic), so an interrupt
    leaves either the old file or the complete new one, never a truncated file.

    Parameters
    ----------
    path : path
        Destination; its folder must exist.
    write : callable
        ``write(tmp_path)`` writes the whole content to ``tmp_path`` (a str).
    overwrite : bool
        Replace an existing ``path`` (default: refuse, with FileExistsError).

    Returns
    -------
    Path
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, cannot write a file there")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: output folder {folder} does not exist")
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    except OSError as error:  # read-only, full or special folder: name the output, not the temporary
        raise OSError(f"{path}: cannot write in folder {folder} ({error.strerror or error})") from None
    os.close(handle)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the output gets the mode of the file it replaces,
        # else that of any new file (0666 less the umask), as open() would have given it.
        os.chmod(tmp, _replaced_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_image(path, array, *, overwrite=False):
    """Write a uint8 image (H×W grey or H×W×3 RGB) atomically, in the format of its extension.

    Parameters
    ----------
    path : path
        ``.png``, ``.tif``/``.tiff`` (deflate) or ``.jpg``/``.jpeg`` (quality 95); any other
        extension is refused, so a name never lies about the bytes inside.
    array : ndarray, shape (H, W) or (H, W, 3), uint8
    overwrite : bool
        Replace an existing file (default: refuse).

    Returns
    -------
    Path
    """
    from PIL import Image

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in WRITE_FORMATS:
        raise ValueError(f"{path}: cannot write images with extension {ext!r}; "
                         f"use one of {', '.join(WRITE_FORMATS)}")
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"{path}: can only write H×W or H×W×3 uint8 images, got {array.shape} {array.dtype}")
    pil_format, options = WRITE_FORMATS[ext]
    image = Image.fromarray(array)

    def write(tmp):
        image.save(tmp, format=pil_format, **options)

    return write_atomic(path, write, overwrite=overwrite)
