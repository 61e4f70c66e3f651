"""Optical density and the haematoxylin-eosin-DAB (HED) stain space, coded once.

Two optical-density conventions are in use in the field, and this project uses each for one job:

* **HED convention** (:func:`optical_density`, :func:`intensity`): ``OD = ln(M + 1) - ln(x + 1)``
  with ``M`` the intensity of white (255 for 8-bit input). The ``+ 1`` keeps black finite and
  makes the stain-space jitter affine in ``log1p(x)``. Stain concentrations are
  ``OD @ HED_FROM_RGB`` (Ruifrok & Johnston's matrix, as in scikit-image's ``rgb2hed``). The
  augmentation layer's ``hed`` jitter, the stain shifts of the experiment and the
  concentration estimates (:mod:`caffe_layers.stain.estimate`) all use it, so a measured ratio
  of concentrations is directly the jitter's ``alpha``.
* **Beer-Lambert convention** (:func:`beer_lambert_od`, :func:`beer_lambert_rgb`):
  ``OD = -ln(max(x, 1) / background)``, clipped at 0, as in Macenko et al. and the libraries
  that implement their normaliser; :class:`~caffe_layers.stain.normalizers.MacenkoNormalizer`
  uses it.

:class:`StainAffine` applies ``s' = alpha * s + beta`` to the concentrations ``s`` of a C×H×W
image, re-composed with haematoxylin and eosin vectors turned by small angles
(:func:`rotated_stain_matrix`, the hue jitter), in one 3×3 matrix product (see its docstring):
the kernel of the ``hed`` jitter and of :func:`caffe_layers.stain.shifts.shift_stains`.
"""
from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = ["HED_FROM_RGB", "HE_PLANE_NORMAL", "RGB_FROM_HED", "StainAffine", "beer_lambert_od",
           "beer_lambert_rgb", "intensity", "optical_density", "rotated_stain_matrix", "stain_concentrations",
           "stain_transform"]

#: RGB optical density (rows R, G, B) -> H, E, DAB concentrations: ``s = OD @ HED_FROM_RGB``.
HED_FROM_RGB = hed_from_rgb
#: The inverse: ``OD = s @ RGB_FROM_HED``; its rows are the H, E and DAB optical-density vectors.
RGB_FROM_HED = rgb_from_hed

#: Unit normal of the plane of the haematoxylin and eosin OD vectors, ``v_H × v_E / |v_H × v_E|``:
#: the axis the hue jitter turns them about.
HE_PLANE_NORMAL = np.cross(RGB_FROM_HED[0], RGB_FROM_HED[1])
HE_PLANE_NORMAL = HE_PLANE_NORMAL / np.linalg.norm(HE_PLANE_NORMAL)
# n × v for v_H and v_E: in the H-E plane, perpendicular to v, as long as v. A turn by theta is
# v cos(theta) + (n × v) sin(theta) (Rodrigues' formula with n · v = 0).
_HE_QUARTER_TURNS = np.cross(HE_PLANE_NORMAL, RGB_FROM_HED[:2])


def rotated_stain_matrix(rotation_degrees=None):
    """``RGB_FROM_HED`` with the H and E vectors turned in their plane (the hue jitter).

    Parameters
    ----------
    rotation_degrees : (2,) floats or None
        Angles of the haematoxylin and eosin vectors, in degrees, each turned about
        :data:`HE_PLANE_NORMAL` (positive: from H towards E, right-handed about ``v_H × v_E``).
        The DAB vector is kept. None or zeros give ``RGB_FROM_HED`` exactly.

    Returns
    -------
    ndarray, shape (3, 3)
        Rows: the turned H and E vectors (lengths kept) and the DAB vector.

    Notes
    -----
    The turned eosin vector leaves the positive octant of OD space after ~4° away from H (eosin's
    red absorbance is only 0.07): it then brightens red a little. The images stay valid (they are
    clipped to [0, M]); keep ``stain_angle`` small, like the differences measured between labs.
    """
    if rotation_degrees is None:
        return RGB_FROM_HED
    theta = np.deg2rad(np.asarray(rotation_degrees, dtype=np.float64).reshape(2))
    if not theta.any():
        return RGB_FROM_HED
    matrix = RGB_FROM_HED.copy()
    matrix[:2] = RGB_FROM_HED[:2] * np.cos(theta)[:, None] + _HE_QUARTER_TURNS * np.sin(theta)[:, None]
    return matrix


def stain_transform(alpha, beta, rotation_degrees=None, max_value=255.0):
    """The affine map of ``log1p`` intensities that :class:`StainAffine` applies (RGB order).

    Returns ``(T, t)`` with ``log1p(x') = log1p(x) @ T + t`` for row vectors of R, G, B; see
    :class:`StainAffine` for the derivation.
    """
    stains = rotated_stain_matrix(rotation_degrees)
    transform = HED_FROM_RGB @ np.diag(np.asarray(alpha, dtype=np.float64)) @ stains  # (3, 3)
    shift = np.log1p(np.float64(max_value)) * (1.0 - transform.sum(axis=0)) - np.asarray(beta, np.float64) @ stains
    return transform, shift


