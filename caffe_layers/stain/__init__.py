"""Stain tools for H&E images: numpy, scipy, scikit-image and OpenCV, never Caffe.

One module per concern:

* :mod:`~caffe_layers.stain.tissue` -- tissue masks (white glass ignored);
* :mod:`~caffe_layers.stain.optical_density` -- optical density and the HED stain space;
* :mod:`~caffe_layers.stain.histogram` -- histogram matching;
* :mod:`~caffe_layers.stain.estimate` -- colour, stain-space and hue ranges for the augmentation;
* :mod:`~caffe_layers.stain.normalizers` -- Reinhard, Macenko and Vahadane normalisers;
* :mod:`~caffe_layers.stain.colours` -- per-colour maps and fixed-seed pixel samples (their speed);
* :mod:`~caffe_layers.stain.shifts` -- fixed stain shifts (the experiment's test conditions).

RGB images are arrays of shape ``(H, W, 3)``: ``uint8`` in [0, 255], or floating in any range
(thresholds are then given in the image's own units).
"""
from .estimate import (ColorRangeEstimate, HedRangeEstimate, StainAngleEstimate, channel_mean_ratios,
                       group_stain_vectors, stain_concentration_means, suggest_color_params, suggest_hed_params,
                       suggest_stain_angle)
from .histogram import match_histograms
from .normalizers import (MacenkoNormalizer, ReinhardNormalizer, StainNormalizer, StainSeparationWarning,
                          VahadaneNormalizer)
from .optical_density import (beer_lambert_od, beer_lambert_rgb, optical_density, rotated_stain_matrix,
                              stain_concentrations)
from .shifts import STAIN_SHIFTS, fit_stain_shift, make_stain_shifts, shift_stains
from .tissue import NoTissueWarning, tissue_mask

__all__ = [
    "STAIN_SHIFTS",
    "ColorRangeEstimate",
    "HedRangeEstimate",
    "MacenkoNormalizer",
    "NoTissueWarning",
    "ReinhardNormalizer",
    "StainAngleEstimate",
    "StainNormalizer",
    "StainSeparationWarning",
    "VahadaneNormalizer",
    "beer_lambert_od",
    "beer_lambert_rgb",
    "channel_mean_ratios",
    "fit_stain_shift",
    "group_stain_vectors",
    "make_stain_shifts",
    "match_histograms",
    "optical_density",
    "rotated_stain_matrix",
    "shift_stains",
    "stain_concentration_means",
    "stain_concentrations",
    "suggest_color_params",
    "suggest_hed_params",
    "suggest_stain_angle",
    "tissue_mask",
]
