"""How far apart are two groups of H&E images in colour? Ranges for the augmentation layer.

:func:`suggest_color_params` turns per-channel tissue mean ratios between train and test
images into the layer's ``color_a_min``/``color_a_max``; :func:`suggest_hed_params` turns
haematoxylin and eosin concentration ratios into its ``hed_alpha``;
:func:`suggest_stain_angle` turns the angles between the groups' stain vectors (Macenko-fitted
on the tissue of each group) into its hue jitter ``stain_angle``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..image_io import check_rgb
from ..param_str import format_param_str
from .colours import sample_pixels
from .normalizers import MacenkoNormalizer
from .optical_density import stain_concentrations
from .tissue import check_mask, masked_channel_means, resolve_masks, tissue_mask

__all__ = ["ColorRangeEstimate", "HedRangeEstimate", "StainAngleEstimate", "channel_mean_ratios",
           "group_stain_vectors", "stain_concentration_means", "suggest_color_params", "suggest_hed_params",
           "suggest_stain_angle"]


def _ratios_from_means(image_means, reference_means, reference_name):
    zero = np.flatnonzero(reference_means == 0)
    if zero.size:
        raise ValueError(
            f"{reference_name} has zero mean in channel {int(zero[0])} "
            "(channels are 0=R, 1=G, 2=B); the ratio is undefined"
        )
    return image_means / reference_means


def channel_mean_ratios(
    image, reference, mask=None, reference_mask=None, ignore_white=False, white_threshold=200
):
    """Per-channel ratio of the mean of ``image`` to the mean of ``reference``.

    Parameters
    ----------
    image, reference : ndarray, shape (H, W, 3) / (H2, W2, 3)
        RGB images (any dtype accepted by :func:`tissue_mask`).
    mask, reference_mask : ndarray of bool, optional
        Pixels to average over; default every pixel.
    ignore_white : bool, optional
        Average over :func:`tissue_mask` pixels for missing masks.
    white_threshold : float, optional
        Threshold for ``ignore_white``.

    Returns
    -------
    ratios : ndarray, shape (3,), float64
        ``mean(image[..., c]) / mean(reference[..., c])``.

    Raises
    ------
    ValueError
        If a mask is empty or a reference channel mean is zero.
    """
    image = check_rgb(image, "image")
    reference = check_rgb(reference, "reference")
    mask, reference_mask = resolve_masks(
        image, reference, mask, reference_mask, ignore_white, white_threshold
    )
    return _ratios_from_means(
        masked_channel_means(image, mask, "image"),
        masked_channel_means(reference, reference_mask, "reference"),
        "reference",
    )


@dataclass(frozen=True)
class ColorRangeEstimate:
    """Result of :func:`suggest_color_params`.

    Attributes
    ----------
    params : dict
        ``{"color": True, "color_a_min": ..., "color_a_max": ...}`` (plus
        ``color_b_min``/``color_b_max`` when offsets were requested).
    ratios : dict[str, ndarray of shape (3,)]
        Per-image channel-mean ratios, keyed ``"test:<name>"`` (test image vs
        mean train statistics) and ``"train:<name>"`` (train image vs the mean
        of the other train images).
    param_str : str
        ``format_param_str(params)``, ready to paste into a params field.
    offsets : dict[str, ndarray of shape (3,)]
        Per-image channel-mean differences (image - reference) in the images'
        intensity units (grey levels for uint8), the units of the layer's
        ``color_b_*``; empty unless ``include_offset``.
    """

    params: dict
    ratios: dict
    param_str: str
    offsets: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HedRangeEstimate:
    """Result of :func:`suggest_hed_params`.

    Attributes
    ----------
    params : dict
        ``{"hed": True, "hed_alpha": ...}``.
    ratios : dict[str, ndarray of shape (3,)]
        Per-image (H, E, DAB) tissue concentration ratios, keyed like
        :attr:`ColorRangeEstimate.ratios`.
    param_str : str
        ``format_param_str(params)``.
    """

    params: dict
    ratios: dict
    param_str: str


def _named_images(images, group):
    if isinstance(images, Mapping):
        items = [(str(name), image) for name, image in images.items()]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = [(str(index), image) for index, image in enumerate(images)]
    else:
        raise ValueError(
            f"{group}_images must be a sequence or a dict of RGB images; got {type(images).__name__}"
        )
    if not items:
        raise ValueError(f"{group}_images is empty; give at least one image")
    return items


def _check_percentiles(percentiles):
    """None, or ``(lo, hi)`` as floats with ``0 <= lo < hi <= 100``."""
    if percentiles is None:
        return None
    try:
        low, high = (float(value) for value in percentiles)
    except (TypeError, ValueError):
        raise ValueError(f"percentiles must be None or two numbers (lo, hi); got {percentiles!r}") from None
    if not 0 <= low < high <= 100:  # NaN fails too
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100; got {percentiles!r}")
    return low, high


def _covered(values, percentiles):
    """``(low, high)`` of ``values``: their extremes, or the given percentiles of them."""
    values = np.asarray(values, np.float64).ravel()
    if percentiles is None:
        return float(values.min()), float(values.max())
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def _shift_table(train_stats, test_stats):
    """Ratios and differences of per-image statistics: each test image against the mean of
    the train images and, with two or more, each train image against the mean of the others
    (the in-domain spread). ``*_stats`` are lists of ``(name, (3,) means)``."""
    train_mean = np.mean([means for _, means in train_stats], axis=0)
    ratios, offsets = {}, {}
    for name, means in test_stats:
        ratios[f"test:{name}"] = _ratios_from_means(means, train_mean, "mean of the train images")
        offsets[f"test:{name}"] = means - train_mean
    if len(train_stats) >= 2:
        for index, (name, means) in enumerate(train_stats):
            others = np.mean([m for other, (_, m) in enumerate(train_stats) if other != index], axis=0)
            ratios[f"train:{name}"] = _ratios_from_means(
                means, others, f"mean of the train images other than {name!r}")
            offsets[f"train:{name}"] = means - others
    return ratios, offsets


def suggest_color_params(
    train_images,
    test_images,
    margin=0.1,
    ignore_white=True,
    include_offset=False,
    white_threshold=200,
    percentiles=None,
):
    """Suggest a multiplicative colour-augmentation range covering a stain shift.

    The tissue mean of each channel is computed per image. Each test image is
    compared with the mean of the train images' means, and (with two or more
    train images) each train image with the mean of the other train images, to
    include the in-domain spread. Augmentation must reach the shift in both
    directions, so every ratio ``r`` contributes ``r`` and ``1/r``; the range
    ``[min, max]`` over images and channels (or, with ``percentiles=(lo, hi)``,
    from the ``lo``-th to the ``hi``-th percentile of those values) is widened by
    ``margin`` (``low*(1-margin)``, ``high*(1+margin)``) and rounded outwards to 2 decimals.

    Parameters
    ----------
    train_images, test_images : sequence or dict of ndarray, shape (H, W, 3)
        RGB images (a dict gives them names for the ratio table).
    margin : float, optional
        Relative widening of the range, >= 0.
    ignore_white : bool, optional
        Use tissue pixels only (recommended: background brightness is not stain).
    include_offset : bool, optional
        Also suggest an additive ``color_b_min``/``color_b_max`` covering
        ``+-max |mean difference|`` in the images' intensity units (grey levels
        for uint8, as the layer's ``color_b_*`` for 0-255 input), widened by ``margin``.
    white_threshold : float, optional
        Threshold for ``ignore_white`` (image units).
    percentiles : (float, float), optional
        Cover the ``lo``-th to ``hi``-th percentile of the observed ratios (and of the
        ``|offsets|`` up to the ``hi``-th) instead of their extremes, e.g. ``(5, 95)``: a
        range spent on the shifts labs produce rather than on the rarest one. None (default):
        the extremes.

    Returns
    -------
    estimate : ColorRangeEstimate
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0; got {margin!r}")
    if margin > 10:
        raise ValueError(f"margin must be at most 10 (a 1000 % widening); got {margin!r}")
    percentiles = _check_percentiles(percentiles)
    train = _named_images(train_images, "train")
    test = _named_images(test_images, "test")

    def tissue_means(group, name, image):
        image = check_rgb(image, f"{group} image {name!r}")
        mask = tissue_mask(image, white_threshold) if ignore_white else None
        means = masked_channel_means(image, mask, f"{group} image {name!r}")
        if (means <= 0).any():
            # A ratio of 0 would ask for an infinite contrast factor (1/0).
            channel = "RGB"[int(np.flatnonzero(means <= 0)[0])]
            raise ValueError(f"{group} image {name!r} has zero mean in channel {channel} (a black image?); "
                             "its colour ratio is undefined")
        return means

    ratios, offsets = _shift_table(
        [(name, tissue_means("train", name, image)) for name, image in train],
        [(name, tissue_means("test", name, image)) for name, image in test],
    )

    all_ratios = np.concatenate(list(ratios.values()))
    both_directions = np.concatenate([all_ratios, 1.0 / all_ratios])
    low, high = _covered(both_directions, percentiles)
    low *= 1.0 - margin
    high *= 1.0 + margin
    params = {
        "color": True,
        # Round outwards so the rounded range still covers the observed shift.
        "color_a_min": max(math.floor(low * 100) / 100, 0.0),
        "color_a_max": math.ceil(high * 100) / 100,
    }
    if include_offset:
        largest = _covered(np.abs(np.concatenate(list(offsets.values()))), percentiles)[1] * (1.0 + margin)
        largest = math.ceil(largest * 10) / 10
        params["color_b_min"] = -largest
        params["color_b_max"] = largest
    return ColorRangeEstimate(
        params=params,
        ratios=ratios,
        param_str=format_param_str(params),
        offsets=offsets if include_offset else {},
    )


