"""Pure augmentation kernels on numpy arrays: the dihedral group, rotation, colour, checks.

Functions here take arrays and explicit parameters and draw no random numbers; the batch
orchestration that draws them lives in :mod:`caffe_layers.transforms.batch`, and a plain
per-image reference implementation in :mod:`caffe_layers.transforms.reference`.

Speed comes from touching each batch element as few times as possible: the flips and
quarter turns of a sample are composed into one of the 8 symmetries of the square
(:func:`dihedral_element`), applied to each 2-D plane by one SIMD OpenCV call (``cv2.flip``,
``cv2.rotate`` or ``cv2.transpose``) writing straight into the output plane, and the colour
change then runs in place on that plane while it is still in cache. (numpy's copies from
reversed or rotated views are scalar loops, several times slower.)

Shapes: a plane is H×W, a sample C×H×W, a batch N×C×H×W; labels are N×1×H×W or N×H×W.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["ANTI_TRANSPOSE", "DIHEDRAL_ELEMENTS", "FLIP_H", "FLIP_V", "IDENTITY", "ROTATE_180",
           "ROTATE_CCW", "ROTATE_CW", "TRANSPOSE", "Scratch", "apply_dihedral", "check_batch",
           "check_output", "clip_in_place", "dihedral_element", "dihedral_planes", "label_plane",
           "plane_mode", "rotate_label_into", "rotation_about_centre", "scale_shift_in_place"]

# Label dtypes scipy.ndimage can interpolate directly; others go through a safe proxy dtype.
NDIMAGE_LABEL_DTYPES = frozenset(
    np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                          np.uint32, np.uint64, np.float32, np.float64)
)


# The 8 symmetries of the square (the dihedral group D4) as they act on a 2-D plane x (H×W):
IDENTITY = "identity"  # x
FLIP_H = "flip_h"  # x[:, ::-1], cv2.flip(x, 1)
FLIP_V = "flip_v"  # x[::-1, :], cv2.flip(x, 0)
ROTATE_180 = "rotate_180"  # x[::-1, ::-1], cv2.flip(x, -1)
ROTATE_CCW = "rotate_ccw"  # np.rot90(x, 1), cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE)
ROTATE_CW = "rotate_cw"  # np.rot90(x, 3), cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE)
TRANSPOSE = "transpose"  # x.T, cv2.transpose(x)
ANTI_TRANSPOSE = "anti_transpose"  # x[::-1, ::-1].T, cv2.transpose then cv2.flip(-1)
DIHEDRAL_ELEMENTS = (IDENTITY, FLIP_H, FLIP_V, ROTATE_180, ROTATE_CCW, ROTATE_CW, TRANSPOSE, ANTI_TRANSPOSE)
_FLIP_CODES = {FLIP_H: 1, FLIP_V: 0, ROTATE_180: -1}
_ROTATE_CODES = {ROTATE_CCW: cv2.ROTATE_90_COUNTERCLOCKWISE, ROTATE_CW: cv2.ROTATE_90_CLOCKWISE}
_SWAPS_AXES = frozenset({ROTATE_CCW, ROTATE_CW, TRANSPOSE, ANTI_TRANSPOSE})


def dihedral_element(k: int, flip_h: bool, flip_v: bool) -> str:
    """The one symmetry of the square equal to "flip H×W, then ``np.rot90`` ``k`` times".

    That is, ``np.rot90(x[..., ::-1 if flip_v, ::-1 if flip_h], k, axes=(-2, -1))`` as
    documented in :class:`AugmentDraws`. Uses ``flip_v == rotate_180 ∘ flip_h``, and
    ``rot90^k ∘ flip_h`` is the identity, transpose, vertical flip and anti-transpose for
    k = 0, 1, 2, 3.
    """
    k = int(k) % 4
    flip_h = bool(flip_h)
    if flip_v:
        flip_h = not flip_h
        k = (k + 2) % 4
    if flip_h:
        return (FLIP_H, TRANSPOSE, FLIP_V, ANTI_TRANSPOSE)[k]
    return (IDENTITY, ROTATE_CCW, ROTATE_180, ROTATE_CW)[k]


_NUMPY_DIHEDRAL = {
    IDENTITY: lambda x: x,
    FLIP_H: lambda x: x[..., ::-1],
    FLIP_V: lambda x: x[..., ::-1, :],
    ROTATE_180: lambda x: x[..., ::-1, ::-1],
    ROTATE_CCW: lambda x: np.rot90(x, 1, axes=(-2, -1)),
    ROTATE_CW: lambda x: np.rot90(x, 3, axes=(-2, -1)),
    TRANSPOSE: lambda x: np.swapaxes(x, -2, -1),
    ANTI_TRANSPOSE: lambda x: np.swapaxes(x[..., ::-1, ::-1], -2, -1),
}


def _cv2_call(element: str, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One OpenCV call (two for the anti-transpose) from ``source`` into ``target``."""
    if element in _FLIP_CODES:
        return cv2.flip(source, _FLIP_CODES[element], dst=target)
    if element in _ROTATE_CODES:
        return cv2.rotate(source, _ROTATE_CODES[element], dst=target)
    result = cv2.transpose(source, dst=target)
    if element == ANTI_TRANSPOSE:
        result = cv2.flip(result, -1, dst=result)  # in place: safe for flips
    return result


