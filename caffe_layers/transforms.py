"""Batch augmentation for nuclei segmentation: pure numpy/scipy, no Caffe.

:class:`BatchAugmenter` applies, per sample of an N×C×H×W batch and in this order:

1. geometry -- random flips (``flip``), quarter turns (``rotate``) and an arbitrary-angle
   rotation with reflect padding (``rotate_any``); the label gets exactly the same geometry;
2. stain jitter in haematoxylin/eosin/DAB space (``hed``, Tellez et al. 2018), images only;
3. per-channel ``x*a + b`` (``color``) and clipping to ``[clip_min, clip_max]`` (``clip``),
   images only.

All random numbers come from one :class:`numpy.random.Generator` seeded by ``seed``, through
:func:`draw_params`, so the same seed gives the same batch. :func:`naive_augment` is a plain
per-image implementation of the same transforms, kept as a test oracle and benchmark baseline.

Speed comes from touching each batch element as few times as possible: the flipped/rotated
sample is a numpy *view* that is read once while writing the output, the colour change is
fused into that write, and the remaining in-place steps run on one sample at a time while it
is still in cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed

from .params import AUGMENT_SCHEMA, parse_param_str

__all__ = ["AugmentDraws", "BatchAugmenter", "draw_params", "naive_augment"]

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
    p = AUGMENT_SCHEMA.validate(params, "draw_params params")
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


def _geometric_view(sample: np.ndarray, k: int, flip_h: bool, flip_v: bool) -> np.ndarray:
    """Flip then quarter-turn the last two axes of ``sample``; returns a view (no copy)."""
    if flip_v:
        sample = sample[..., ::-1, :]
    if flip_h:
        sample = sample[..., ::-1]
    if k:
        sample = np.rot90(sample, k, axes=(-2, -1))
    return sample


def _is_transposed(view: np.ndarray) -> bool:
    """Whether reading ``view`` row by row walks down the columns of its base (an odd quarter turn)."""
    return view.ndim >= 2 and abs(view.strides[-1]) > abs(view.strides[-2])


class _Staging:
    """Reusable scratch buffers whose rows are padded so a transposed read is cache-friendly.

    Reading a quarter-turned view of a C-contiguous sample walks its columns: with a row
    stride that is a power of two (256 float32 = 1 KiB) every element of a column maps to
    the same few L1 cache sets and the read runs ~2× slower than a contiguous copy plus a
    read with a padded stride (W+16 floats). So a sample that will be read transposed is first
    copied (one fast contiguous pass, cast to the work dtype on the way) into such a buffer.
    """

    def __init__(self):
        self._buffers: dict[tuple, np.ndarray] = {}

    def __call__(self, sample: np.ndarray, dtype: np.dtype, pad: bool = True) -> np.ndarray:
        *lead, width = sample.shape
        padded = (width + 16 + (-width % 16)) if pad else width
        key = (tuple(lead), padded, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty((*lead, padded), dtype)
        staged = buffer[..., :width]
        np.copyto(staged, sample, casting="unsafe")
        return staged


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
        self._staging = _Staging()

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
        return draw_params(n, image_shape, self.rng, self.params)

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
        self.last_params = draws

        hed = _HedJitter(p["max_value"], p["channel_order"], (height, width)) if draws.hed_applied.any() else None
        color = bool(p["color"])
        clip = bool(p["clip"])
        clip_min, clip_max = p["clip_min"], p["clip_max"]
        stage = self._staging
        # Samples of at least this many pixels are staged before a transposed read (below
        # that, everything is in L1 anyway and the extra call costs more than it saves).
        stage_large = height * width >= 64 * 64
        for i in range(n):
            k, flip_h, flip_v, angle = int(draws.k[i]), bool(draws.flip_h[i]), bool(draws.flip_v[i]), float(draws.angle[i])
            image = images[i]
            transposed = k % 2 == 1
            # Flips alone were measured not to gain from staging: only quarter turns are staged.
            staged = stage_large and transposed
            if staged:
                image = stage(image, images.dtype if np.issubdtype(images.dtype, np.floating) else images_out.dtype)
            source = _geometric_view(image, k, flip_h, flip_v)
            target = images_out[i]
            if angle:
                matrix, offset = _rotation_about_centre(angle, height, width)
                if np.shares_memory(source, target):  # in place: ndimage must not read what it writes
                    source = source.copy()
                for c in range(channels):
                    ndimage.affine_transform(source[c], matrix, offset, output=target[c], order=1, mode="reflect")
                source = target
            if hed is not None and draws.hed_applied[i]:
                hed(source, target, draws.alpha[i], draws.beta[i])
                source = target
            if color and draws.color_applied[i]:
                # One fused pass per channel (256 KiB at 256×256, so it stays in L2): read the
                # geometrically transformed view, write a*x straight out, then add and clip
                # in place while the channel is still in cache.
                a = draws.a[i].astype(np.float32)
                b = draws.b[i].astype(np.float32)
                for c in range(channels):
                    out = target[c]
                    np.multiply(source[c], a[c], out=out, casting="same_kind")
                    out += b[c]
                    if clip:
                        np.clip(out, clip_min, clip_max, out=out)
            else:
                if source is not target:
                    np.copyto(target, source, casting="same_kind")
                if color and clip:  # colour not drawn for this sample: a=1, b=0, still clipped
                    np.clip(target, clip_min, clip_max, out=target)

            if labels is not None:
                label = labels[i]
                if staged:
                    label = stage(label, labels.dtype)
                label_source = _geometric_view(label, k, flip_h, flip_v)
                label_target = labels_out[i]
                if angle:
                    if np.shares_memory(label_source, label_target):
                        label_source = label_source.copy()
                    _rotate_label_into(_channel_first_2d(label_source), _channel_first_2d(label_target),
                                       matrix, offset)
                else:
                    np.copyto(label_target, label_source, casting="same_kind")
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
            image = image * draws.a[i].astype(np.float32)[:, None, None] + draws.b[i].astype(np.float32)[:, None, None]
            if p["clip"]:
                image = np.clip(image, p["clip_min"], p["clip_max"])
        images_out[i] = image
        if label is not None:
            labels_out[i] = label
    return images_out, labels_out
