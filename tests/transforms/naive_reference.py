"""A plain per-image reference implementation of :class:`~caffe_layers.transforms.BatchAugmenter`.

Deliberately simple and slow: the test oracle and the benchmark baseline of the fast batch path
(``scripts/benchmark_augmentation.py``). A test helper, not part of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from caffe_layers.stain.optical_density import RGB_FROM_HED, intensity, stain_concentrations
from caffe_layers.transforms.batch import AugmentDraws, draw_augmentation
from caffe_layers.transforms.functional import NDIMAGE_LABEL_DTYPES, check_batch, label_plane
from caffe_layers.transforms.schema import AUGMENT_SCHEMA

__all__ = ["naive_augment"]


def _turned_stain_vectors(draws: AugmentDraws, i: int) -> np.ndarray:
    """Stain OD vectors (rows H, E, DAB) of sample ``i``: H and E each turned by its own angle
    about the normal of the plane they span, the slow explicit way."""
    vectors = RGB_FROM_HED.astype(np.float64).copy()
    if draws.stain_rotation is None:
        return vectors
    normal = np.cross(vectors[0], vectors[1])
    normal /= np.linalg.norm(normal)
    for stain in (0, 1):
        turn = Rotation.from_rotvec(np.deg2rad(draws.stain_rotation[i, stain]) * normal)
        vectors[stain] = turn.apply(vectors[stain])
    return vectors


def naive_augment(images: np.ndarray, labels: np.ndarray | None, params: Mapping[str, Any] | None,
                  rng: np.random.Generator | None = None,
                  draws: AugmentDraws | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Plain per-image reference implementation of :class:`BatchAugmenter`.

    Deliberately simple (copies at every step, ``ndimage.rotate``, explicit RGB -> stain ->
    RGB round trip in float64, with the hue jitter's stain vectors turned one by one by scipy's
    :class:`~scipy.spatial.transform.Rotation` about the normal of their plane): a test oracle
    and the baseline of the benchmark. Given the
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
    if p["stain_stats"] is not None:
        raise ValueError("naive_augment has no stain_stats step; its tests compare with the statistics themselves")
    images = np.asarray(images)
    check_batch(images, labels, need_rgb=bool(p["hed"]))
    n, channels, height, width = images.shape
    if draws is None:
        if rng is None:
            raise ValueError("naive_augment needs either rng or draws")
        draws = draw_augmentation(n, (channels, height, width), rng, p)

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
                label_2d = label_plane(label)
                work_dtype = label_2d.dtype if label_2d.dtype in NDIMAGE_LABEL_DTYPES else np.float64
                rotated = ndimage.rotate(label_2d.astype(work_dtype), draws.angle[i], reshape=False,
                                         order=0, mode="reflect").astype(label.dtype)
                label = rotated.reshape(label.shape)
        if draws.hed_applied[i]:
            white = p["max_value"]
            rgb = image[::-1] if p["channel_order"] == "BGR" else image
            stains = stain_concentrations(rgb.reshape(3, -1).T, white, dtype=np.float64)
            stains = stains * draws.alpha[i] + draws.beta[i]
            pixels = intensity(stains @ _turned_stain_vectors(draws, i), white)
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
