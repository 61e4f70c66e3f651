"""Stain-robust training for Caffe nuclei segmenters.

The numpy core (``params``, ``transforms``, ``stain``, ``metrics``, ...) imports without
Caffe; only the modules that define Caffe layers (``augmentation``, ``data``) import ``caffe``.
"""
from pathlib import Path

__version__ = "0.1.0"


def template_dir():
    """The folder of the generated prototxt templates (``scripts/make_prototxt.py``).

    ``caffe_layers/prototxt/`` in an installed wheel, the repository's ``prototxt/`` in a
    source checkout or an editable install. Paths inside the templates are relative to the
    directory Caffe runs in (``prototxt/``, ``data/``, ``snapshots/``): copy the folder there
    as ``prototxt/``.
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "prototxt", package.parent / "prototxt"):
        if (folder / "solver_scratch.prototxt").is_file():
            return folder
    raise FileNotFoundError(f"no prototxt templates next to {package}: reinstall caffe-stain-augment")
