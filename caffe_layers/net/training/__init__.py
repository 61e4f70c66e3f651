"""Training with Caffe: the data Caffe's own layers read, the nets and solvers, and the loop.

* :mod:`~caffe_layers.net.training.loop` -- :func:`train`: the training loop (progress, CSV log,
  validation, snapshots, checked weight loading);
* :mod:`~caffe_layers.net.training.templates` -- the NetSpec generator of the U-Net templates and
  their solvers (``scripts/make_prototxt.py`` writes ``prototxt/`` with it);
* :mod:`~caffe_layers.net.training.datum_lmdb` -- Datum LMDBs for Caffe's ``Data`` layer
  (``caffe-stain-lmdb``).

``caffe_layers.net.training`` gives the loop's names, as the module of that name did.
"""
from .loop import *  # noqa: F401,F403 - the names of the module, under this path
from .loop import __all__  # noqa: F401
