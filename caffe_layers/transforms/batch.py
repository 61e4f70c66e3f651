"""Batch augmentation: draw each sample's random transform, then apply the kernels.

:class:`BatchAugmenter` applies, per sample of an N×C×H×W batch and in this order:

1. geometry -- random flips (``flip``), quarter turns (``rotate``) and an arbitrary-angle
   rotation with reflect padding (``rotate_any``); the label gets exactly the same geometry;
2. stain statistics (``stain_stats``, RandStainNA) -- the sample's tissue colour statistics
   (per-channel mean and std in LAB or HED space) moved to targets drawn from a distribution
   fitted on images (:mod:`caffe_layers.stain.statistics`), glass left as it is, images only;
3. stain jitter in haematoxylin/eosin/DAB space (``hed``, Tellez et al. 2018) -- concentration
   scale and shift, and with ``stain_angle`` a hue jitter turning the H and E vectors -- as one
   3×3 matrix per sample (:class:`~caffe_layers.stain.optical_density.StainAffine`), images only;
4. per-channel ``x*a + b`` (``color``) and clipping to ``[clip_min, clip_max]`` (``clip``),
   images only.

Steps 2-4 are the colour part: ``p`` is the probability that a sample gets it at all (then each
step still has its own switch and probability); geometry is label-preserving and drawn for every
sample whatever ``p``.

All random numbers come from one :class:`numpy.random.Generator` seeded by ``seed``, through
:func:`draw_augmentation`, so the same seed gives the same batch. The kernels are in
:mod:`caffe_layers.transforms.functional`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage

from .schema import AUGMENT_SCHEMA
from ..stain.optical_density import StainAffine
from ..stain.statistics import StainStatisticsTransfer, draw_target_statistics
from ..stain.tissue import NoTissueWarning
from .functional import (Scratch, apply_dihedral, check_batch, check_output, clip_in_place,
                         dihedral_element, dihedral_planes, label_plane, plane_mode, rotate_label_into,
                         rotation_about_centre, scale_shift_in_place)

__all__ = ["AugmentDraws", "BatchAugmenter", "draw_augmentation"]


@dataclasses.dataclass(frozen=True)
class AugmentDraws:
    """Random parameters of one batch, as drawn by :func:`draw_augmentation`.

    Disabled transforms hold identity values (k=0, no flips, angle 0, alpha 1, beta 0, a 1,
    b 0, stain rotation 0), so the arrays always describe exactly what was applied.

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
    stain_rotation : ndarray of float, shape (N, 2), or None
        Hue jitter: angles in degrees by which the haematoxylin and eosin optical-density vectors
        are turned in their plane (:func:`~caffe_layers.stain.optical_density.rotated_stain_matrix`),
        0 where ``hed`` was not applied or ``stain_angle`` is 0. None (draws made by hand) means 0.
    augmented : ndarray of bool, shape (N,), or None
        Which samples passed the ``p`` gate of the colour part (``hed_applied``,
        ``color_applied`` and ``stats_applied`` are False elsewhere). None (by hand): all.
    stats_applied : ndarray of bool, shape (N,), or None
        Which samples get the stain-statistics transfer (``stain_stats``). None (by hand): none.
    target_mean, target_std : ndarray of float, shape (N, 3), or None
        Their target tissue statistics per channel of the ``stain_stats`` space (0 where not
        applied).
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
    stain_rotation: np.ndarray | None = None
    augmented: np.ndarray | None = None
    stats_applied: np.ndarray | None = None
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.k)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The draws as a plain dict of arrays."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def draw_augmentation(n: int, image_shape: tuple[int, int, int], rng: np.random.Generator,
                params: Mapping[str, Any] | None = None) -> AugmentDraws:
    """Draw the random parameters of a batch of ``n`` images.

    Every draw is made whether or not its transform is enabled (disabled ones are then
    reset to identity), so switching one transform on or off does not change the random
    numbers of the others for a given seed. Draws added later come after the older ones (the
    hue angles of ``stain_angle`` are drawn last), so a batch keeps the values it had before they
    existed.

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
    return _draw_validated(n, image_shape, rng, AUGMENT_SCHEMA.validate(params, "draw_augmentation params"))


def _draw_validated(n: int, image_shape: tuple[int, int, int], rng: np.random.Generator,
                    p: Mapping[str, Any]) -> AugmentDraws:
    """:func:`draw_augmentation` with ``p`` already validated (the per-batch path of the layer)."""
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
    # Appended after every older draw: the draws above are those of earlier versions.
    stain_rotation = rng.uniform(-p["stain_angle"], p["stain_angle"], (n, 2))
    z_mean = rng.standard_normal((n, 3))
    z_std = rng.standard_normal((n, 3))
    augmented = rng.random(n) < p["p"]

    if not p["rotate"]:
        k[:] = 0
    if not p["flip"]:
        flip_h[:] = False
        flip_v[:] = False
    if not p["rotate_any"]:
        angle[:] = 0.0
    hed_applied &= augmented
    color_applied &= augmented
    if not p["hed"]:
        hed_applied[:] = False
    alpha[~hed_applied] = 1.0
    beta[~hed_applied] = 0.0
    stain_rotation[~hed_applied] = 0.0
    if not p["color"]:
        color_applied[:] = False
    a[~color_applied] = 1.0
    b[~color_applied] = 0.0
    stats = p["stain_stats"]
    stats_applied = augmented & (stats is not None)
    target_mean, target_std = (np.zeros((n, 3)), np.zeros((n, 3))) if stats is None else \
        draw_target_statistics(stats, z_mean, z_std)
    target_mean[~stats_applied] = 0.0
    target_std[~stats_applied] = 0.0
    return AugmentDraws(k=k, flip_h=flip_h, flip_v=flip_v, angle=angle, hed_applied=hed_applied,
                        alpha=alpha, beta=beta, color_applied=color_applied, a=a, b=b,
                        stain_rotation=stain_rotation, augmented=augmented, stats_applied=stats_applied,
                        target_mean=target_mean, target_std=target_std)


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
    last_draws : AugmentDraws or None
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
        self.last_draws: AugmentDraws | None = None
        self._scratch = Scratch()
        stats = validated["stain_stats"]
        self._transfer = None if stats is None else StainStatisticsTransfer(
            stats["space"], validated["max_value"], validated["channel_order"], stats["white_threshold"],
            stats["min_tissue"])

    def __repr__(self) -> str:
        defaults = AUGMENT_SCHEMA.defaults()
        changed = {key: value for key, value in self.params.items() if value != defaults[key]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

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
        check_batch(images, labels, need_rgb=self._needs_rgb)
        images_out = np.empty(images.shape, np.float32)
        labels_out = None if labels is None else np.empty_like(labels, order="C")
        self.augment_into(images, labels, images_out, labels_out, draws=draws)
        return images_out, labels_out

    @property
    def _needs_rgb(self) -> bool:
        """Whether a step mixes the channels as colours (hed, stain_stats): 3-channel images only."""
        return bool(self.params["hed"]) or self._transfer is not None

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
            The parameters used (also stored in :attr:`last_draws`).
        """
        p = self.params
        check_batch(images, labels, need_rgb=self._needs_rgb)
        check_output("images_out", images_out, images.shape)
        if not np.issubdtype(images_out.dtype, np.floating):
            raise ValueError(f"images_out must have a floating dtype, got {images_out.dtype}")
        if (labels is None) != (labels_out is None):
            raise ValueError("labels and labels_out must be given together")
        if labels is not None:
            check_output("labels_out", labels_out, labels.shape)

        n, channels, height, width = images.shape
        mixes_values = p["rotate_any"] or p["hed"] or p["color"] or self._transfer is not None
        if mixes_values and images.dtype.kind == "f" and images.size \
                and not (np.isfinite(images.min()) and np.isfinite(images.max())):
            # Interpolation, stain mixing and a*x+b would blend a NaN or inf into other values;
            # flips and turns only move it. Two reductions, no temporary: NaN propagates
            # through min/max, inf is caught directly.
            bad = int(np.flatnonzero(~np.isfinite(images).reshape(n, -1).all(axis=1))[0])
            raise ValueError(f"images contain NaN or infinite values (first in sample {bad} of the batch); "
                             "augmenting them would give a non-finite loss")
        if self._transfer is not None and images.size:
            self._check_intensity_range(images)
        if draws is None:
            draws = self.draw(n, (channels, height, width))
        elif len(draws) != n or draws.a.shape[1] != channels:
            raise ValueError(f"draws are for {len(draws)} samples with {draws.a.shape[1]} channels, "
                             f"batch has shape {images.shape}")
        stats_applied = np.zeros(n, bool) if draws.stats_applied is None else np.asarray(draws.stats_applied, bool)
        if stats_applied.any():
            if self._transfer is None:
                raise ValueError("draws ask for the stain-statistics transfer (stats_applied), but this augmenter has "
                                 "no stain_stats")
            for name in ("stats_applied", "target_mean", "target_std"):
                expected = (n,) if name == "stats_applied" else (n, 3)
                if np.shape(getattr(draws, name)) != expected:
                    raise ValueError(f"draws.{name} must have shape {expected}, got {np.shape(getattr(draws, name))}")
        if draws.stain_rotation is not None and np.shape(draws.stain_rotation) != (n, 2):
            raise ValueError(f"draws.stain_rotation must have shape ({n}, 2) (H and E angles per sample), "
                             f"got {np.shape(draws.stain_rotation)}")

        if height != width and np.any(np.asarray(draws.k) % 2):
            raise ValueError(f"odd quarter turns (k={np.asarray(draws.k).tolist()}) would change the shape of "
                             f"non-square {height}×{width} patches; only k=0 or 2 is possible")
        self.last_draws = draws

        hed = StainAffine(p["max_value"], p["channel_order"], (height, width)) if draws.hed_applied.any() else None
        color = bool(p["color"])
        scratch = self._scratch
        image_mode = plane_mode(images, images_out)
        label_mode = None if labels is None else plane_mode(labels, labels_out)
        clip = color and bool(p["clip"])
        if color:
            factors = draws.a.astype(np.float32)
            offsets = draws.b.astype(np.float32)

        def colour(i: int, target: np.ndarray, c: int | slice) -> None:
            """``x*a + b`` (if drawn) and clipping, in place on plane(s) ``c`` of sample ``i``."""
            if draws.color_applied[i]:
                if target.ndim == 3:
                    for channel in range(target.shape[0]):
                        scale_shift_in_place(target[channel], factors[i, channel], offsets[i, channel])
                else:
                    scale_shift_in_place(target, factors[i, c], offsets[i, c])
            if clip:  # also when the colour change was not drawn (a=1, b=0)
                clip_in_place(target, p["clip_min"], p["clip_max"])

        left_alone = 0  # samples with too little tissue for the stain-statistics transfer
        for i in range(n):
            element = dihedral_element(draws.k[i], draws.flip_h[i], draws.flip_v[i])
            angle = float(draws.angle[i])
            target = images_out[i]
            hed_here = hed is not None and bool(draws.hed_applied[i])
            stats_here = bool(stats_applied[i])
            # Geometry straight into the output, one OpenCV call per plane, and the colour change
            # in place on that plane while it is in cache (256×256 float32 = 256 KiB: L2; per
            # plane was measured ~10 % faster than per sample). An arbitrary rotation reads the
            # turned sample from scratch; the stain statistics and jitter mix channels, so after
            # any of them the colour change runs on the whole sample.
            if angle:
                rotated = scratch("rotate_any source", target.shape, target.dtype)
                dihedral_planes("general", element, images[i], rotated, scratch)
                matrix, offset = rotation_about_centre(angle, height, width)
                for c in range(channels):
                    ndimage.affine_transform(rotated[c], matrix, offset, output=target[c], order=1, mode="reflect")
            elif color and not hed_here and not stats_here:
                for c in range(channels):
                    dihedral_planes(image_mode, element, images[i, c], target[c], scratch)
                    colour(i, target[c], c)
            else:
                dihedral_planes(image_mode, element, images[i], target, scratch)
            if stats_here and not self._transfer(target, target, draws.target_mean[i], draws.target_std[i]):
                left_alone += 1
            if hed_here:
                hed(target, target, draws.alpha[i], draws.beta[i],
                    None if draws.stain_rotation is None else draws.stain_rotation[i])
            if color and (angle or hed_here or stats_here):
                colour(i, target, slice(None))

            if labels is not None:
                label = label_plane(labels[i])
                label_target = label_plane(labels_out[i])
                if angle:
                    # Same dtype as the input labels: rotate_label_into picks its method by it.
                    rotated_label = scratch("rotate_any label", label.shape, label.dtype)
                    apply_dihedral(element, label, rotated_label, scratch)
                    rotate_label_into(rotated_label, label_target, matrix, offset)
                else:
                    dihedral_planes(label_mode, element, label, label_target, scratch)
        if left_alone:
            # One constant text, so the default warning filter says it once, not every batch.
            warnings.warn(f"stain_stats: samples with less than {100 * self._transfer.min_tissue:g} % tissue "
                          "(min_tissue) are left unchanged by the stain-statistics transfer", NoTissueWarning,
                          stacklevel=2)
        return draws

    def _check_intensity_range(self, images: np.ndarray) -> None:
        """The statistics transfer reads intensities with white at ``max_value``: refuse others."""
        low, high, white = float(images.min()), float(images.max()), self.params["max_value"]
        if low < 0 or high > white:
            raise ValueError(f"stain_stats needs intensities in [0, max_value={white:g}] (white at max_value); the "
                             f"batch holds values in [{low:g}, {high:g}] (scaled or centred data? set max_value to "
                             "the data's white and put the layer before any mean subtraction)")
