"""Stain-robust training for Caffe nuclei segmenters.

The numpy core (``params``, ``transforms``, ``stain``, ``metrics``, ...) imports without
Caffe; only the modules that define Caffe layers (``augmentation``, ``data``) import ``caffe``.
"""

__version__ = "0.1.0"