_ADD_WEIGHTED_BLOCK = 64
"""``addWeighted`` gets a multiple of this many elements: OpenCV 4.x computes the elements past
its last full SIMD block in float32 (two roundings, up to 1 ulp off) instead of double."""


def scale_shift_in_place(plane: np.ndarray, a: float, b: float) -> None:
    """``plane = a*plane + b``, computed in double precision and rounded once to the plane's dtype.

    One OpenCV ``addWeighted`` pass on a C-contiguous float32 plane (it works in double
    internally), instead of numpy's multiply then add, each a pass rounding to float32. The
    last ``size % 64`` elements go through numpy in double, so that every OpenCV version
    (4.x rounds its scalar tail differently from 5.x) gives the same values.
    """
    a, b = float(a), float(b)
    if plane.dtype == np.float32 and plane.ndim == 2 and plane.flags.c_contiguous:
        head = plane.size - plane.size % _ADD_WEIGHTED_BLOCK
        if head == plane.size:
            if cv2.addWeighted(plane, a, plane, 0.0, b, dst=plane) is plane:
                return
        else:
            flat = plane.reshape(-1)
            block = flat[:head].reshape(1, head)
            if not head or cv2.addWeighted(block, a, block, 0.0, b, dst=block) is block:
                tail = flat[head:]
                np.copyto(tail, tail.astype(np.float64) * a + b, casting="same_kind")
                return
    np.copyto(plane, plane.astype(np.float64) * a + b, casting="same_kind")


def clip_in_place(array: np.ndarray, low: float, high: float) -> None:
    """``np.clip(array, low, high, out=array)``, through OpenCV's threshold where it can.

    For C-contiguous float32 with ``low == 0`` (the 0-255 case) two SIMD thresholds (truncate
    at ``high``, zero below 0) give the same values as ``np.clip`` in about half its time; the
    colour change clips every plane, so this is on the layer's hot path.
    """
    if array.dtype == np.float32 and low == 0 and array.ndim >= 2 and array.flags.c_contiguous:
        planes = array.reshape(array.shape[0], -1)
        _, truncated = cv2.threshold(planes, float(high), float(high), cv2.THRESH_TRUNC, dst=planes)
        _, clipped = cv2.threshold(truncated, 0.0, 0.0, cv2.THRESH_TOZERO, dst=planes)
        if clipped is planes:
            return
    np.clip(array, low, high, out=array)


_CV2_DTYPES: dict[np.dtype, bool] = {}


