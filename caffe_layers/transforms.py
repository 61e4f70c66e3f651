"""Batch augmentation for nuclei segmentation: numpy, scipy and OpenCV, no Caffe.

:class:`BatchAugmenter` applies, per sample of an N×C×H×W batch and in this order:

1. geometry -- random flips (``flip``), quarter turns (``rotate``) and an arbitrary-angle
   rotation with reflect padding (``rotate_any``); the label gets exactly the same geometry;
2. stain jitter in haematoxylin/eosin/DAB space (``hed``, Tellez et al. 2018), images only;
3. per-channel ``x*a + b`` (``color``) and clipping to ``[clip_min, clip_max]`` (``clip``),
   images only.

All random numbers come from one :class:`numpy.random.Generator` seeded by ``seed``, through
:func:`draw_params`, so the same seed gives the same batch. :func:`naive_augment` is a plain
per-image implementation of the same transforms, kept as a test oracle and benchmark baseline.

Speed comes from touching each batch element as few times as possible: the flips and
quarter turns of a sample are composed into one of the 8 symmetries of the square
(:func:`dihedral_element`), applied to each 2-D plane by one SIMD OpenCV call (``cv2.flip``,
``cv2.rotate`` or ``cv2.transpose``) writing straight into the output plane, and the colour
change then runs in place on that plane while it is still in cache. (numpy's copies from
reversed or rotated views are scalar loops, several times slower.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed

from .params import AUGMENT_SCHEMA, parse_param_str

__all__ = ["AugmentDraws", "BatchAugmenter", "apply_dihedral", "dihedral_element", "draw_params",
           "naive_augment"]

# Label dtypes scipy.ndimage can interpolate directly; others go through a safe proxy dtype.
_NDIMAGE_LABEL_DTYPES = frozenset(
    np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                          np.uint32, np.uint64, np.float32, np.float64)
)


@dataclasses.dataclass(frozen=True)
class AugmentDraws:
    """Random parameters of one batch, as drawn by :func:`draw_params`.

    Disabled transforms hold identity values (k=0, no flips, angle 0, alpha 1, beta 0, a 1,
    b 0), so the arrays always describe exactly what was applied.

    Attributes
    ----------
    k : ndarray of int, shape (N,)
        Counter-clockwise quarter turns (``np.rot90`` on the last two axes); only 0 or 2
        for non-square patches.
    flip_h, flip_v : ndarray of bool, shape (N,)
        Horizontal (reverse W) and vertical (reverse H) flips, applied before the turns.
    angle : ndarray of float, shape (N,)
        Counter-clockwise rotation about the centre in degrees, applied after the turns.
    hed_applied : ndarray of bool, shape (N,)
        Which samples got the stain jitter.
    alpha, beta : ndarray of float, shape (N, 3)
        Stain scale and shift per sample and stain (H, E, DAB).
    color_applied : ndarray of bool, shape (N,)
        Which samples got the colour change.
    a, b : ndarray of float, shape (N, C)
        Per-sample, per-channel factor and offset of ``x*a + b``.
    """

    k: np.ndarray
    flip_h: np.ndarray
    flip_v: np.ndarray
    angle: np.ndarray
    hed_applied: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    color_applied: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return len(self.k)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The draws as a plain dict of arrays."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def draw_params(n: int, image_shape: tuple[int, int, int], rng: np.random.Generator,
                params: Mapping[str, Any] | None = None) -> AugmentDraws:
    """Draw the random parameters of a batch of ``n`` images.

    Every draw is made whether or not its transform is enabled (disabled ones are then
    reset to identity), so switching one transform on or off does not change the random
    numbers of the others for a given seed.

    Parameters
    ----------
    n : int
        Batch size N.
    image_shape : tuple of int
        ``(C, H, W)`` of one image.
    rng : numpy.random.Generator
        Source of randomness; advanced by this call.
    params : mapping, optional
        Augmentation parameters (validated with :data:`~caffe_layers.params.AUGMENT_SCHEMA`;
        missing keys take their defaults).

    Returns
    -------
    AugmentDraws
    """
    return _draw_validated(n, image_shape, rng, AUGMENT_SCHEMA.validate(params, "draw_params params"))


def _draw_validated(n: int, image_shape: tuple[int, int, int], rng: np.random.Generator,
                    p: Mapping[str, Any]) -> AugmentDraws:
    """:func:`draw_params` with ``p`` already validated (the per-batch path of the layer)."""
    channels, height, width = (int(s) for s in image_shape)
    k = rng.integers(0, 4, n)
    if height != width:
        k = 2 * (k % 2)  # only half turns keep a non-square shape
    flip_h = rng.random(n) < 0.5
    flip_v = rng.random(n) < 0.5
    angle = rng.uniform(p["angle_min"], p["angle_max"], n)
    hed_applied = rng.random(n) < p["hed_p"]
    alpha = rng.uniform(1.0 - p["hed_alpha"], 1.0 + p["hed_alpha"], (n, 3))
    beta = rng.uniform(-p["hed_beta"], p["hed_beta"], (n, 3))
    color_applied = rng.random(n) < p["color_p"]
    a = rng.uniform(p["color_a_min"], p["color_a_max"], (n, channels))
    b = rng.uniform(p["color_b_min"], p["color_b_max"], (n, channels))

    if not p["rotate"]:
        k[:] = 0
    if not p["flip"]:
        flip_h[:] = False
        flip_v[:] = False
    if not p["rotate_any"]:
        angle[:] = 0.0
    if not p["hed"]:
        hed_applied[:] = False
    alpha[~hed_applied] = 1.0
    beta[~hed_applied] = 0.0
    if not p["color"]:
        color_applied[:] = False
    a[~color_applied] = 1.0
    b[~color_applied] = 0.0
    return AugmentDraws(k=k, flip_h=flip_h, flip_v=flip_v, angle=angle, hed_applied=hed_applied,
                        alpha=alpha, beta=beta, color_applied=color_applied, a=a, b=b)


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


def _scale_shift_in_place(plane: np.ndarray, a: float, b: float) -> None:
    """``plane = a*plane + b``, computed in double precision and rounded once to the plane's dtype.

    One OpenCV ``addWeighted`` pass on a C-contiguous float32 plane (it works in double
    internally), instead of numpy's multiply then add, each a pass rounding to float32.
    """
    a, b = float(a), float(b)
    if plane.dtype == np.float32 and plane.ndim == 2 and plane.flags.c_contiguous:
        if cv2.addWeighted(plane, a, plane, 0.0, b, dst=plane) is plane:
            return
    np.copyto(plane, plane.astype(np.float64) * a + b, casting="same_kind")


def _clip_in_place(array: np.ndarray, low: float, high: float) -> None:
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


class _Scratch:
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
                   scratch: _Scratch | None = None) -> None:
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
    scratch = scratch if scratch is not None else _Scratch()
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


def _plane_mode(source: np.ndarray, target: np.ndarray) -> str:
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


def _dihedral_planes(mode: str, element: str, source: np.ndarray, target: np.ndarray, scratch: _Scratch) -> None:
    """Write ``element`` of each plane of ``source`` (…×H×W) into ``target``, as planned by :func:`_plane_mode`."""
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


def _rotation_about_centre(angle_degrees: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset for ``ndimage.affine_transform``: a counter-clockwise rotation
    (as displayed, rows pointing down) about the patch centre, mapping output to input."""
    theta = np.deg2rad(angle_degrees)
    cos, sin = np.cos(theta), np.sin(theta)
    matrix = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    return matrix, centre - matrix @ centre


