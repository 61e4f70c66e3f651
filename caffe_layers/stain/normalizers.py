"""Template stain normalisers: Reinhard (LAB statistics), Macenko and Vahadane (stain vectors).

All follow one protocol (:class:`StainNormalizer`): ``fit(template)`` learns the template,
``transform(image)`` returns a new uint8 RGB image. A template without tissue, or without the
colour spread a method needs, is an error at ``fit``; an image without tissue is returned
unchanged with a :class:`~caffe_layers.stain.tissue.NoTissueWarning`.

Speed: statistics (LAB means and spreads, stain vectors, concentration percentiles) are fitted
on at most ``sample_size`` tissue pixels drawn with a fixed seed
(:func:`~caffe_layers.stain.colours.sample_pixels`), so results are deterministic; the transform
of every pixel is computed once per distinct colour (Reinhard, Vahadane:
:func:`~caffe_layers.stain.colours.map_colours`) or in four OpenCV passes through a 256-entry
optical-density table (Macenko, whose transform is linear in optical density).
"""
from __future__ import annotations

import math
import warnings

import cv2
import numpy as np

from ..image_io import check_rgb
from .colours import DEFAULT_SAMPLE_SIZE, map_colours, sample_pixels
from .optical_density import RGB_FROM_HED, beer_lambert_od
from .tissue import NoTissueWarning, tissue_mask

__all__ = ["MacenkoNormalizer", "ReinhardNormalizer", "StainNormalizer", "StainSeparationWarning",
           "VahadaneNormalizer", "positive_lasso_2", "sparse_stain_dictionary"]


