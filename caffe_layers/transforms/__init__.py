"""Batch augmentation for nuclei segmentation: numpy, scipy and OpenCV, no Caffe.

* :mod:`~caffe_layers.transforms.functional` -- pure kernels (the dihedral group, rotation,
  colour change, clipping, input checks);
* :mod:`~caffe_layers.transforms.batch` -- :class:`BatchAugmenter`, which draws each sample's
  transform (:func:`draw_augmentation`) and applies the kernels to an N×C×H×W batch;
* :mod:`~caffe_layers.transforms.schema` -- :data:`AUGMENT_SCHEMA`, the keys of the augmentation.

The plain per-image implementation that the tests check the batch path against (and the
augmentation benchmark times as its baseline) is ``tests/transforms/naive_reference.py``.
"""
from .batch import AugmentDraws, BatchAugmenter, draw_augmentation
from .functional import DIHEDRAL_ELEMENTS, apply_dihedral, dihedral_element

__all__ = ["DIHEDRAL_ELEMENTS", "AugmentDraws", "BatchAugmenter", "apply_dihedral", "dihedral_element",
           "draw_augmentation"]