def _rotate_label_into(source: np.ndarray, target: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> None:
    """Nearest-neighbour rotation of one 2-D label map, so no new label values appear."""
    if source.dtype in _NDIMAGE_LABEL_DTYPES:
        ndimage.affine_transform(source, matrix, offset, output=target, order=0, mode="reflect")
        return
    # bool, float16, ...: ndimage cannot handle them; nearest sampling is exact in a wider type.
    proxy = np.uint8 if source.dtype == np.bool_ else np.float64
    rotated = ndimage.affine_transform(source.astype(proxy), matrix, offset, order=0, mode="reflect")
    np.copyto(target, rotated, casting="unsafe")


def _channel_first_2d(label_sample: np.ndarray) -> np.ndarray:
    """(1, H, W) or (H, W) label sample -> (H, W) view."""
    return label_sample[0] if label_sample.ndim == 3 else label_sample


def _check_batch(images: np.ndarray, labels: np.ndarray | None, need_rgb: bool) -> None:
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


def _check_output(name: str, output: np.ndarray, expected_shape: tuple[int, ...]) -> None:
    if not isinstance(output, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(output).__name__}")
    if output.shape != expected_shape:
        raise ValueError(f"{name} must have shape {expected_shape}, got {output.shape}")
    if not output.flags.writeable:
        raise ValueError(f"{name} is read-only")


class BatchAugmenter:
    """Random per-sample augmentation of an image batch and its label maps.

    Parameters
    ----------
    where : str, optional
        Name used in error messages about the parameters.
    **params
        Keys of :data:`~caffe_layers.params.AUGMENT_SCHEMA` (``AUGMENT_SCHEMA.describe()``
        lists them); missing keys take their defaults, invalid ones raise
        :class:`~caffe_layers.params.ParamError`.

    Attributes
    ----------
    params : mapping
        The validated parameters (read-only).
    rng : numpy.random.Generator
        Source of all random draws, seeded by ``params["seed"]`` (None: fresh entropy).
    last_params : AugmentDraws or None
        The draws of the most recent batch, for inspection and tests.

    Notes
    -----
    The colour change ``x*a + b`` works in the units of the input. If images were scaled
    (e.g. divided by 255 to lie in [0, 1]), ``color_b_*`` and ``clip_*`` must be scaled by
    the same factor (b=10 on [0, 255] is b=10/255 on [0, 1]); ``a`` is scale-free. If a mean
    was subtracted, ``a`` would also scale the mean and the clip range would be wrong: put
    the augmentation *before* any centring. The stain jitter likewise needs raw intensities
    with white at ``max_value``.

    Examples
    --------
    >>> augment = BatchAugmenter(rotate=True, flip=True, color=True, seed=0)
    >>> images = np.full((2, 3, 8, 8), 128, np.float32)
    >>> labels = np.zeros((2, 1, 8, 8), np.uint8)
    >>> out_images, out_labels = augment(images, labels)
    >>> out_images.shape, out_images.dtype, out_labels.dtype
    ((2, 3, 8, 8), dtype('float32'), dtype('uint8'))
    """

    def __init__(self, *, where: str = "BatchAugmenter", **params: Any):
        validated = AUGMENT_SCHEMA.validate(params, where)
        self.params: Mapping[str, Any] = MappingProxyType(validated)
        self.rng = np.random.default_rng(validated["seed"])
        self.last_params: AugmentDraws | None = None
        self._scratch = _Scratch()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | str | bytes | None,
                    where: str = "augment params") -> BatchAugmenter:
        """Build from a parameter dict or a ``param_str`` (JSON, Python literal or YAML).

        Errors name ``where``, e.g. ``"AugmentationLayer param_str"``.
        """
        if params is None or isinstance(params, (str, bytes)):
            params = parse_param_str(params, where)
        return cls(where=where, **AUGMENT_SCHEMA.validate(params, where))

    def __repr__(self) -> str:
        changed = {key: value for key, value in self.params.items()
                   if value != AUGMENT_SCHEMA.params[key].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    @property
    def is_identity(self) -> bool:
        """True when no transform is enabled (the output would equal the input)."""
        p = self.params
        return not (p["rotate"] or p["flip"] or p["rotate_any"] or p["hed"] or p["color"])

    def draw(self, n: int, image_shape: tuple[int, int, int]) -> AugmentDraws:
        """Draw the parameters for a batch of ``n`` images of shape ``(C, H, W)`` from :attr:`rng`."""
        return _draw_validated(n, image_shape, self.rng, self.params)  # validated in __init__

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 draws: AugmentDraws | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment a batch into new arrays; the inputs are not modified.

        Parameters
        ----------
        images : ndarray, shape (N, C, H, W)
            Any real dtype (float32 avoids a conversion).
        labels : ndarray, shape (N, 1, H, W) or (N, H, W), optional
            Label maps of any dtype; they get the same geometry and nothing else.
        draws : AugmentDraws, optional
            Use these parameters instead of drawing new ones.

        Returns
        -------
        images_out : ndarray of float32, shape (N, C, H, W)
        labels_out : ndarray or None
            Same shape and dtype as ``labels``.
        """
        images = np.asarray(images)
        labels = None if labels is None else np.asarray(labels)
        _check_batch(images, labels, need_rgb=bool(self.params["hed"]))
        images_out = np.empty(images.shape, np.float32)
        labels_out = None if labels is None else np.empty_like(labels, order="C")
        self.augment_into(images, labels, images_out, labels_out, draws=draws)
        return images_out, labels_out

    def augment_into(self, images: np.ndarray, labels: np.ndarray | None,
                     images_out: np.ndarray, labels_out: np.ndarray | None,
                     draws: AugmentDraws | None = None) -> AugmentDraws:
        """Augment a batch, writing into preallocated arrays (e.g. Caffe top blobs).

        The outputs may be the inputs themselves (in-place augmentation) or any other arrays
        of the same shape; the inputs are only written to when they are also the outputs.

        Parameters
        ----------
        images : ndarray, shape (N, C, H, W)
            Any real dtype.
        labels : ndarray, shape (N, 1, H, W) or (N, H, W), or None
        images_out : ndarray, shape (N, C, H, W)
            Floating dtype (float32 for Caffe); C-contiguous is fastest.
        labels_out : ndarray of the same shape as ``labels``, or None
            Any dtype the labels can be cast to (``same_kind``), e.g. float32 for Caffe.
        draws : AugmentDraws, optional
            Use these parameters instead of drawing new ones from :attr:`rng`.

        Returns
        -------
        AugmentDraws
            The parameters used (also stored in :attr:`last_params`).
        """
        p = self.params
        _check_batch(images, labels, need_rgb=bool(p["hed"]))
        _check_output("images_out", images_out, images.shape)
        if not np.issubdtype(images_out.dtype, np.floating):
            raise ValueError(f"images_out must have a floating dtype, got {images_out.dtype}")
        if (labels is None) != (labels_out is None):
            raise ValueError("labels and labels_out must be given together")
        if labels is not None:
            _check_output("labels_out", labels_out, labels.shape)

        n, channels, height, width = images.shape
        if draws is None:
            draws = self.draw(n, (channels, height, width))
        elif len(draws) != n or draws.a.shape[1] != channels:
            raise ValueError(f"draws are for {len(draws)} samples with {draws.a.shape[1]} channels, "
                             f"batch has shape {images.shape}")

        if height != width and np.any(np.asarray(draws.k) % 2):
            raise ValueError(f"odd quarter turns (k={np.asarray(draws.k).tolist()}) would change the shape of "
                             f"non-square {height}×{width} patches; only k=0 or 2 is possible")
        self.last_params = draws

        hed = _HedJitter(p["max_value"], p["channel_order"], (height, width)) if draws.hed_applied.any() else None
        color = bool(p["color"])
        scratch = self._scratch
        image_mode = _plane_mode(images, images_out)
        label_mode = None if labels is None else _plane_mode(labels, labels_out)
        clip = color and bool(p["clip"])
        if color:
            factors = draws.a.astype(np.float32)
            offsets = draws.b.astype(np.float32)

        def colour(i: int, target: np.ndarray, c: int | slice) -> None:
            """``x*a + b`` (if drawn) and clipping, in place on plane(s) ``c`` of sample ``i``."""
            if draws.color_applied[i]:
                if target.ndim == 3:
                    for channel in range(target.shape[0]):
                        _scale_shift_in_place(target[channel], factors[i, channel], offsets[i, channel])
                else:
                    _scale_shift_in_place(target, factors[i, c], offsets[i, c])
            if clip:  # also when the colour change was not drawn (a=1, b=0)
                _clip_in_place(target, p["clip_min"], p["clip_max"])

        for i in range(n):
            element = dihedral_element(draws.k[i], draws.flip_h[i], draws.flip_v[i])
            angle = float(draws.angle[i])
            target = images_out[i]
            hed_here = hed is not None and bool(draws.hed_applied[i])
            # Geometry straight into the output, one OpenCV call per plane, and the colour change
            # in place on that plane while it is in cache (256×256 float32 = 256 KiB: L2; per
            # plane was measured ~10 % faster than per sample). An arbitrary rotation reads the
            # turned sample from scratch; the stain jitter mixes channels, so after either the
            # colour change runs on the whole sample.
            if angle:
                rotated = scratch("rotate_any source", target.shape, target.dtype)
                _dihedral_planes("general", element, images[i], rotated, scratch)
                matrix, offset = _rotation_about_centre(angle, height, width)
                for c in range(channels):
                    ndimage.affine_transform(rotated[c], matrix, offset, output=target[c], order=1, mode="reflect")
            elif color and not hed_here:
                for c in range(channels):
                    _dihedral_planes(image_mode, element, images[i, c], target[c], scratch)
                    colour(i, target[c], c)
            else:
                _dihedral_planes(image_mode, element, images[i], target, scratch)
            if hed_here:
                hed(target, target, draws.alpha[i], draws.beta[i])
            if color and (angle or hed_here):
                colour(i, target, slice(None))

            if labels is not None:
                label = _channel_first_2d(labels[i])
                label_target = _channel_first_2d(labels_out[i])
                if angle:
                    # Same dtype as the input labels: _rotate_label_into picks its method by it.
                    rotated_label = scratch("rotate_any label", label.shape, label.dtype)
                    apply_dihedral(element, label, rotated_label, scratch)
                    _rotate_label_into(rotated_label, label_target, matrix, offset)
                else:
                    _dihedral_planes(label_mode, element, label, label_target, scratch)
        return draws


class _HedJitter:
    """Tellez-style stain jitter of one C×H×W sample, fused into a single 3×3 matmul.

    With optical density ``OD = -log((x+1)/(M+1))`` (``M = max_value``) and stain
    concentrations ``s = OD @ hed_from_rgb``, the jitter ``s' = alpha*s + beta`` followed by
    ``OD' = s' @ rgb_from_hed`` is affine in OD, hence in ``L = log1p(x)``:
    ``log1p(x') = L @ T + t`` with ``T = hed_from_rgb @ diag(alpha) @ rgb_from_hed`` and
    ``t = log(M+1) * (1 - T.sum(axis=0)) - beta @ rgb_from_hed``. So each sample costs one
    log1p, one 3×3 matmul and one expm1, all on a cache-sized buffer. Inputs are clipped to
    [0, M] first (optical density is undefined below -1) and outputs to [0, M].
    """

    def __init__(self, max_value: float, channel_order: str, spatial_shape: tuple[int, int]):
        self.max_value = float(max_value)
        self.log_white = np.log1p(self.max_value)
        self.reverse = channel_order == "BGR"
        pixels = spatial_shape[0] * spatial_shape[1]
        self.log_buffer = np.empty((3, pixels), np.float32)
        self.result_buffer = np.empty((3, pixels), np.float32)

    def __call__(self, source: np.ndarray, target: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> None:
        transform = hed_from_rgb @ np.diag(alpha) @ rgb_from_hed  # (3, 3), RGB rows/columns
        shift = self.log_white * (1.0 - transform.sum(axis=0)) - beta @ rgb_from_hed
        if self.reverse:
            transform, shift = transform[::-1, ::-1], shift[::-1]
        logs = self.log_buffer.reshape(source.shape)
        np.clip(source, 0.0, self.max_value, out=logs, casting="same_kind")
        np.log1p(logs, out=logs)
        # Write straight into the output when it is contiguous, else via the buffer.
        result = target.reshape(3, -1) if target.flags.c_contiguous and target.dtype == np.float32 else self.result_buffer
        np.matmul(transform.T.astype(np.float32), self.log_buffer, out=result)
        result += shift.astype(np.float32)[:, None]
        np.expm1(result, out=result)
        np.clip(result, 0.0, self.max_value, out=result)
        if result is self.result_buffer:
            np.copyto(target, result.reshape(target.shape), casting="same_kind")


def naive_augment(images: np.ndarray, labels: np.ndarray | None, params: Mapping[str, Any] | None,
                  rng: np.random.Generator | None = None,
                  draws: AugmentDraws | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Plain per-image reference implementation of :class:`BatchAugmenter`.

    Deliberately simple (copies at every step, ``ndimage.rotate``, explicit RGB -> stain ->
    RGB round trip in float64): a test oracle and the baseline of the benchmark. Given the
    same draws -- or a generator in the same state -- it matches :class:`BatchAugmenter` up to
    float32 rounding.

    Parameters
    ----------
    images : ndarray, shape (N, C, H, W)
    labels : ndarray, shape (N, 1, H, W) or (N, H, W), or None
    params : mapping or None
        Augmentation parameters (see :data:`~caffe_layers.params.AUGMENT_SCHEMA`).
    rng : numpy.random.Generator, optional
        Used to draw the parameters when ``draws`` is not given.
    draws : AugmentDraws, optional
        Parameters to apply.

    Returns
    -------
    images_out : ndarray of float32, shape (N, C, H, W)
    labels_out : ndarray or None
        Same shape and dtype as ``labels``.
    """
    p = AUGMENT_SCHEMA.validate(params, "naive_augment params")
    images = np.asarray(images)
    _check_batch(images, labels, need_rgb=bool(p["hed"]))
    n, channels, height, width = images.shape
    if draws is None:
        if rng is None:
            raise ValueError("naive_augment needs either rng or draws")
        draws = draw_params(n, (channels, height, width), rng, p)

    images_out = np.empty(images.shape, np.float32)
    labels_out = None if labels is None else np.empty_like(labels)
    for i in range(n):
        image = images[i].astype(np.float32)
        label = None if labels is None else labels[i].copy()
        if draws.flip_v[i]:
            image = np.flip(image, axis=1)
            label = None if label is None else np.flip(label, axis=-2)
        if draws.flip_h[i]:
            image = np.flip(image, axis=2)
            label = None if label is None else np.flip(label, axis=-1)
        image = np.rot90(image, draws.k[i], axes=(1, 2))
        label = None if label is None else np.rot90(label, draws.k[i], axes=(-2, -1))
        if draws.angle[i]:
            image = np.stack([ndimage.rotate(channel, draws.angle[i], reshape=False, order=1, mode="reflect")
                              for channel in image])
            if label is not None:
                label_2d = _channel_first_2d(label)
                work_dtype = label_2d.dtype if label_2d.dtype in _NDIMAGE_LABEL_DTYPES else np.float64
                rotated = ndimage.rotate(label_2d.astype(work_dtype), draws.angle[i], reshape=False,
                                         order=0, mode="reflect").astype(label.dtype)
                label = rotated.reshape(label.shape)
        if draws.hed_applied[i]:
            white = p["max_value"]
            rgb = image[::-1] if p["channel_order"] == "BGR" else image
            pixels = np.clip(rgb.reshape(3, -1).T.astype(np.float64), 0, white)
            optical_density = -np.log((pixels + 1) / (white + 1))
            stains = optical_density @ hed_from_rgb
            stains = stains * draws.alpha[i] + draws.beta[i]
            optical_density = stains @ rgb_from_hed
            pixels = np.clip((white + 1) * np.exp(-optical_density) - 1, 0, white)
            rgb = pixels.T.reshape(rgb.shape)
            image = (rgb[::-1] if p["channel_order"] == "BGR" else rgb).astype(np.float32)
        if p["color"]:
            # In double precision, rounded once to float32 (what the fast path computes).
            a = draws.a[i].astype(np.float32).astype(np.float64)[:, None, None]
            b = draws.b[i].astype(np.float32).astype(np.float64)[:, None, None]
            image = (image.astype(np.float64) * a + b).astype(np.float32)
            if p["clip"]:
                image = np.clip(image, p["clip_min"], p["clip_max"])
        images_out[i] = image
        if label is not None:
            labels_out[i] = label
    return images_out, labels_out
