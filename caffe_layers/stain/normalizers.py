"""Template stain normalisers: Reinhard (LAB statistics) and Macenko (stain vectors).

Both follow one protocol (:class:`StainNormalizer`): ``fit(template)`` learns the template,
``transform(image)`` returns a new uint8 RGB image. A template without tissue, or without the
colour spread a method needs, is an error at ``fit``; an image without tissue is returned
unchanged with a :class:`~caffe_layers.stain.tissue.NoTissueWarning`.
"""
from __future__ import annotations

import math
import warnings

import cv2
import numpy as np

from ..image_io import check_rgb
from .optical_density import beer_lambert_od, beer_lambert_rgb
from .tissue import NoTissueWarning, tissue_mask

__all__ = ["MacenkoNormalizer", "ReinhardNormalizer", "StainNormalizer"]


def _no_tissue(name):
    warnings.warn(
        f"{name} has no tissue pixels; returning it unchanged", NoTissueWarning, stacklevel=3
    )


def _rgb_to_lab(pixels):
    """CIE L*a*b* (D65) of (N, 3) uint8 RGB pixels, as float64 (N, 3).

    OpenCV's float conversion: within 0.3 LAB units of ``skimage.color.rgb2lab`` and about
    six times faster, which is most of a Reinhard normalisation's time.
    """
    scaled = pixels.reshape(-1, 1, 3).astype(np.float32) * np.float32(1 / 255)
    return cv2.cvtColor(scaled, cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64)


def _lab_to_rgb(lab):
    """RGB in [0, 1] (out-of-gamut values not yet clipped) of (N, 3) CIE L*a*b* values."""
    return cv2.cvtColor(lab.reshape(-1, 1, 3).astype(np.float32), cv2.COLOR_Lab2RGB).reshape(-1, 3)


class StainNormalizer:
    """Protocol of the template normalisers: ``fit(template)``, then ``transform(image)``.

    Subclasses set :attr:`fitted_attribute` (set by ``fit``) and implement ``_fit`` and
    ``_transform`` on checked uint8 RGB arrays; this base class does the checks.
    """

    #: Name of the attribute ``fit`` sets; ``transform`` before ``fit`` is an error.
    fitted_attribute = ""

    def fit(self, template):
        """Learn the template (uint8 RGB, (H, W, 3)); returns self. ValueError if unusable."""
        self._fit(check_rgb(template, "template", uint8=True))
        return self

    def transform(self, image):
        """Return ``image`` (uint8 RGB, (H, W, 3)) normalised to the template, as a new array."""
        if not hasattr(self, self.fitted_attribute):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(template) first")
        return self._transform(check_rgb(image, "image", uint8=True))

    def _fit(self, template):
        raise NotImplementedError

    def _transform(self, image):
        raise NotImplementedError