def optical_density(rgb, max_value=255.0, dtype=np.float32):
    """HED-convention optical density ``ln(M + 1) - ln(x + 1)`` of intensities clipped to [0, M].

    Parameters
    ----------
    rgb : ndarray, any shape
        Intensities, white at ``max_value``.
    max_value : float
        ``M``, the intensity of white.
    dtype : numpy dtype
        Precision of the logarithm (float32 for speed, float64 for reference code).

    Returns
    -------
    od : ndarray, same shape
        Non-negative; 0 for white.
    """
    log_white = np.log1p(np.float64(max_value))
    return log_white - np.log1p(np.clip(rgb, 0, max_value, dtype=dtype))


def intensity(od, max_value=255.0):
    """Inverse of :func:`optical_density`: ``(M + 1) * exp(-od) - 1``, clipped to [0, M]."""
    return np.clip((max_value + 1) * np.exp(-od) - 1, 0, max_value)


def stain_concentrations(rgb, max_value=255.0, dtype=np.float32):
    """H, E and DAB concentrations of an RGB image.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3)
        RGB intensities, channels last.
    max_value : float
    dtype : numpy dtype
        Precision of the optical density and of the matrix.

    Returns
    -------
    ndarray, shape (..., 3)
        Concentrations ``OD @ HED_FROM_RGB``, channels H, E, DAB.
    """
    return optical_density(rgb, max_value, dtype) @ HED_FROM_RGB.astype(dtype)


def beer_lambert_od(rgb, background=255.0):
    """Beer-Lambert optical density ``-ln(I / background)`` (the Macenko convention).

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8 or float
        Transmitted intensities in the same units as ``background``.
    background : float, optional
        Intensity of unstained glass (255 for uint8).

    Returns
    -------
    od : ndarray, shape (..., 3), float32
        Non-negative optical density. Zero intensities are treated as 1 so the
        logarithm stays finite.
    """
    rgb = np.asarray(rgb)
    if background <= 0:
        raise ValueError(f"background must be > 0; got {background!r}")
    intensity_ = np.maximum(rgb.astype(np.float32), 1.0)
    od = -np.log(intensity_ / np.float32(background))
    return np.maximum(od, 0.0, out=od)


def beer_lambert_rgb(od, background=255.0):
    """Inverse of :func:`beer_lambert_od`: ``background * exp(-od)`` as uint8.

    Parameters
    ----------
    od : ndarray, shape (..., 3), float
    background : float, optional

    Returns
    -------
    rgb : ndarray, shape (..., 3), uint8
        Rounded and clipped to [0, 255].
    """
    intensity_ = np.float32(background) * np.exp(-np.asarray(od, dtype=np.float32))
    return np.clip(np.rint(intensity_), 0, 255).astype(np.uint8)


class StainAffine:
    """Stain jitter of C×H×W images in one 3×3 matmul: ``s' = alpha * s + beta``, re-composed
    with turned haematoxylin and eosin vectors.

    Derivation (row vectors of R, G, B; ``M`` the intensity of white): the HED optical density
    is ``OD = ln(M+1) - L`` with ``L = log1p(x)``, and the concentrations are
    ``s = OD @ HED_FROM_RGB``. The jitter scales and shifts them, ``s' = s @ diag(alpha) + beta``,
    and re-composes the optical density with the stain matrix ``S`` whose H and E rows are turned
    by the sample's hue angles (:func:`rotated_stain_matrix`; ``S = RGB_FROM_HED`` without hue
    jitter): ``OD' = s' @ S``. Substituting,

    ``ln(M+1) - L' = (ln(M+1) - L) @ HED_FROM_RGB @ diag(alpha) @ S + beta @ S``

    so with ``T = HED_FROM_RGB @ diag(alpha) @ S`` and ``1 = (1, 1, 1)``:

    ``L' = L @ T + t``,  ``t = ln(M+1) * (1 - 1 @ T) - beta @ S``

    (``1 @ T`` is ``T.sum(axis=0)``). Concentration jitter and hue jitter are one matrix ``T``
    and one offset ``t`` per sample, so an image costs one log1p, one 3×3 matmul and one expm1,
    on buffers reused between calls. Inputs are clipped to [0, M] first (the optical density is
    undefined below -1) and outputs to [0, M]. The unmixing keeps the fixed ``HED_FROM_RGB``: the
    turned matrix is only used to re-compose, so it is never inverted.

    Parameters
    ----------
    max_value : float
        ``M``, the intensity of white.
    channel_order : {'RGB', 'BGR'}
        Channel order of the images.
    spatial_shape : (int, int)
        ``(H, W)`` of the images (sizes the buffers).
    """

    def __init__(self, max_value: float, channel_order: str, spatial_shape: tuple[int, int]):
        self.max_value = float(max_value)
        self.log_white = np.log1p(self.max_value)
        self.reverse = channel_order == "BGR"
        pixels = spatial_shape[0] * spatial_shape[1]
        self.log_buffer = np.empty((3, pixels), np.float32)
        self.result_buffer = np.empty((3, pixels), np.float32)

    def __call__(self, source: np.ndarray, target: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                 rotation: np.ndarray | None = None) -> None:
        """Write the re-stained ``source`` (3, H, W) into ``target`` (3, H, W; may be ``source``).

        ``alpha``, ``beta``: (3,) scale and shift of the H, E and DAB concentrations;
        ``rotation``: (2,) hue angles of the H and E vectors in degrees, or None.
        """
        transform, shift = stain_transform(alpha, beta, rotation, self.max_value)
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
