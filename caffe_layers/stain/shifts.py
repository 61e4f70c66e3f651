"""Fixed stain shifts of H&E images in haematoxylin-eosin-DAB space, for robustness tests.

Pure numpy. :func:`shift_stains` is the augmentation layer's ``hed`` jitter with fixed factors;
:func:`make_stain_shifts` makes the held-out conditions of the experiment.
"""
from __future__ import annotations

import numpy as np
from scipy import optimize

from ..image_io import check_rgb
from .estimate import channel_mean_ratios
from .optical_density import StainAffine

__all__ = ["SEED_RATIOS", "STAIN_SHIFTS", "fit_stain_shift", "make_stain_shifts", "shift_stains"]


def shift_stains(rgb, alpha, beta=(0.0, 0.0, 0.0), rotation=None):
    """Re-stain an RGB image in haematoxylin-eosin-DAB space: ``s' = alpha*s + beta``.

    The same stain-space transform as the augmentation layer's ``hed`` jitter, with fixed
    factors instead of random ones, so a test shift and the training augmentation speak
    the same language.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    alpha, beta : 3 floats
        Scale and offset of the H, E and DAB concentrations.
    rotation : 2 floats, optional
        Hue angles, in degrees, of the haematoxylin and eosin vectors (the ``stain_angle``
        jitter with fixed angles; see :func:`~caffe_layers.stain.optical_density.rotated_stain_matrix`).

    Returns
    -------
    (H, W, 3) uint8 array
    """
    rgb = check_rgb(rgb, "shift_stains image", uint8=True)
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    restain = StainAffine(255.0, "RGB", rgb.shape[:2])
    restain(planes, planes, np.asarray(alpha, float).reshape(3), np.asarray(beta, float).reshape(3),
            None if rotation is None else np.asarray(rotation, float).reshape(2))
    return np.clip(np.rint(planes.transpose(1, 2, 0)), 0, 255).astype(np.uint8)


def fit_stain_shift(rgb, reference, target_ratios, subsample=4):
    """A stain shift whose image has the given per-channel mean ratios to a reference.

    Finds H and E scales ``alpha = (a_H, a_E, 1)`` and a DAB offset ``beta = (0, 0, b_D)``
    (H and E alone cannot brighten blue independently) minimising the squared log-error between
    ``channel_mean_ratios(shift_stains(rgb, alpha), reference)`` (tissue only) and
    ``target_ratios``, on a subsampled image for speed.

    Returns
    -------
    alpha, beta : (3,) ndarrays
    ratios : (3,) ndarray
        The ratios the fitted shift reaches on the full image.
    """
    small, small_ref = rgb[::subsample, ::subsample], reference[::subsample, ::subsample]
    target = np.log(np.asarray(target_ratios, float))

    def shift(x):
        return (np.exp(x[0]), np.exp(x[1]), 1.0), (0.0, 0.0, x[2])

    def residual(x):
        ratios = channel_mean_ratios(shift_stains(small, *shift(x)), small_ref, ignore_white=True)
        return np.log(ratios) - target

    # Nelder-Mead: the uint8 rounding makes the objective slightly stepped for gradients.
    fit = optimize.minimize(lambda x: float(np.sum(residual(x) ** 2)), x0=np.zeros(3),
                            method="Nelder-Mead",
                            options=dict(initial_simplex=[[0, 0, 0], [-0.3, 0, 0], [0, -0.3, 0],
                                                          [0, 0, -0.1]], xatol=1e-3, fatol=1e-7))
    alpha, beta = (np.asarray(v, float) for v in shift(fit.x))
    return alpha, beta, channel_mean_ratios(shift_stains(rgb, alpha, beta), reference, ignore_white=True)


#: The held-out stain shifts: name -> (alpha, beta) in H-E-DAB space, or "seed" for the shift
#: fitted to the per-channel mean ratios measured between labs in the field (R, G, B).
STAIN_SHIFTS = {
    "pale": ((0.55, 0.55, 1.0), (0.0, 0.0, 0.0)),
    "hematoxylin_heavy": ((1.6, 0.9, 1.0), (0.0, 0.0, 0.0)),
    "eosin_heavy": ((0.9, 1.8, 1.0), (0.0, 0.0, 0.0)),
}
SEED_RATIOS = (1.215, 1.338, 1.358)


def make_stain_shifts(test_rgb, train_rgb):
    """The held-out region under every stain shift.

    Returns
    -------
    images : dict of str -> (H, W, 3) uint8
        ``"in_domain"`` (unchanged), each of :data:`STAIN_SHIFTS`, and ``"seed_ratios"``.
    settings : dict of str -> dict
        The alpha/beta of each shift and the per-channel mean ratios it reaches against the
        training region (tissue only).
    """
    images = {"in_domain": np.asarray(test_rgb)}
    settings = {"in_domain": dict(alpha=[1.0, 1.0, 1.0], beta=[0.0, 0.0, 0.0])}
    for name, (alpha, beta) in STAIN_SHIFTS.items():
        images[name] = shift_stains(test_rgb, alpha, beta)
        settings[name] = dict(alpha=list(alpha), beta=list(beta))
    alpha, beta, _ = fit_stain_shift(test_rgb, train_rgb, SEED_RATIOS)
    images["seed_ratios"] = shift_stains(test_rgb, alpha, beta)
    settings["seed_ratios"] = dict(alpha=alpha.round(4).tolist(), beta=beta.round(4).tolist(),
                                   target_ratios=list(SEED_RATIOS))
    for name, image in images.items():
        ratios = channel_mean_ratios(image, train_rgb, ignore_white=True)
        settings[name]["mean_ratios_vs_train"] = ratios.round(4).tolist()
    return images, settings