class ReinhardNormalizer(StainNormalizer):
    """Reinhard colour transfer: match per-channel LAB mean and std to a template.

    Parameters
    ----------
    ignore_white : bool, optional
        Compute statistics on tissue pixels only and change only tissue pixels
        (background stays bit-identical). Default True.
    white_threshold : float, optional
        Tissue threshold (uint8 units).

    Attributes
    ----------
    template_means_, template_stds_ : ndarray, shape (3,)
        LAB statistics of the fitted template.

    Notes
    -----
    Input and output are uint8 RGB. Images without tissue are always returned
    unchanged (with a :class:`NoTissueWarning`); a template without tissue is
    an error. So is a template that is flat in a LAB channel (std below
    ``FLAT_LAB_STD``, e.g. a single-colour or grey template): it has no spread
    to transfer. An image flat in a channel (a grey image's a*/b*, whose
    std is only LAB-conversion rounding noise) has that channel shifted to the
    template mean but not rescaled, so the noise is never blown up.
    """

    #: LAB std (in LAB units) below which a channel counts as flat. The float
    #: LAB conversion leaves up to 0.125 (std ~0.02) of spread in the a*/b* channels
    #: of grey pixels; one uint8 step is ~0.4 L* units and tissue spreads are
    #: several units, so real spreads are far above this.
    FLAT_LAB_STD = 0.25
    _CHANNEL_NAMES = ("L*", "a*", "b*")
    fitted_attribute = "template_means_"

    def __init__(self, ignore_white=True, white_threshold=200):
        self.ignore_white = ignore_white
        self.white_threshold = white_threshold

    def _lab_pixels(self, rgb):
        """LAB values (N, 3) of the pixels used, and the mask (or None)."""
        mask = tissue_mask(rgb, self.white_threshold)
        if not mask.any():
            return None, mask
        # Converting only tissue pixels saves most of the (slow) LAB conversion.
        pixels = rgb[mask] if self.ignore_white else rgb.reshape(-1, 3)
        return _rgb_to_lab(pixels), mask

    def _fit(self, template):
        """Learn the template's LAB statistics.

        Raises
        ------
        ValueError
            If the template has no tissue, or its LAB std is below
            ``FLAT_LAB_STD`` in a channel (named in the message).
        """
        lab, _ = self._lab_pixels(template)
        if lab is None:
            raise ValueError(
                "template has no tissue pixels (all above white_threshold="
                f"{self.white_threshold}); cannot fit a normaliser to a blank image"
            )
        means, stds = lab.mean(axis=0), lab.std(axis=0)
        flat = np.flatnonzero(stds < self.FLAT_LAB_STD)
        if flat.size:
            label = "channel" if flat.size == 1 else "channels"
            names = ", ".join(self._CHANNEL_NAMES[c] for c in flat)
            values = ", ".join(f"{stds[c]:.2g}" for c in flat)
            raise ValueError(
                f"template is flat in LAB {label} {names} (std {values} < "
                f"{self.FLAT_LAB_STD:g}); a single-colour or grey template has no colour "
                "spread to transfer"
            )
        self.template_means_ = means
        self.template_stds_ = stds

    def _transform(self, image):
        """``image`` with the template's LAB statistics."""
        lab, mask = self._lab_pixels(image)
        if lab is None:
            _no_tissue("image")
            return image.copy()
        means, stds = lab.mean(axis=0), lab.std(axis=0)
        # A flat channel has no spread to rescale (only conversion noise, which a
        # division would amplify ~1e4 times): only shift its mean.
        flat = stds < self.FLAT_LAB_STD
        scale = np.where(flat, 1.0, self.template_stds_ / np.where(flat, 1.0, stds))
        lab = (lab - means) * scale + self.template_means_
        rgb = _lab_to_rgb(lab)
        pixels = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        if self.ignore_white:
            out = image.copy()
            out[mask] = pixels
            return out
        return pixels.reshape(image.shape)


