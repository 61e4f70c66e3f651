"""Whole-slide readers: pyramid levels, resolution, and region reads that decode only what they touch.

:func:`open_slide` opens a pyramidal TIFF or an Aperio SVS through tifffile (:class:`TiffSlide`:
a region read decodes only the tiles or strips it overlaps, so a 50 000 × 50 000 slide is
never in memory), and the other OpenSlide formats (``.ndpi``, ``.mrxs``, ``.scn``, ...)
through ``openslide-python`` when it is installed (:class:`OpenSlideSlide`). Both give the
same interface: ``levels`` (height, width per pyramid level, level 0 first), ``downsamples``
(level 0 pixels per level pixel), ``mpp`` (micrometres per level-0 pixel, or None when the
file does not say) and ``read_region(level, y, x, height, width)`` -> uint8 RGB.

A slide is refused with a ValueError naming the file, before anything is segmented, when it
cannot be parsed, when a level's tile data runs past the end of the file (a truncated copy),
or when a level is not 8-bit RGB(A).
"""
from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path

import numpy as np

__all__ = ["OPENSLIDE_SUFFIXES", "SLIDE_SUFFIXES", "OpenSlideSlide", "TiffSlide", "choose_level", "is_slide",
           "open_slide"]

#: Formats read through OpenSlide only (tifffile reads .svs and pyramidal .tif/.tiff).
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: Every suffix that names a whole slide (a .tif/.tiff only when it is pyramidal, see is_slide).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff") + OPENSLIDE_SUFFIXES