def stain_concentration_means(rgb, mask=None, ignore_white=True, white_threshold=200, max_value=255.0):
    """Mean haematoxylin, eosin and DAB concentration of an RGB image's tissue.

    Concentrations are :func:`~caffe_layers.stain.optical_density.stain_concentrations`: the
    stain space and optical-density convention of the augmentation layer's ``hed`` jitter, so
    ratios of these means are directly its ``alpha``.

    Returns
    -------
    ndarray, shape (3,), float64
    """
    rgb = check_rgb(rgb, "image")
    if mask is not None:
        mask = check_mask(mask, rgb, "mask")
    elif ignore_white:
        mask = tissue_mask(rgb, white_threshold)
    return masked_channel_means(stain_concentrations(rgb, max_value), mask, "image")


#: Mean haematoxylin and eosin concentrations (optical density units) at or below which an image
#: counts as unstained in :func:`suggest_hed_params` (white glass: ~0; H&E tissue: ~0.2-1).
MIN_STAIN_CONCENTRATION = 0.01


def suggest_hed_params(train_images, test_images, margin=0.1, ignore_white=True, white_threshold=200,
                       max_value=255.0, percentiles=None):
    """Suggest the augmentation layer's stain-space jitter range covering a stain shift.

    Compares the tissue's mean haematoxylin and eosin concentrations
    (:func:`stain_concentration_means`) of each test image with the mean of the train images
    (and train images among themselves). The jitter draws ``alpha ~ U[1 - hed_alpha,
    1 + hed_alpha]``, so ``hed_alpha`` is the largest ``|1 - ratio|`` over images and the two
    stains (with ``percentiles=(lo, hi)``: its ``hi``-th percentile), widened by ``margin`` and
    kept below 1 (a stain cannot be scaled to nothing).

    Returns
    -------
    HedRangeEstimate
        ``params`` = ``{"hed": True, "hed_alpha": ...}``; ``ratios`` per image hold the
        (H, E, DAB) concentration ratios.

    Raises
    ------
    ValueError
        If an image's mean haematoxylin or eosin concentration is at most
        :data:`MIN_STAIN_CONCENTRATION` (blank glass, a grey image), naming it.
    """
    percentiles = _check_percentiles(percentiles)
    train = _named_images(train_images, "train")
    test = _named_images(test_images, "test")

    def means(group, name, image):
        values = stain_concentration_means(image, ignore_white=ignore_white,
                                           white_threshold=white_threshold, max_value=max_value)
        for index, stain in enumerate(("haematoxylin", "eosin")):
            # Blank glass, or grey pixels, have (nearly) no stain: a ratio to that is noise.
            if not values[index] > MIN_STAIN_CONCENTRATION:
                raise ValueError(f"{group} image {name!r} has (almost) no {stain}: mean concentration "
                                 f"{values[index]:.3g} <= {MIN_STAIN_CONCENTRATION:g} over its "
                                 f"{'tissue' if ignore_white else 'pixels'} (a blank or grey image?); its "
                                 "stain ratio is undefined")
        return values

    ratios, _ = _shift_table([(name, means("train", name, image)) for name, image in train],
                             [(name, means("test", name, image)) for name, image in test])
    # DAB is (nearly) absent from H&E: its ratio is noise, so only H and E set the range.
    shifts = np.concatenate([np.abs(1.0 - r[:2]) for r in ratios.values()])
    largest = _covered(shifts, percentiles)[1] * (1.0 + margin)
    params = {"hed": True, "hed_alpha": min(math.ceil(largest * 100) / 100, 0.95)}
    return HedRangeEstimate(params=params, ratios=ratios, param_str=format_param_str(params))


