"""How far apart are two groups of H&E images in colour? Ranges for the augmentation layer.

:func:`suggest_color_params` turns per-channel tissue mean ratios between train and test
images into the layer's ``color_a_min``/``color_a_max``; :func:`suggest_hed_params` turns
haematoxylin and eosin concentration ratios into its ``hed_alpha``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..image_io import check_rgb
from ..params import format_param_str
from .optical_density import stain_concentrations
from .tissue import check_mask, masked_channel_means, resolve_masks, tissue_mask

__all__ = ["ColorRangeEstimate", "HedRangeEstimate", "channel_mean_ratios", "stain_concentration_means",
           "suggest_color_params", "suggest_hed_params"]


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
):
    """Suggest a multiplicative colour-augmentation range covering a stain shift.

    The tissue mean of each channel is computed per image. Each test image is
    compared with the mean of the train images' means, and (with two or more
    train images) each train image with the mean of the other train images, to
    include the in-domain spread. Augmentation must reach the shift in both
    directions, so every ratio ``r`` contributes ``r`` and ``1/r``; the range
    ``[min, max]`` over images and channels is widened by ``margin``
    (``min*(1-margin)``, ``max*(1+margin)``) and rounded outwards to 2 decimals.

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

    Returns
    -------
    estimate : ColorRangeEstimate
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0; got {margin!r}")
    if margin > 10:
        raise ValueError(f"margin must be at most 10 (a 1000 % widening); got {margin!r}")
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
    low = both_directions.min() * (1.0 - margin)
    high = both_directions.max() * (1.0 + margin)
    params = {
        "color": True,
        # Round outwards so the rounded range still covers the observed shift.
        "color_a_min": max(math.floor(low * 100) / 100, 0.0),
        "color_a_max": math.ceil(high * 100) / 100,
    }
    if include_offset:
        largest = np.abs(np.concatenate(list(offsets.values()))).max() * (1.0 + margin)
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


def suggest_hed_params(train_images, test_images, margin=0.1, ignore_white=True, white_threshold=200,
                       max_value=255.0):
    """Suggest the augmentation layer's stain-space jitter range covering a stain shift.

    Compares the tissue's mean haematoxylin and eosin concentrations
    (:func:`stain_concentration_means`) of each test image with the mean of the train images
    (and train images among themselves). The jitter draws ``alpha ~ U[1 - hed_alpha,
    1 + hed_alpha]``, so ``hed_alpha`` is the largest ``|1 - ratio|`` over images and the two
    stains, widened by ``margin`` and kept below 1 (a stain cannot be scaled to nothing).

    Returns
    -------
    HedRangeEstimate
        ``params`` = ``{"hed": True, "hed_alpha": ...}``; ``ratios`` per image hold the
        (H, E, DAB) concentration ratios.
    """
    train = _named_images(train_images, "train")
    test = _named_images(test_images, "test")

    def means(name, image):
        return stain_concentration_means(image, ignore_white=ignore_white,
                                         white_threshold=white_threshold, max_value=max_value)

    ratios, _ = _shift_table([(name, means(name, image)) for name, image in train],
                             [(name, means(name, image)) for name, image in test])
    # DAB is (nearly) absent from H&E: its ratio is noise, so only H and E set the range.
    largest = max(float(np.abs(1.0 - r[:2]).max()) for r in ratios.values()) * (1.0 + margin)
    params = {"hed": True, "hed_alpha": min(math.ceil(largest * 100) / 100, 0.95)}
    return HedRangeEstimate(params=params, ratios=ratios, param_str=format_param_str(params))
