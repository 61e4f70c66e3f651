"""Stain statistics: per-image tissue colour statistics, their spread over images, and the
transfer that gives a sample statistics drawn from that spread (RandStainNA, Shen et al. 2022).

An image's *statistics* are the mean and the standard deviation of each channel of a colour
space over its tissue pixels (:func:`~caffe_layers.stain.tissue.tissue_mask`: white glass is
ignored). Two spaces are offered:

* ``"lab"`` -- CIE L*a*b* (D65) as OpenCV computes it from float RGB in [0, 1] (sRGB
  gamma): L* in [0, 100], a* and b* about [-128, 128]; the space of
  :class:`~caffe_layers.stain.normalizers.ReinhardNormalizer`;
* ``"hed"`` -- haematoxylin, eosin and DAB concentrations in the optical-density convention of
  the layer's ``hed`` jitter (:func:`~caffe_layers.stain.optical_density.stain_concentrations`)
  of the image as 8-bit intensities (``x * 255 / max_value``), so that statistics fitted on
  8-bit files hold for data scaled to 0-1.

:func:`fit_stain_statistics` measures them on a set of images and summarises them per channel
by the mean and the standard deviation, over images, of the image means and of the image stds.
That summary -- the ``stain_stats`` value of the augmentation layer -- is a small dict::

    {"space": "lab",
     "mean": [[mu, sd], [mu, sd], [mu, sd]],   # per channel: mean and std of the image means
     "std":  [[mu, sd], [mu, sd], [mu, sd]],   # per channel: mean and std of the image stds
     "spread": 1.0,                            # multiplies both sd columns when drawing
     "white_threshold": 200.0,                 # tissue: grey level <= this (white = 255)
     "min_tissue": 0.05}                       # samples with less tissue are left unchanged

checked by :func:`check_stain_stats`. Per sample the augmentation draws target statistics
(:func:`draw_target_statistics`: normal, ``sd * spread`` wide) and moves the sample's own tissue
statistics to them (:class:`StainStatisticsTransfer`, Reinhard's per-channel
``(x - mean) / std * target_std + target_mean``). Glass stays glass: pixels brighter than the
threshold by more than :data:`BLEND_RAMP` grey levels are left bit-identical, and the ramp
between blends the transferred and the original colour, so no edge appears at the threshold.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from ..image_io import check_rgb
from ..param_str import ParamError, _short_repr
from ..schema import Param, Schema
from .optical_density import HED_FROM_RGB, stain_transform
from .tissue import NoTissueWarning, check_white_threshold, tissue_mask

__all__ = ["BLEND_RAMP", "MAX_SCALE", "SPREAD_MAX", "STAIN_SPACES", "STAIN_STATS_SCHEMA", "STD_FLOOR",
           "StainStatisticsTransfer", "check_stain_stats", "draw_target_statistics", "fit_stain_statistics",
           "tissue_statistics"]

#: The colour spaces of the statistics, and their channel names.
STAIN_SPACES = {"lab": ("L*", "a*", "b*"), "hed": ("H", "E", "DAB")}
#: Largest ``spread`` (10 standard deviations of the fitted distribution: far beyond any lab).
SPREAD_MAX = 10.0
#: Width, in grey levels of 0-255 images, of the ramp above ``white_threshold`` over which the
#: transferred colour fades into the original one (glass beyond it is left as it is).
BLEND_RAMP = 20.0
#: A channel is rescaled by at most this factor (or 1 / this): a nearly flat patch would
#: otherwise have its noise blown up into colours no lab produces.
MAX_SCALE = 10.0
#: Drawn target stds are at least this fraction of the fitted mean std (a normal draw can reach 0).
STD_FLOOR = 0.1
#: Std (in the space's units) below which a sample's channel counts as flat and is only shifted,
#: not rescaled: for LAB :attr:`ReinhardNormalizer.FLAT_LAB_STD` (float LAB conversion noise of
#: grey pixels); for HED a hundredth of one 8-bit grey step's optical density at mid grey.
FLAT_STD = {"lab": 0.25, "hed": 1e-4}
#: Largest magnitude of a fitted mean or std per space (L* <= 100, |a*|, |b*| <= 128; the HED
#: concentrations of 8-bit images stay well inside +-20).
_VALUE_LIMIT = {"lab": 128.0, "hed": 20.0}


def _space_param(default="lab"):
    return Param("space", "str", default, choices=tuple(STAIN_SPACES),
                 doc="colour space of the statistics: lab (CIE L*a*b*, OpenCV float) or hed (stain concentrations)")


_SPREAD = Param("spread", "float", 1.0, min=0.0, max=SPREAD_MAX,
                doc="multiplies the sd of both columns when drawing (0: every sample gets the mean statistics)")
_WHITE_THRESHOLD = Param("white_threshold", "float", 200.0, min=0.0, max=255.0,
                         doc="tissue = mean of R, G, B <= this, in grey levels of white 255 (scaled by max_value/255)")
_MIN_TISSUE = Param("min_tissue", "float", 0.05, min=0.0, max=1.0,
                    doc="images (fit) and samples (layer) with a smaller tissue fraction are skipped / left unchanged")


class _StainStatsSchema(Schema):
    """The ``stain_stats`` dict: its pairs of numbers are checked by :func:`check_stain_stats`."""

    def validate(self, raw, where="param_str", _prefix=""):
        return check_stain_stats(raw, where, _prefix.rstrip(".") or "stain_stats")

    def _rows(self, prefix=""):
        rows = super()._rows(prefix)
        # The pairs are lists of [mu, sd] lists, not the flat number lists "floats" declares.
        return [(name, "3 [mu, sd] pairs", *rest) if name.endswith(("mean", "std")) else (name, kind, *rest)
                for name, kind, *rest in rows]


STAIN_STATS_SCHEMA = _StainStatsSchema(
    [
        _space_param(),
        Param("mean", "floats", doc="per channel [mu, sd]: mean and std over images of the image's tissue mean"),
        Param("std", "floats", doc="per channel [mu, sd]: mean and std over images of the image's tissue std (mu > 0)"),
        _SPREAD,
        _WHITE_THRESHOLD,
        _MIN_TISSUE,
    ],
    name="stain_stats",
)
"""Keys of the ``stain_stats`` dict (:func:`check_stain_stats` validates it)."""


def _pairs(raw, name, where, key, space):
    """The ``mean`` or ``std`` entry: three ``[mu, sd]`` pairs of finite numbers, as tuples."""
    dotted = f"{key}.{name}"
    value = raw[name]
    shape_hint = "expected 3 [mu, sd] pairs, one per channel " + "/".join(STAIN_SPACES[space])
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ParamError(f"invalid value for {dotted!r} in {where}: {dotted}={_short_repr(value)}; {shape_hint}",
                         where=where, key=dotted, value=value)
    limit = _VALUE_LIMIT[space]
    pairs = []
    for channel, pair in enumerate(value):
        item = f"{dotted}[{channel}]"
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ParamError(f"invalid value for {item!r} in {where}: {item}={_short_repr(pair)}; {shape_hint}",
                             where=where, key=item, value=pair)
        low = 0.0 if name == "std" else -limit
        mu = Param("mu", "float", min=low, max=limit, min_inclusive=name != "std").check(pair[0], where, f"{item}[0]")
        sd = Param("sd", "float", min=0.0, max=limit).check(pair[1], where, f"{item}[1]")
        pairs.append((mu, sd))
    return tuple(pairs)


def check_stain_stats(value: Any, where: str = "stain_stats", key: str = "stain_stats") -> dict:
    """Validate a ``stain_stats`` dict and return it with every key filled in.

    Parameters
    ----------
    value : mapping
        ``{"space", "mean", "std"[, "spread", "white_threshold", "min_tissue"]}``; see the module
        docstring. ``mean`` and ``std`` are three ``[mu, sd]`` pairs (channels in the order of
        :data:`STAIN_SPACES`); every number finite, ``sd >= 0``, the ``std`` column's ``mu > 0``.
    where : str
        Where the value came from (e.g. ``"AugmentationLayer param_str"``), for messages.
    key : str
        Its dotted key there, for messages.

    Returns
    -------
    dict
        The six keys; ``mean`` and ``std`` as tuples of ``(mu, sd)`` float tuples.

    Raises
    ------
    ParamError
        Naming the dotted key (``stain_stats.std[1][0]``), the value and what is allowed.
    """
    if not isinstance(value, Mapping):
        raise ParamError(f"{key!r} in {where} must be a dict {{space, mean, std, spread}}, got "
                         f"{type(value).__name__} {_short_repr(value)}", where=where, key=key, value=value)
    for name in value:
        if name not in STAIN_STATS_SCHEMA.params:
            STAIN_STATS_SCHEMA._raise_unknown(name, value[name], where, key + ".")
    for name in ("mean", "std"):
        if name not in value:
            raise ParamError(f"missing required key {key + '.' + name!r} in {where}: expected 3 [mu, sd] pairs "
                             "(caffe-stain-estimate --fit-stats writes them)", where=where, key=f"{key}.{name}")
    checked = {"space": _space_param().check(value.get("space", "lab"), where, f"{key}.space")}
    checked["mean"] = _pairs(value, "mean", where, key, checked["space"])
    checked["std"] = _pairs(value, "std", where, key, checked["space"])
    for param in (_SPREAD, _WHITE_THRESHOLD, _MIN_TISSUE):
        checked[param.name] = param.check(value.get(param.name, param.default), where, f"{key}.{param.name}")
    return checked


def draw_target_statistics(stats: Mapping[str, Any], z_mean: np.ndarray, z_std: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Target statistics from standard normal draws.

    ``target_mean = mu + spread * sd * z_mean`` per channel (``mean`` pairs), likewise
    ``target_std`` (``std`` pairs), raised to at least :data:`STD_FLOOR` times its ``mu``.

    Parameters
    ----------
    stats : mapping
        A validated ``stain_stats`` dict (:func:`check_stain_stats`).
    z_mean, z_std : ndarray, shape (N, 3)
        Standard normal numbers.

    Returns
    -------
    target_mean, target_std : ndarray of float64, shape (N, 3)
    """
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    spread = float(stats["spread"])
    target_mean = mean[:, 0] + spread * mean[:, 1] * z_mean
    target_std = np.maximum(std[:, 0] + spread * std[:, 1] * z_std, STD_FLOOR * std[:, 0])
    return target_mean, target_std