@dataclass(frozen=True)
class StainAngleEstimate:
    """Result of :func:`suggest_stain_angle`.

    Attributes
    ----------
    params : dict
        ``{"stain_angle": ...}`` (degrees; use with ``hed: true``).
    angles : dict[str, ndarray of shape (2,)]
        Angles in degrees between haematoxylin vectors and between eosin vectors: ``"test"``
        (the test group's against the train group's), ``"test:<name>"`` (each test image's
        against the train group's) and, with two or more train images, ``"train:<name>"``
        (each train image's against the other train images').
    train_vectors, test_vectors : ndarray, shape (2, 3)
        The groups' unit stain vectors (rows H, E; Beer-Lambert optical density).
    param_str : str
    """

    params: dict
    angles: dict
    train_vectors: np.ndarray
    test_vectors: np.ndarray
    param_str: str


def _stain_angles(first, second):
    cosines = np.clip(np.sum(first * second, axis=1), -1.0, 1.0)
    return np.degrees(np.arccos(cosines))


def group_stain_vectors(images, name="images", sample_size=100_000, seed=0):
    """Macenko stain vectors (rows H, E) of a group of RGB images, fitted on their pooled tissue.

    Each image contributes all its pixels, or a fixed-seed sample of ``sample_size`` of a larger
    one; :class:`~caffe_layers.stain.normalizers.MacenkoNormalizer` is fitted on them together and
    keeps the tissue (optical density above its ``beta`` in every channel).

    Raises
    ------
    ValueError
        If the pooled tissue does not define two stains (naming ``name``).
    """
    normalizer = MacenkoNormalizer(sample_size=None)
    pooled = []
    for index, image in enumerate(images):
        image = np.ascontiguousarray(check_rgb(image, f"{name}[{index}]", uint8=True))
        pixels, _ = sample_pixels(image, None, sample_size, seed + index)
        pooled.append(pixels)
    strip = np.concatenate(pooled)[None]
    try:
        normalizer.fit(strip)
    except ValueError as error:
        raise ValueError(f"{name}: cannot fit stain vectors: {str(error).replace('template', 'the tissue')}") from None
    return normalizer.stain_matrix_