class StainSeparationWarning(UserWarning):
    """An image's tissue does not show two distinct stains; it was returned unchanged."""


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
    ``_transform`` on checked, C-contiguous uint8 RGB arrays; this base class does the checks.
    Normalisers are plain picklable objects (fitted ones too), so a process pool can share one.
    """

    #: Name of the attribute ``fit`` sets; ``transform`` before ``fit`` is an error.
    fitted_attribute = ""

    def fit(self, template):
        """Learn the template (uint8 RGB, (H, W, 3)); returns self. ValueError if unusable."""
        self._fit(np.ascontiguousarray(check_rgb(template, "template", uint8=True)))
        return self

    def transform(self, image):
        """Return ``image`` (uint8 RGB, (H, W, 3)) normalised to the template, as a new array."""
        if not hasattr(self, self.fitted_attribute):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(template) first")
        return self._transform(np.ascontiguousarray(check_rgb(image, "image", uint8=True)))

    def _fit(self, template):
        raise NotImplementedError

    def _transform(self, image):
        raise NotImplementedError




def _check_sampling(sample_size, seed, name="sample_size"):
    if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer))
                                    or sample_size < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {sample_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")


def _check_min_angle(min_angle):
    if (isinstance(min_angle, bool) or not isinstance(min_angle, (int, float, np.number))
            or not 0 <= min_angle < 90):
        raise ValueError(f"min_angle must be a number of degrees in [0, 90); got {min_angle!r}")


def _angle_degrees(first, second):
    cosine = float(first @ second) / float(np.linalg.norm(first) * np.linalg.norm(second))
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


def _od_table(background):
    """Beer-Lambert optical density of each uint8 level, float32 (256,): the values
    :func:`~caffe_layers.stain.optical_density.beer_lambert_od` gives, non-increasing."""
    return beer_lambert_od(np.arange(256, dtype=np.uint8), background)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard colour transfer: match per-channel LAB mean and std to a template.

    Parameters
    ----------
    ignore_white : bool, optional
        Compute statistics on tissue pixels only and change only tissue pixels
        (background stays bit-identical). Default True.
    white_threshold : float, optional
        Tissue threshold (uint8 units).
    sample_size : int or None, optional
        The LAB statistics are computed on at most this many of the pixels used, drawn with
        ``seed`` (None: all of them).
    seed : int, optional
        Seed of that sample (fixed: the same image always gives the same result).

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

    LAB is CIE L*a*b* (D65, OpenCV's float conversion), as in StainTools and torchstain;
    HistomicsTK's Reinhard uses Ruderman's lαβ space instead. The transform is computed once per
    distinct colour of the image (:func:`~caffe_layers.stain.colours.map_colours`).
    """

    #: LAB std (in LAB units) below which a channel counts as flat. The float
    #: LAB conversion leaves up to 0.125 (std ~0.02) of spread in the a*/b* channels
    #: of grey pixels; one uint8 step is ~0.4 L* units and tissue spreads are
    #: several units, so real spreads are far above this.
    FLAT_LAB_STD = 0.25
    _CHANNEL_NAMES = ("L*", "a*", "b*")
    fitted_attribute = "template_means_"

    def __init__(self, ignore_white=True, white_threshold=200, sample_size=DEFAULT_SAMPLE_SIZE, seed=0):
        _check_sampling(sample_size, seed)
        self.ignore_white = ignore_white
        self.white_threshold = white_threshold
        self.sample_size = sample_size
        self.seed = seed

    def _lab_statistics(self, rgb):
        """LAB (means, stds) of the pixels used (a fixed-seed sample of them), or None if blank."""
        mask = tissue_mask(rgb, self.white_threshold)
        if not mask.any():
            return None
        pixels, _ = sample_pixels(rgb, mask if self.ignore_white else None, self.sample_size, self.seed)
        lab = _rgb_to_lab(pixels)
        return lab.mean(axis=0), lab.std(axis=0)

    def _fit(self, template):
        """Learn the template's LAB statistics.

        Raises
        ------
        ValueError
            If the template has no tissue, or its LAB std is below
            ``FLAT_LAB_STD`` in a channel (named in the message).
        """
        statistics = self._lab_statistics(template)
        if statistics is None:
            raise ValueError(
                "template has no tissue pixels (all above white_threshold="
                f"{self.white_threshold}); cannot fit a normaliser to a blank image"
            )
        means, stds = statistics
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
        statistics = self._lab_statistics(image)
        if statistics is None:
            _no_tissue("image")
            return image.copy()
        means, stds = statistics
        # A flat channel has no spread to rescale (only conversion noise, which a
        # division would amplify ~1e4 times): only shift its mean.
        flat = stds < self.FLAT_LAB_STD
        scale = np.where(flat, 1.0, self.template_stds_ / np.where(flat, 1.0, stds))
        template_means, ignore_white, white_threshold = self.template_means_, self.ignore_white, self.white_threshold

        def restain(colours):
            lab = (_rgb_to_lab(colours) - means) * scale + template_means
            pixels = np.clip(np.rint(_lab_to_rgb(lab) * 255.0), 0, 255).astype(np.uint8)
            if ignore_white:  # background colours stay as they are
                background = ~tissue_mask(colours[None], white_threshold)[0]
                pixels[background] = colours[background]
            return pixels

        return map_colours(image, restain)


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
    sample_size : int or None, optional
        Stain vectors and concentration percentiles are fitted on at most this many tissue
        pixels, drawn with ``seed`` (None: all of them).
    seed : int, optional
        Seed of that sample.

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

    The transform is linear in optical density: unmixing with the image's vectors, scaling the
    concentrations and re-mixing with the template's is one 3×3 matrix ``M``. It runs as four
    OpenCV passes: a 256-entry table from uint8 to optical density, ``ln(background) - OD @ M``,
    ``exp`` and rounding to uint8.
    """

    fitted_attribute = "stain_matrix_"

    def __init__(self, alpha=1.0, beta=0.15, background=255.0, min_pixels=100, min_angle=5.0,
                 sample_size=DEFAULT_SAMPLE_SIZE, seed=0):
        _check_min_angle(min_angle)
        _check_sampling(sample_size, seed)
        self.alpha = alpha
        self.beta = beta
        self.background = background
        self.min_pixels = min_pixels
        self.min_angle = min_angle
        self.sample_size = sample_size
        self.seed = seed

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
        """Stain vectors and 99th-percentile concentrations of the (sampled) tissue, or Nones."""
        table = _od_table(self.background)
        # OD > beta in every channel <=> every channel at or below the last level whose OD
        # exceeds beta (the table does not increase): one cv2.inRange pass.
        levels = np.flatnonzero(table > self.beta)
        if levels.size == 0:
            return None, None
        top = int(levels[-1])
        mask = cv2.inRange(rgb, (0, 0, 0), (top, top, top))
        pixels, count = sample_pixels(rgb, mask, self.sample_size, self.seed)
        if count < max(self.min_pixels, 3):
            return None, None
        tissue_od = table[pixels]
        stains = self._stain_matrix(tissue_od)
        max_conc = np.percentile(self._concentrations(tissue_od, stains), 99, axis=0)
        return stains, max_conc

    def _fit(self, template):
        """Learn the template's stain vectors and concentration scale.

        Raises
        ------
        ValueError
            If the template has too few tissue pixels, or its haematoxylin and
            eosin vectors are less than ``min_angle`` degrees apart (a
            single-colour, grey or black template).
        """
        stains, max_conc = self._analyse(template)
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
        stains, max_conc = self._analyse(image)
        if stains is None or np.any(max_conc <= 0):
            _no_tissue("image")
            return image.copy()
        # OD' = (OD @ pinv(S_image)) * (max_template / max_image) @ S_template = OD @ matrix
        matrix = (np.linalg.pinv(stains) * (self.max_concentrations_ / max_conc)) @ self.stain_matrix_
        table = np.ascontiguousarray(np.repeat(_od_table(self.background)[None, :, None], 3, axis=2))
        od = cv2.LUT(image, table)
        # ln(intensity') = ln(background) - OD' ; rows of the affine map are the output channels.
        affine = np.hstack([-matrix.T, np.full((3, 1), math.log(self.background))])
        log_intensity = cv2.transform(od, affine)
        cv2.exp(log_intensity, dst=log_intensity)
        return cv2.convertScaleAbs(log_intensity)  # rounds and saturates to [0, 255]; values are > 0


def positive_lasso_2(od, stains, penalty):
    """Non-negative lasso with two atoms, exactly, for every row of ``od``.

    ``argmin_{c >= 0} 0.5 * |x - c @ stains|^2 + penalty * (c_1 + c_2)`` per row ``x``: the
    problem of Vahadane's concentrations (SPAMS' ``lasso`` with ``mode=2, pos=True``). With two
    atoms its solution is closed-form: the unconstrained minimiser ``G^-1 r`` (``G`` the atoms'
    Gram matrix, ``r = stains @ x - penalty``) when both its entries are positive, else the best
    single-atom solution that satisfies the KKT condition of the other atom.

    Parameters
    ----------
    od : ndarray, shape (N, 3)
    stains : ndarray, shape (2, 3)
        Linearly independent atoms.
    penalty : float
        ``lambda`` >= 0.

    Returns
    -------
    ndarray, shape (N, 2), non-negative, dtype of ``od`` (float32 or float64)
    """
    dtype = np.float32 if od.dtype == np.float32 else np.float64
    gram = stains @ stains.T
    (g11, g12), (_, g22) = gram
    determinant = g11 * g22 - g12 * g12
    r = od @ stains.T.astype(dtype)
    r -= dtype(penalty)
    r1, r2 = r[:, 0], r[:, 1]
    c1 = (dtype(g22) * r1 - dtype(g12) * r2) * dtype(1 / determinant)
    c2 = (dtype(g11) * r2 - dtype(g12) * r1) * dtype(1 / determinant)
    both = (c1 > 0) & (c2 > 0)
    only_first = np.maximum(r1, 0) * dtype(1 / g11)
    only_second = np.maximum(r2, 0) * dtype(1 / g22)
    # On the face c2 = 0 the optimum is global iff the gradient in c2 is >= 0 there.
    first = ~both & (dtype(g12) * only_first - r2 >= 0)
    second = ~both & ~first
    result = np.empty((od.shape[0], 2), dtype)
    result[:, 0] = np.where(both, c1, np.where(first, only_first, 0))
    result[:, 1] = np.where(both, c2, np.where(second, only_second, 0))
    return result


def sparse_stain_dictionary(od, penalty=0.1, max_iter=200, tol=1e-6, initial=None):
    """Vahadane's sparse non-negative stain dictionary of optical densities (no SPAMS).

    Minimises ``0.5 * |X - C @ D|^2 + penalty * sum(C)`` over ``C >= 0`` (N×2) and ``D >= 0``
    (2×3) with rows of norm at most 1 -- SPAMS' ``trainDL(K=2, mode=2, modeD=0, posAlpha=True,
    posD=True)`` problem -- by alternating exact steps: the concentrations by
    :func:`positive_lasso_2`, then each atom by the block-coordinate update of Mairal et al.
    (2010), projected onto ``D >= 0`` and the unit ball. Deterministic: it starts from
    ``initial`` (default the Ruifrok-Johnston haematoxylin and eosin vectors).

    Parameters
    ----------
    od : ndarray, shape (N, 3)
        Tissue optical densities.
    penalty : float
    max_iter : int
    tol : float
        Stop when no atom entry moves more than this in an iteration.
    initial : ndarray, shape (2, 3), optional

    Returns
    -------
    ndarray, shape (2, 3)
        The atoms, in the order of ``initial`` (not yet normalised or sorted). An atom that no
        pixel uses comes back as zeros.
    """
    data = np.asarray(od, dtype=np.float64)
    atoms = (RGB_FROM_HED[:2] / np.linalg.norm(RGB_FROM_HED[:2], axis=1, keepdims=True)
             if initial is None else np.array(initial, dtype=np.float64))
    for _ in range(max_iter):
        norms = np.linalg.norm(atoms, axis=1)
        if np.any(norms < 1e-12) or _angle_degrees(atoms[0], atoms[1]) < 1e-3:
            break  # one atom vanished or both coincide: nothing left to separate
        concentrations = positive_lasso_2(data, atoms, penalty)
        products = concentrations.T @ concentrations  # A = C^T C (2, 2)
        correlations = data.T @ concentrations  # B = X^T C (3, 2)
        previous = atoms.copy()
        for j in range(2):
            if products[j, j] <= 1e-12:
                atoms[j] = 0.0  # unused atom
                continue
            update = atoms[j] + (correlations[:, j] - atoms.T @ products[:, j]) / products[j, j]
            update = np.maximum(update, 0.0)
            atoms[j] = update / max(float(np.linalg.norm(update)), 1.0)
        if np.abs(atoms - previous).max() <= tol:
            break
    return atoms


class VahadaneNormalizer(StainNormalizer):
    """Vahadane stain normalisation (Vahadane et al., IEEE TMI 2016), without SPAMS.

    Stain vectors are a sparse non-negative factorisation of the tissue optical densities
    (:func:`sparse_stain_dictionary`: ``OD ≈ C @ S``, ``C >= 0`` sparse, ``S >= 0``, two unit
    rows, haematoxylin -- the larger red absorbance -- first). Concentrations are the
    non-negative lasso solutions with ``lambda_concentration`` (:func:`positive_lasso_2`, exact);
    each stain's 99th-percentile tissue concentration is scaled to the template's and the image
    is re-composed with the template's vectors: ``255 * exp(-C' @ S_template)``. This is the
    structure-preserving colour normalisation of the paper, as StainTools implements it (same
    penalties, 0.1 and 0.01, same Beer-Lambert optical density).

    Parameters
    ----------
    lambda1 : float, optional
        Sparsity penalty of the dictionary learning (default 0.1).
    lambda_concentration : float, optional
        Sparsity penalty of the concentrations (default 0.01).
    white_threshold : float, optional
        Tissue pixels are those of :func:`~caffe_layers.stain.tissue.tissue_mask` at this
        threshold (mean of R, G, B at most 200 by default); only they are fitted.
    background : float, optional
        Intensity of glass (default 255).
    min_pixels : int, optional
        Fewer tissue pixels than this: the image is treated as blank.
    min_angle : float, optional
        Smallest angle, in degrees, between the haematoxylin and eosin vectors (default 5).
    sample_size : int or None, optional
        The concentration percentiles are taken over about this many tissue pixels drawn with
        ``seed`` (default 100 000; None: all).
    dictionary_size : int, optional
        The dictionary is learnt on at most this many of them (default 20 000, every k-th of the
        random sample: itself a uniform random sample).
    seed : int, optional
    max_iter, tol : optional
        The dictionary learning stops after ``max_iter`` iterations, or once no atom entry moves
        more than ``tol`` (1e-5: the vectors then move by less than 0.005°).

    Attributes
    ----------
    stain_matrix_ : ndarray, shape (2, 3)
        Template stain OD vectors, haematoxylin first, unit length.
    max_concentrations_ : ndarray, shape (2,)
        Template 99th-percentile tissue concentrations.

    Notes
    -----
    :meth:`fit` raises ValueError on a template with fewer than ``min_pixels`` tissue pixels
    (a blank or nearly blank image) or without two distinct stains (an atom unused, the two
    less than ``min_angle`` apart, or a zero concentration percentile: a single-colour, grey
    or black template). :meth:`transform` returns an image with too few tissue pixels unchanged
    with a :class:`NoTissueWarning`, and one whose tissue shows no two distinct stains
    unchanged with a :class:`StainSeparationWarning`. Every pixel (background too) is
    re-composed, as in Macenko's method; the transform is computed once per distinct colour.
    Differences from StainTools on purpose: tissue is the package's :func:`tissue_mask` (not
    a LAB-lightness threshold), percentiles are taken over tissue pixels only (StainTools
    includes the background, so its scale depends on how much glass an image shows), the
    dictionary starts from the Ruifrok-Johnston vectors instead of random pixels (deterministic),
    and outputs are rounded, not truncated.
    """

    fitted_attribute = "stain_matrix_"

    def __init__(self, lambda1=0.1, lambda_concentration=0.01, white_threshold=200, background=255.0,
                 min_pixels=100, min_angle=5.0, sample_size=DEFAULT_SAMPLE_SIZE, dictionary_size=20_000,
                 seed=0, max_iter=200, tol=1e-5):
        _check_min_angle(min_angle)
        _check_sampling(sample_size, seed)
        _check_sampling(dictionary_size, seed, "dictionary_size")
        for name, value in (("lambda1", lambda1), ("lambda_concentration", lambda_concentration)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        self.lambda1 = lambda1
        self.lambda_concentration = lambda_concentration
        self.white_threshold = white_threshold
        self.background = background
        self.min_pixels = min_pixels
        self.min_angle = min_angle
        self.sample_size = sample_size
        self.dictionary_size = dictionary_size
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol

    def _analyse(self, rgb):
        """("blank" | "unseparable" | None, stains, max_conc, angle) of the tissue of ``rgb``."""
        mask = tissue_mask(rgb, self.white_threshold)
        pixels, count = sample_pixels(rgb, mask, self.sample_size, self.seed)
        if count < max(self.min_pixels, 3):
            return "blank", None, None, None
        tissue_od = _od_table(self.background)[pixels].astype(np.float64)
        step = max(1, -(-len(tissue_od) // (self.dictionary_size or len(tissue_od))))
        atoms = sparse_stain_dictionary(tissue_od[::step], self.lambda1, self.max_iter, self.tol)
        norms = np.linalg.norm(atoms, axis=1)
        if np.any(norms < 1e-9):
            return "unseparable", None, None, 0.0
        if atoms[0, 0] < atoms[1, 0]:  # haematoxylin absorbs more red: first
            atoms, norms = atoms[::-1], norms[::-1]
        stains = np.ascontiguousarray(atoms / norms[:, None])
        angle = _angle_degrees(stains[0], stains[1])
        if not angle >= max(self.min_angle, 1e-3):
            return "unseparable", None, None, angle
        max_conc = np.percentile(positive_lasso_2(tissue_od, stains, self.lambda_concentration), 99, axis=0)
        if np.any(max_conc <= 0):
            return "unseparable", None, None, angle
        return None, stains, max_conc, angle

    def _fit(self, template):
        """Learn the template's stain vectors and concentration scale.

        Raises
        ------
        ValueError
            If the template has too few tissue pixels or no two distinct stains.
        """
        problem, stains, max_conc, angle = self._analyse(template)
        if problem == "blank":
            raise ValueError(
                f"template has too few tissue pixels (mean of R, G, B at most white_threshold="
                f"{self.white_threshold}; need {self.min_pixels}); cannot fit a normaliser to a blank image")
        if problem == "unseparable":
            raise ValueError(
                "template has no distinct haematoxylin and eosin directions (sparse stain "
                f"separation found {'one stain' if not angle else f'an angle of {angle:.1f}°'}, "
                f"min_angle={self.min_angle:g}°); a single-colour, grey or black template cannot "
                "define two stains")
        self.stain_matrix_ = stains
        self.max_concentrations_ = max_conc

    def _transform(self, image):
        """``image`` re-stained with the template's stains."""
        problem, stains, max_conc, _ = self._analyse(image)
        if problem == "blank":
            _no_tissue("image")
            return image.copy()
        if problem == "unseparable":
            warnings.warn("image has no two distinct stains to separate (a single colour?); returning it "
                          "unchanged", StainSeparationWarning, stacklevel=2)
            return image.copy()
        table = _od_table(self.background)
        scale = self.max_concentrations_ / max_conc
        template_stains = self.stain_matrix_.astype(np.float32)
        penalty, log_background = self.lambda_concentration, np.float32(math.log(self.background))

        def restain(colours):
            concentrations = positive_lasso_2(table[colours], stains, penalty)
            concentrations *= scale.astype(np.float32)
            log_intensity = log_background - concentrations @ template_stains
            return np.clip(np.rint(np.exp(log_intensity)), 0, 255).astype(np.uint8)

        return map_colours(image, restain)