class StainStatisticsTransfer:
    """Tissue statistics of C×H×W float samples, and their Reinhard transfer to target statistics.

    Parameters
    ----------
    space : {'lab', 'hed'}
    max_value : float
        Intensity of white in the samples (255 for 0-255 data).
    channel_order : {'RGB', 'BGR'}
    white_threshold : float
        Tissue threshold in grey levels of white 255; scaled by ``max_value / 255``.
    min_tissue : float
        Samples whose tissue fraction is below this are left unchanged by :meth:`__call__`.

    Notes
    -----
    Every step is one SIMD OpenCV pass over the sample, interleaved H×W×3 (``cv2.merge``):

    * grey sum ``R + G + B`` (``cv2.transform``): the tissue mask is ``sum <= 3 t``, the
      definition of :func:`~caffe_layers.stain.tissue.tissue_mask` (whose float path, a numpy
      mean over a strided axis, costs ~40 times more), and the blend weight of the glass ramp;
    * LAB: ``cvtColor`` there, masked ``meanStdDev``, the per-channel affine ``cv2.transform``,
      ``cvtColor`` back;
    * HED: ``cv2.log(1 + x)``, the concentrations by one ``cv2.transform`` (3×3 matrix and
      offset), masked ``meanStdDev``; the transfer ``s' = k s + m`` is an affine map of the
      logs (:func:`~caffe_layers.stain.optical_density.stain_transform`, the algebra of the
      ``hed`` jitter), one ``cv2.transform`` and ``cv2.exp``.

    No BLAS call: a 3×3 ``np.matmul`` goes through multi-threaded BLAS, which on a loaded
    machine was measured 150 times slower than OpenCV's single pass (16 ms against 0.11 ms per
    3×256² sample).
    """

    def __init__(self, space: str, max_value: float = 255.0, channel_order: str = "RGB",
                 white_threshold: float = 200.0, min_tissue: float = 0.05):
        if space not in STAIN_SPACES:
            raise ValueError(f"space must be one of {tuple(STAIN_SPACES)}; got {space!r}")
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR'; got {channel_order!r}")
        if not (math.isfinite(max_value) and max_value > 0):
            raise ValueError(f"max_value must be a finite number > 0; got {max_value!r}")
        self.space = space
        self.max_value = float(max_value)
        self.channel_order = channel_order
        self.white_threshold = check_white_threshold(white_threshold)
        self.min_tissue = float(min_tissue)
        scale = self.max_value / 255.0
        self._grey_limit = np.float32(3 * self.white_threshold * scale)  # R + G + B of the threshold
        self._ramp = 3 * min(BLEND_RAMP, max(255.0 - self.white_threshold, 0.0) / 2) * scale
        self._reverse = channel_order == "BGR"
        # Concentrations s_c = sum_r (ln 256 - L_r) H[r, c], rows r in the sample's channel order, with
        # L = log(1 + x * 255 / M): the 8-bit optical density whatever the data's white, so statistics
        # fitted on 8-bit files hold for data in 0-1 too.
        unmix = HED_FROM_RGB[::-1] if self._reverse else HED_FROM_RGB
        self._unmix = np.hstack([-unmix.T, np.log1p(255.0) * unmix.sum(axis=0)[:, None]])
        self._to_lab = cv2.COLOR_BGR2Lab if self._reverse else cv2.COLOR_RGB2Lab
        self._from_lab = cv2.COLOR_Lab2BGR if self._reverse else cv2.COLOR_Lab2RGB
        self._buffers: dict[tuple, np.ndarray] = {}

    def _buffer(self, use: str, shape: tuple[int, ...]) -> np.ndarray:
        key = (use, tuple(shape))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty(shape, np.float32)
        return buffer

    def _interleaved(self, sample: np.ndarray, clip: bool) -> tuple[np.ndarray, np.ndarray]:
        """The (3, H, W) sample as H×W×3 float32 (``clip``: clipped to [0, max_value]) and its grey sum (H, W)."""
        height, width = sample.shape[1:]
        pixels = self._buffer("pixels", (height, width, 3))
        cv2.merge([np.ascontiguousarray(plane, np.float32) for plane in sample], dst=pixels)
        if clip:
            np.clip(pixels, 0.0, self.max_value, out=pixels)
        grey = cv2.transform(pixels, _GREY_SUM, dst=self._buffer("grey", (height, width)))
        return pixels, grey

    def tissue(self, grey: np.ndarray) -> np.ndarray:
        """Tissue mask (H, W) from the grey sum R + G + B: mean <= threshold, as :func:`tissue_mask`."""
        return grey <= self._grey_limit

    def _channels(self, pixels: np.ndarray) -> np.ndarray:
        """H×W×3 values of the space: LAB, or the log intensities ``log(1 + x)`` for HED."""
        work = self._buffer("work", pixels.shape)
        if self.space == "lab":
            np.multiply(pixels, np.float32(1.0 / self.max_value), out=work)  # OpenCV's float LAB takes [0, 1]
            return cv2.cvtColor(work, self._to_lab, dst=work)
        if self.max_value == 255.0:
            np.add(pixels, np.float32(1.0), out=work)
        else:
            cv2.addWeighted(pixels, 255.0 / self.max_value, pixels, 0.0, 1.0, dst=work)
        return cv2.log(work, dst=work)  # 1 + x is exact enough for x >= 0

    def _statistics(self, channels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means and stds (3,) over ``mask`` of the space's values (:meth:`_channels`)."""
        if self.space == "hed":
            channels = cv2.transform(channels, self._unmix, dst=self._buffer("stains", channels.shape))
        mean, std = cv2.meanStdDev(channels, mask=mask.view(np.uint8))
        return mean.ravel(), std.ravel()

    def statistics(self, sample: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Tissue means and stds of a sample in the space, and its tissue fraction.

        Parameters
        ----------
        sample : ndarray, shape (3, H, W)
            Intensities in [0, max_value] (clipped to it first), channels in ``channel_order``.
        mask : ndarray of bool, shape (H, W), optional
            The pixels to measure; default the tissue.

        Returns
        -------
        mean, std : ndarray of float64, shape (3,)
            NaN when there is no tissue.
        fraction : float
            Tissue (or ``mask``) pixels / all pixels.
        """
        pixels, grey = self._interleaved(sample, clip=True)
        mask = self.tissue(grey) if mask is None else np.ascontiguousarray(mask, bool)
        count = cv2.countNonZero(mask.view(np.uint8))
        if not count:
            return np.full(3, np.nan), np.full(3, np.nan), 0.0
        mean, std = self._statistics(self._channels(pixels), mask)
        return mean, std, count / mask.size

    def _scale_and_shift(self, mean, std, target_mean, target_std):
        """Per-channel ``k, m`` of ``x' = k x + m`` taking (mean, std) to the targets."""
        flat = std < FLAT_STD[self.space]
        scale = np.where(flat, 1.0, np.asarray(target_std, np.float64) / np.where(flat, 1.0, std))
        scale = np.clip(scale, 1.0 / MAX_SCALE, MAX_SCALE)
        return scale, np.asarray(target_mean, np.float64) - scale * mean

    def __call__(self, source: np.ndarray, target: np.ndarray, target_mean: np.ndarray,
                 target_std: np.ndarray) -> bool:
        """Write ``source`` (3, H, W) with its tissue statistics moved to the targets into ``target``.

        ``source`` must lie in [0, max_value] (:class:`~caffe_layers.transforms.BatchAugmenter`
        checks the batch once; a per-sample clip would cost a pass). ``target`` (float,
        (3, H, W)) may be ``source``. Returns False, with ``target`` a copy of ``source``, when
        the tissue fraction is below ``min_tissue``.
        """
        pixels, grey = self._interleaved(source, clip=False)
        mask = self.tissue(grey)
        count = cv2.countNonZero(mask.view(np.uint8))
        if count == 0 or count < self.min_tissue * mask.size:
            if target is not source:
                np.copyto(target, source, casting="same_kind")
            return False
        channels = self._channels(pixels)
        scale, shift = self._scale_and_shift(*self._statistics(channels, mask), target_mean, target_std)
        if self.space == "lab":
            cv2.transform(channels, np.hstack([np.diag(scale), shift[:, None]]), dst=channels)
            moved = cv2.cvtColor(channels, self._from_lab, dst=channels)
            moved *= np.float32(self.max_value)
        else:
            transform, offset = stain_transform(scale, shift, None, 255.0)
            if self._reverse:
                transform, offset = transform[::-1, ::-1], offset[::-1]
            moved = cv2.transform(channels, np.hstack([transform.T, offset[:, None]]), dst=channels)
            cv2.exp(moved, dst=moved)
            moved -= np.float32(1.0)
            if self.max_value != 255.0:
                moved *= np.float32(self.max_value / 255.0)
        np.clip(moved, 0.0, self.max_value, out=moved)
        planes = self._buffer("planes", source.shape)
        cv2.split(moved, [planes[0], planes[1], planes[2]])
        self._blend(source, planes, self._weight(grey), target)
        return True

    def _weight(self, grey: np.ndarray) -> np.ndarray:
        """Blend weight (H, W), in place of ``grey``: 1 on tissue, falling linearly to 0 one ramp above
        the threshold, 0 on glass beyond."""
        if self._ramp > 0:
            # w = (3 (t + r) - (R + G + B)) / (3 r), clipped to [0, 1].
            cv2.addWeighted(grey, -1.0 / self._ramp, grey, 0.0, (self._grey_limit + self._ramp) / self._ramp,
                            dst=grey)
            np.clip(grey, 0.0, 1.0, out=grey)
        else:
            np.less_equal(grey, self._grey_limit, out=grey, casting="unsafe")
        return grey

    @staticmethod
    def _blend(source: np.ndarray, moved: np.ndarray, weight: np.ndarray, target: np.ndarray) -> None:
        """``target = source + weight * (moved - source)`` plane by plane (``moved`` is overwritten).

        Pixels of weight 0 keep their values exactly (``x + 0 * d == x``); ``target`` may be
        ``source`` (each element is read before it is written).
        """
        fast = target.dtype == np.float32 and source.dtype == np.float32 and all(
            array[c].flags.c_contiguous for array in (source, target) for c in range(3))
        for c in range(3):
            difference = moved[c]
            if fast:  # three SIMD passes per plane
                cv2.subtract(difference, source[c], dst=difference)
                cv2.multiply(difference, weight, dst=difference)
                cv2.add(source[c], difference, dst=target[c])
            else:
                difference -= source[c]
                difference *= weight
                np.add(source[c], difference, out=target[c], casting="same_kind")


#: ``cv2.transform`` matrix of the grey sum R + G + B.
_GREY_SUM = np.ones((1, 3), np.float32)


def _planes(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> C-contiguous float32 (3, H, W)."""
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), np.float32)


def tissue_statistics(rgb: np.ndarray, space: str = "lab", white_threshold: float = 200.0,
                      max_value: float = 255.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-channel mean and std of an RGB image's tissue in ``space``, and its tissue fraction.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3)
        uint8, or float with white at ``max_value``.
    space : {'lab', 'hed'}
    white_threshold : float
        Tissue threshold in grey levels of white 255.
    max_value : float

    Returns
    -------
    mean, std : ndarray of float64, shape (3,)
        NaN for an image without tissue.
    fraction : float
    """
    return _image_statistics(rgb, StainStatisticsTransfer(space, max_value, "RGB", white_threshold), "image")


def _image_statistics(rgb, transfer: StainStatisticsTransfer, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`tissue_statistics` with a given transfer; the mask is :func:`tissue_mask`'s (uint8: exact)."""
    rgb = check_rgb(rgb, name)
    mask = tissue_mask(rgb, transfer.white_threshold * transfer.max_value / 255.0)
    return transfer.statistics(_planes(rgb), mask)


def _named(images) -> Iterator[tuple[str, Any]]:
    """``(name, image)`` pairs, each image looked up only when its turn comes (a mapping may read
    its files lazily, so a large set is never held in memory at once)."""
    if isinstance(images, Mapping):
        return ((str(name), images[name]) for name in images)
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        return ((f"image {index}", image) for index, image in enumerate(images))
    raise ValueError(f"images must be a sequence or a dict of RGB images; got {type(images).__name__}")


def fit_stain_statistics(images, *, space: str = "lab", spread: float = 1.0, min_tissue: float = 0.05,
                         white_threshold: float = 200.0, max_value: float = 255.0) -> dict:
    """Fit the distribution of per-image tissue statistics: the ``stain_stats`` of the layer.

    Parameters
    ----------
    images : sequence or mapping of ndarray, shape (H, W, 3)
        RGB images (uint8, or float with white at ``max_value``), e.g. the training images plus
        unlabelled images of the target lab(s); a mapping names them in warnings, and is read one
        image at a time (it may load its files on access).
    space : {'lab', 'hed'}
    spread : float
        Stored in the result: the multiplier of the fitted sds when the layer draws, in
        [0, :data:`SPREAD_MAX`].
    min_tissue : float
        Images whose tissue fraction is below this are skipped, each with a
        :class:`~caffe_layers.stain.tissue.NoTissueWarning` naming it.
    white_threshold : float
        Tissue threshold, grey levels of white 255.
    max_value : float
        White of float images.

    Returns
    -------
    dict
        The validated ``stain_stats`` dict (:func:`check_stain_stats`): per channel, the mean and
        the sample std (``ddof=1``) over the images of the image means, and of the image stds.

    Raises
    ------
    ValueError
        Fewer than two images with enough tissue (a spread needs two), or a bad argument.
    """
    where = "fit_stain_statistics"
    settings = {param.name: param.check(value, where) for param, value in (
        (_space_param(), space), (_SPREAD, spread), (_WHITE_THRESHOLD, white_threshold), (_MIN_TISSUE, min_tissue))}
    transfer = StainStatisticsTransfer(settings["space"], max_value, "RGB", settings["white_threshold"])
    means, stds, skipped = [], [], []
    total = 0
    for name, image in _named(images):
        total += 1
        mean, std, fraction = _image_statistics(image, transfer, name)
        if fraction == 0 or fraction < settings["min_tissue"]:
            skipped.append(name)
            warnings.warn(f"{name}: {100 * fraction:.1f} % tissue, below min_tissue "
                          f"{100 * settings['min_tissue']:g} % (white_threshold {settings['white_threshold']:g}); "
                          "skipped", NoTissueWarning, stacklevel=2)
            continue
        means.append(mean)
        stds.append(std)
    if len(means) < 2:
        raise ValueError(f"{where}: {len(means)} of {total} images have enough tissue (at least "
                         f"{100 * settings['min_tissue']:g} %); the spread of the statistics needs at least 2")
    means, stds = np.array(means), np.array(stds)

    def pairs(values):
        return [[float(mu), float(sd)] for mu, sd in zip(values.mean(axis=0), values.std(axis=0, ddof=1))]

    return check_stain_stats(dict(settings, mean=pairs(means), std=pairs(stds)), where)