def suggest_stain_angle(train_images, test_images, margin=0.1, max_angle=30.0):
    """Suggest the augmentation layer's hue jitter ``stain_angle`` covering a stain-vector shift.

    Macenko stain vectors are fitted on the pooled tissue of the train images and of the test
    images (:func:`group_stain_vectors`); the hue jitter turns each of the H and E vectors by
    up to ``stain_angle`` degrees, so ``stain_angle`` is the larger of the angles between the
    groups' H vectors and between their E vectors, widened by ``margin``, rounded up to a tenth
    of a degree and capped at ``max_angle`` (the schema's maximum). The angles are 3-D angles
    between the fitted directions; the jitter turns the vectors within the H-E plane, so it
    reaches the measured angle, though not every direction of it.

    Returns
    -------
    StainAngleEstimate
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and 0 <= margin <= 10):
        raise ValueError(f"margin must be a number in [0, 10]; got {margin!r}")
    train = _named_images(train_images, "train")
    test = _named_images(test_images, "test")
    train_vectors = group_stain_vectors([image for _, image in train], "train images")
    test_vectors = group_stain_vectors([image for _, image in test], "test images")
    angles = {"test": _stain_angles(test_vectors, train_vectors)}
    for name, image in test:
        try:
            angles[f"test:{name}"] = _stain_angles(group_stain_vectors([image], f"test image {name!r}"),
                                                   train_vectors)
        except ValueError:
            angles[f"test:{name}"] = np.full(2, np.nan)  # too little tissue on its own: the group decides
    if len(train) >= 2:
        for index, (name, image) in enumerate(train):
            others = [other for position, (_, other) in enumerate(train) if position != index]
            try:
                angles[f"train:{name}"] = _stain_angles(
                    group_stain_vectors([image], f"train image {name!r}"),
                    group_stain_vectors(others, f"train images other than {name!r}"))
            except ValueError:
                angles[f"train:{name}"] = np.full(2, np.nan)
    largest = float(max(np.nanmax(values) for values in angles.values() if np.isfinite(values).any()))
    suggested = min(math.ceil(largest * (1.0 + margin) * 10 - 1e-9) / 10, float(max_angle))
    params = {"stain_angle": suggested}
    return StainAngleEstimate(params=params, angles=angles, train_vectors=train_vectors,
                              test_vectors=test_vectors, param_str=format_param_str(params))