_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def is_slide(path):
    """Whether ``path`` is a whole slide: an .svs, an OpenSlide format, or a pyramidal TIFF.

    A .tif/.tiff with one resolution only is an ordinary image (segmented in memory as
    before); one with reduced-resolution levels is a slide. Unreadable TIFFs count as slides
    when their suffix says so only if they are .svs: the slide reader then reports the error.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".svs" or suffix in OPENSLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return bool(tif.is_svs or len(series.levels) > 1)
    except Exception:  # not a readable TIFF: the ordinary image reader reports it
        return False


def _corrupt(path, detail):
    return ValueError(f"{path}: not a readable whole slide ({detail}); is the file complete?")


class _Slide:
    """What both readers share: opened by path, picklable (a worker reopens the file), closable."""

    _handle_name = None  # the attribute holding the open file (closed by close())

    def __init__(self, path):
        self.path = str(path)
        self._open()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._open()

    def close(self):
        handle = getattr(self, self._handle_name, None)
        if handle is not None:
            handle.close()
            setattr(self, self._handle_name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TiffSlide(_Slide):
    """A pyramidal TIFF or SVS read through tifffile, tile by tile (picklable: reopened by path)."""

    backend = "tifffile"
    _handle_name = "_tif"

    def _open(self):
        import tifffile

        self._lock = threading.Lock()
        path = self.path
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises TiffFileError, ValueError, struct errors ...
            raise _corrupt(path, f"{type(error).__name__}: {error}") from None
        try:
            series = self._tif.series[0]
            self._pages = [level.keyframe for level in series.levels]
        except Exception as error:
            self.close()
            raise _corrupt(path, f"{type(error).__name__}: {error}") from None
        file_size = os.path.getsize(path)
        self.levels, self.downsamples = [], []
        for index, page in enumerate(self._pages):
            if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.ndim != 3 \
                    or page.planarconfig != 1:
                self.close()
                raise ValueError(f"{path}: level {index} is not 8-bit RGB(A) in one plane (shape {page.shape}, "
                                 f"{page.dtype}); only RGB slides can be segmented")
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
            if len(ends) == 0 or ends.max() > file_size or min(page.databytecounts) == 0:
                self.close()
                raise _corrupt(path, f"level {index}: tile data ends at byte {int(ends.max()) if len(ends) else 0}, "
                                     f"the file has {file_size} bytes")
            self.levels.append((int(page.imagelength), int(page.imagewidth)))
        height0, width0 = self.levels[0]
        self.downsamples = [float(np.sqrt(height0 / h * width0 / w)) for h, w in self.levels]
        self.mpp = self._read_mpp()
        # Decode one tile of each level now: a broken codec stream is reported before any work.
        for index in range(len(self._pages)):
            self._decode_chunk(index, 0)

    def _read_mpp(self):
        page = self._pages[0]
        description = page.description or ""
        if self._tif.is_svs:
            found = _SVS_MPP.search(description)
            if found and float(found.group(1)) > 0:
                return float(found.group(1))
        tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if tag is None or unit is None:
            return None
        numerator, denominator = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if not numerator or not denominator:
            return None
        pixels_per_unit = numerator / denominator
        micrometres = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
        if micrometres is None or pixels_per_unit <= 0:
            return None
        return micrometres / pixels_per_unit

    def _decode_chunk(self, level, index):
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        with self._lock:
            handle = self._tif.filehandle
            handle.seek(offset)
            data = handle.read(count)
        if len(data) != count:
            raise _corrupt(self.path, f"level {level}, tile {index}: {len(data)} of {count} bytes")
        try:
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        except Exception as error:
            raise _corrupt(self.path, f"level {level}, tile {index} does not decode: "
                                      f"{type(error).__name__}: {error}") from None
        if decoded is None:
            raise _corrupt(self.path, f"level {level}, tile {index} is empty")
        return decoded[0]  # (rows, cols, samples)

    def read_region(self, level, y, x, height, width):
        """``(height, width, 3)`` uint8 RGB of level ``level`` from row ``y``, column ``x`` (inside the level)."""
        level_h, level_w = self.levels[level]
        if not (0 <= y and 0 <= x and height > 0 and width > 0 and y + height <= level_h and x + width <= level_w):
            raise ValueError(f"{self.path}: region {height}x{width} at ({y}, {x}) is outside level {level} "
                             f"({level_h}x{level_w})")
        page = self._pages[level]
        chunk_h, chunk_w = page.chunks[:2]
        rows_of_chunks = math.ceil(level_h / chunk_h)
        cols_of_chunks = math.ceil(level_w / chunk_w) if page.is_tiled else 1
        out = np.empty((height, width, 3), np.uint8)
        for cy in range(y // chunk_h, (y + height - 1) // chunk_h + 1):
            for cx in range(x // chunk_w, (x + width - 1) // chunk_w + 1):
                index = cy * cols_of_chunks + cx
                if index >= rows_of_chunks * cols_of_chunks:
                    continue
                chunk = self._decode_chunk(level, index)
                top, left = cy * chunk_h, cx * chunk_w
                y0, y1 = max(y, top), min(y + height, top + chunk.shape[0], level_h)
                x0, x1 = max(x, left), min(x + width, left + chunk.shape[1], level_w)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = chunk[y0 - top:y1 - top, x0 - left:x1 - left, :3]
        return out


class OpenSlideSlide(_Slide):
    """A slide read through OpenSlide (picklable: reopened by path); transparent pixels are white."""

    backend = "openslide"
    _handle_name = "_slide"

    def _open(self):
        try:
            import openslide
        except ImportError as error:
            raise ValueError(f"{self.path}: reading this format needs OpenSlide "
                             f"(pip install openslide-python openslide-bin): {error}") from None
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as error:
            raise _corrupt(self.path, f"{type(error).__name__}: {error}") from None
        self.levels = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self.downsamples = [float(d) for d in self._slide.level_downsamples]
        mpp = self._slide.properties.get("openslide.mpp-x")
        try:
            self.mpp = float(mpp) if mpp is not None and float(mpp) > 0 else None
        except ValueError:
            self.mpp = None

    def read_region(self, level, y, x, height, width):
        scale = self.downsamples[level]
        try:
            rgba = np.asarray(self._slide.read_region((int(round(x * scale)), int(round(y * scale))), level,
                                                      (int(width), int(height))))
        except Exception as error:
            raise _corrupt(self.path, f"level {level} at ({y}, {x}): {type(error).__name__}: {error}") from None
        alpha = rgba[..., 3:4].astype(np.uint16)
        # Premultiplied RGBA over white: pixels outside the scanned area are glass.
        return (rgba[..., :3] + (255 - alpha)).clip(0, 255).astype(np.uint8)


def open_slide(path):
    """A :class:`TiffSlide` (.svs, .tif, .tiff) or :class:`OpenSlideSlide` (other formats) for ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slide")
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return OpenSlideSlide(path)
    return TiffSlide(path)


def choose_level(slide, target_mpp):
    """(level, sentence saying why) of the pyramid level nearest to ``target_mpp`` micrometres per pixel.

    Nearest on a log scale (a level twice too fine is as far as one twice too coarse); level 0
    when no target is given or the slide has no resolution.
    """
    if target_mpp is None:
        return 0, "level 0 (no mpp in the model card and no --mpp)"
    if slide.mpp is None:
        return 0, f"level 0 (the slide records no resolution; the model wants {target_mpp:g} µm/px)"
    mpps = [slide.mpp * d for d in slide.downsamples]
    distance = [abs(math.log(m / target_mpp)) for m in mpps]
    level = int(np.argmin(distance))
    sentence = f"level {level} ({mpps[level]:.3f} µm/px, nearest to the model's {target_mpp:g} µm/px)"
    if distance[level] > math.log(1.25):
        sentence += "; no level is within 25 % of it, so the net sees another scale than it was trained on"
    return level, sentence