def _cv2_handles(dtype: np.dtype) -> bool:
    """Whether OpenCV flips/turns 2-D arrays of ``dtype`` exactly, in place into ``dst``.

    Probed once per dtype, as support depends on the OpenCV version (5.x adds uint32 and
    bool; int64 and uint64 come back converted, so they use numpy).
    """
    dtype = np.dtype(dtype)
    known = _CV2_DTYPES.get(dtype)
    if known is None:
        known = False
        if dtype.isnative and dtype.kind in "biuf":
            probe = np.arange(6).reshape(2, 3)
            probe = (probe * 7 % 5 > 1 if dtype.kind == "b" else probe).astype(dtype)  # no symmetry
            try:
                known = True
                for element in DIHEDRAL_ELEMENTS[1:]:
                    expected = _NUMPY_DIHEDRAL[element](probe)
                    target = np.empty(expected.shape, dtype)
                    result = _cv2_call(element, probe, target)
                    known = known and result is target and np.array_equal(target, expected)
            except (cv2.error, TypeError, ValueError):
                known = False
        _CV2_DTYPES[dtype] = known
    return known


class Scratch:
    """Reusable scratch arrays, one per (use, shape, dtype)."""

    def __init__(self):
        self._buffers: dict[tuple, np.ndarray] = {}

    def __call__(self, use: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        key = (use, tuple(shape), np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty(shape, dtype)
        return buffer


def apply_dihedral(element: str, source: np.ndarray, target: np.ndarray,
                   scratch: Scratch | None = None) -> None:
    """Write ``element`` (see :func:`dihedral_element`) of the 2-D plane ``source`` into ``target``.

    One read and one write of the plane by OpenCV when ``source`` and ``target`` are
    C-contiguous planes of the same dtype that OpenCV handles. Otherwise ``source`` is first
    cast (``same_kind``) into a contiguous scratch plane of the target's dtype; dtypes OpenCV
    lacks (int64, ...) go through numpy. ``target`` may be ``source`` itself (in place) or
    overlap it: flips run in place, turns and transposes read from a scratch copy.
    """
    if element not in _NUMPY_DIHEDRAL:
        raise ValueError(f"unknown dihedral element {element!r}; expected one of {DIHEDRAL_ELEMENTS}")
    if source.ndim != 2 or target.ndim != 2:
        raise ValueError(f"apply_dihedral needs 2-D planes, got {source.shape} and {target.shape}")
    expected_shape = source.shape[::-1] if element in _SWAPS_AXES else source.shape
    if target.shape != expected_shape:
        raise ValueError(f"{element} of a {source.shape} plane has shape {expected_shape}, target has {target.shape}")
    if element == IDENTITY:
        if source is not target:
            np.copyto(target, source, casting="same_kind")
        return
    if not _cv2_handles(target.dtype):
        np.copyto(target, _NUMPY_DIHEDRAL[element](source), casting="same_kind")  # numpy handles overlap
        return
    scratch = scratch if scratch is not None else Scratch()
    out = target if target.flags.c_contiguous else scratch("dihedral target", target.shape, target.dtype)
    same_plane = (source.dtype == out.dtype and source.flags.c_contiguous
                  and source.__array_interface__["data"][0] == out.__array_interface__["data"][0])
    if not (source.dtype == out.dtype and source.flags.c_contiguous and not np.may_share_memory(source, out)) \
            and not (same_plane and element in _FLIP_CODES):
        staged = scratch("dihedral source", source.shape, out.dtype)
        np.copyto(staged, source, casting="same_kind")
        source = staged
    result = _cv2_call(element, source, out)
    if result is not out:  # OpenCV allocated instead of writing into out: never seen, but be exact
        np.copyto(out, result, casting="same_kind")
    if out is not target:
        np.copyto(target, out, casting="same_kind")


def plane_mode(source: np.ndarray, target: np.ndarray) -> str:
    """How :meth:`BatchAugmenter.augment_into` moves the planes of ``source`` into ``target``
    (same shape, planes on the last two axes), decided once per batch:

    ``"direct"``: one OpenCV call per plane (same dtype OpenCV handles, C-contiguous planes,
    no shared memory); ``"in_place"``: the same, but ``target`` is ``source`` (flips run in
    place, turns read from a scratch copy); ``"general"``: :func:`apply_dihedral` per plane.
    """
    itemsize = source.dtype.itemsize
    contiguous_planes = all(array.strides[-1] == itemsize and array.strides[-2] == array.shape[-1] * itemsize
                            for array in (source, target))
    if source.dtype != target.dtype or not contiguous_planes or not _cv2_handles(target.dtype):
        return "general"
    if not np.may_share_memory(source, target):
        return "direct"
    same = (source.__array_interface__["data"][0] == target.__array_interface__["data"][0]
            and source.strides == target.strides)
    return "in_place" if same else "general"


def dihedral_planes(mode: str, element: str, source: np.ndarray, target: np.ndarray, scratch: Scratch) -> None:
    """Write ``element`` of each plane of ``source`` (…×H×W) into ``target``, as planned by :func:`plane_mode`."""
    if mode == "general":
        for index in np.ndindex(source.shape[:-2]):
            apply_dihedral(element, source[index], target[index], scratch)
        return
    if element == IDENTITY:
        if mode == "direct":
            np.copyto(target, source)
        return
    if source.ndim == 2:
        sources, targets = (source,), (target,)
    else:
        sources = source.reshape(-1, *source.shape[-2:])
        targets = target.reshape(-1, *target.shape[-2:])  # views: the planes are C-contiguous
    copy_first = mode == "in_place" and element not in _FLIP_CODES
    for plane_source, plane_target in zip(sources, targets):
        if copy_first:  # OpenCV turns and transposes must not write what they read
            staged = scratch("dihedral source", plane_source.shape, plane_source.dtype)
            np.copyto(staged, plane_source)
            plane_source = staged
        result = _cv2_call(element, plane_source, plane_target)
        if result is not plane_target:  # never seen for these dtypes and layouts, but stay exact
            np.copyto(plane_target, result)


def rotation_about_centre(angle_degrees: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset for ``ndimage.affine_transform``: a counter-clockwise rotation
    (as displayed, rows pointing down) about the patch centre, mapping output to input."""
    theta = np.deg2rad(angle_degrees)
    cos, sin = np.cos(theta), np.sin(theta)
    matrix = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    return matrix, centre - matrix @ centre


def rotate_label_into(source: np.ndarray, target: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> None:
    """Nearest-neighbour rotation of one 2-D label map, so no new label values appear."""
    if source.dtype in NDIMAGE_LABEL_DTYPES:
        ndimage.affine_transform(source, matrix, offset, output=target, order=0, mode="reflect")
        return
    # bool, float16, ...: ndimage cannot handle them; nearest sampling is exact in a wider type.
    proxy = np.uint8 if source.dtype == np.bool_ else np.float64
    rotated = ndimage.affine_transform(source.astype(proxy), matrix, offset, order=0, mode="reflect")
    np.copyto(target, rotated, casting="unsafe")


def label_plane(label_sample: np.ndarray) -> np.ndarray:
    """(1, H, W) or (H, W) label sample -> (H, W) view."""
    return label_sample[0] if label_sample.ndim == 3 else label_sample


def check_batch(images: np.ndarray, labels: np.ndarray | None, need_rgb: bool) -> None:
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be a 4-D N×C×H×W array, got shape {images.shape}")
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer)
                                        or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"images must have a real numeric dtype, got {images.dtype}")
    if need_rgb and images.shape[1] != 3:
        raise ValueError(f"hed stain jitter needs 3-channel RGB/BGR images, got C={images.shape[1]} "
                         f"(images shape {images.shape})")
    if labels is None:
        return
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy array, got {type(labels).__name__}")
    if labels.ndim not in (3, 4) or (labels.ndim == 4 and labels.shape[1] != 1):
        raise ValueError(f"labels must be N×1×H×W or N×H×W, got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"images and labels have different batch sizes: images {images.shape}, "
                         f"labels {labels.shape}")
    if labels.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"images and labels have different H×W: images {images.shape}, labels {labels.shape}")


def check_output(name: str, output: np.ndarray, expected_shape: tuple[int, ...]) -> None:
    if not isinstance(output, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(output).__name__}")
    if output.shape != expected_shape:
        raise ValueError(f"{name} must have shape {expected_shape}, got {output.shape}")
    if not output.flags.writeable:
        raise ValueError(f"{name} is read-only")