class MacenkoNormalizer(StainNormalizer):
    """Macenko stain normalisation (Macenko et al., ISBI 2009).

    Stain vectors are the extreme angles (``alpha`` / ``100-alpha``
    percentiles) of tissue optical densities projected onto the plane of the
    two main SVD directions; tissue pixels are those whose OD exceeds ``beta``
    in every channel. Concentrations come from least squares, and each stain's
    99th-percentile concentration (over tissue pixels) is scaled to the
    template's before re-composing with the template's stain vectors.

    Parameters
    ----------
    alpha : float, optional
        Angular percentile (default 1).
    beta : float, optional
        OD threshold for tissue pixels (default 0.15).
    background : float, optional
        Intensity of glass (default 255).
    min_pixels : int, optional
        Fewer tissue pixels than this: the image is treated as blank.
    min_angle : float, optional
        Smallest angle, in degrees, between the template's haematoxylin and
        eosin vectors (default 5). A single-colour, grey or black template has
        one OD direction (angle 0) and so no two stains to separate; real H&E
        templates have ~15-45 degrees.

    Attributes
    ----------
    stain_matrix_ : ndarray, shape (2, 3)
        Template stain OD vectors, haematoxylin first, unit length.
    max_concentrations_ : ndarray, shape (2,)
        Template 99th-percentile concentrations.

    Notes
    -----
    :meth:`fit` raises ValueError on a template without two distinct stains
    (blank, too few tissue pixels, or an angle below ``min_angle``);
    :meth:`transform` returns images without tissue unchanged with a
    :class:`NoTissueWarning`.
    """

    fitted_attribute = "stain_matrix_"

    def __init__(self, alpha=1.0, beta=0.15, background=255.0, min_pixels=100, min_angle=5.0):
        if (isinstance(min_angle, bool) or not isinstance(min_angle, (int, float, np.number))
                or not 0 <= min_angle < 90):
            raise ValueError(f"min_angle must be a number of degrees in [0, 90); got {min_angle!r}")
        self.alpha = alpha
        self.beta = beta
        self.background = background
        self.min_pixels = min_pixels
        self.min_angle = min_angle

    def _tissue_od(self, od_pixels):
        return od_pixels[np.all(od_pixels > self.beta, axis=1)]

    def _stain_matrix(self, tissue_od):
        # Two main directions of the OD cloud (eigh of the 3x3 covariance is the
        # SVD of the centred data without touching the big array again).
        _, eigenvectors = np.linalg.eigh(np.cov(tissue_od.T.astype(np.float64)))
        plane = eigenvectors[:, [2, 1]]
        # Orient each direction towards positive OD (stains absorb).
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
        projected = tissue_od @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, [self.alpha, 100 - self.alpha])
        v_low = plane @ np.array([np.cos(low), np.sin(low)])
        v_high = plane @ np.array([np.cos(high), np.sin(high)])
        # Haematoxylin absorbs more red than eosin: put it first.
        stains = np.array([v_low, v_high]) if v_low[0] > v_high[0] else np.array([v_high, v_low])
        stains = np.abs(stains)  # guard tiny negative components from noise
        return stains / np.linalg.norm(stains, axis=1, keepdims=True)

    def _concentrations(self, od_pixels, stains):
        # Least squares od = c @ stains, for all pixels at once via the pseudo-inverse.
        return od_pixels @ np.linalg.pinv(stains).astype(np.float32)

    def _analyse(self, rgb):
        od_pixels = beer_lambert_od(rgb, self.background).reshape(-1, 3)
        tissue_od = self._tissue_od(od_pixels)
        if len(tissue_od) < max(self.min_pixels, 3):
            return od_pixels, None, None
        stains = self._stain_matrix(tissue_od)
        max_conc = np.percentile(self._concentrations(tissue_od, stains), 99, axis=0)
        return od_pixels, stains, max_conc

    def _fit(self, template):
        """Learn the template's stain vectors and concentration scale.

        Raises
        ------
        ValueError
            If the template has too few tissue pixels, or its haematoxylin and
            eosin vectors are less than ``min_angle`` degrees apart (a
            single-colour, grey or black template).
        """
        _, stains, max_conc = self._analyse(template)
        if stains is None or np.any(max_conc <= 0):
            raise ValueError(
                f"template has too few tissue pixels (OD > beta={self.beta} in every "
                f"channel; need {self.min_pixels}); cannot fit a normaliser to a blank image"
            )
        # Identical H and E vectors would make every later transform silently wrong.
        angle = math.degrees(math.acos(min(1.0, float(stains[0] @ stains[1]))))
        if not angle >= self.min_angle:
            raise ValueError(
                f"template has no distinct haematoxylin and eosin directions (angle spread "
                f"{angle:.1f}° < min_angle={self.min_angle:g}°); a single-colour, grey or "
                "black template cannot define two stains"
            )
        self.stain_matrix_ = stains
        self.max_concentrations_ = max_conc

    def _transform(self, image):
        """``image`` re-stained with the template's stains."""
        od_pixels, stains, max_conc = self._analyse(image)
        if stains is None or np.any(max_conc <= 0):
            _no_tissue("image")
            return image.copy()
        concentrations = self._concentrations(od_pixels, stains)
        concentrations *= (self.max_concentrations_ / max_conc).astype(np.float32)
        od_normalised = concentrations @ self.stain_matrix_.astype(np.float32)
        return beer_lambert_rgb(od_normalised, self.background).reshape(image.shape)

