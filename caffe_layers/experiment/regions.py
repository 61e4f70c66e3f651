"""The experiment's data: one annotated H&E tile split into train / validation / test bands.

The split is spatial -- horizontal bands of one slide region with a gap between them -- so no
training patch overlaps validation or test tissue. :func:`prepare_data` is the whole
preparation (bands, their PatchDataLayer list files, the training mean file), shared by the
experiment and ``caffe-stain-prepare``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..image_io import write_atomic, write_image
from ..net.meanfile import write_mean_binaryproto
from ..patches import compute_mean_image

__all__ = ["REGION_NAMES", "PreparedData", "prepare_data", "split_regions", "write_region_lists"]

REGION_NAMES = ("train", "val", "test")


def split_regions(height, fractions=(0.6, 0.13, 0.27), gap=16):
    """Horizontal bands of an image: train on top, then validation, then held-out test.

    Parameters
    ----------
    height : int
        Image height in pixels.
    fractions : 3 floats
        Shares of the height (before the gaps) for train, val and test; they must sum to 1.
    gap : int
        Rows left out between bands, so patches near a border cannot share tissue.

    Returns
    -------
    dict of str -> slice
        Row slices keyed by ``REGION_NAMES``.
    """
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or (fractions <= 0).any() or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions.tolist()}")
    usable = height - 2 * gap
    if usable < 3:
        raise ValueError(f"image height {height} is too small for 3 regions with gap {gap}")
    edges = np.round(np.concatenate([[0], np.cumsum(fractions)]) * usable).astype(int)
    return {name: slice(int(edges[i]) + i * gap, int(edges[i + 1]) + i * gap)
            for i, name in enumerate(REGION_NAMES)}


def write_region_lists(rgb, mask, regions, out_dir, overwrite=False):
    """Write each region's image and mask as PNG, and a PatchDataLayer list file per region.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    mask : (H, W) array, nucleus > 0
    regions : dict of str -> slice
        Row slices, as from :func:`split_regions`.
    out_dir : path
    overwrite : bool
        Replace files that already exist (default: refuse).

    Returns
    -------
    dict of str -> Path
        The list file of each region (lines ``<name>.png <name>_mask.png``, relative to it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lists = {}
    for name, rows in regions.items():
        write_image(out_dir / f"{name}.png", rgb[rows], overwrite=overwrite)
        write_image(out_dir / f"{name}_mask.png", (np.asarray(mask[rows]) > 0).astype(np.uint8) * 255,
                    overwrite=overwrite)
        lists[name] = out_dir / f"{name}_list.txt"
        text = f"{name}.png {name}_mask.png\n"
        write_atomic(lists[name], lambda tmp, text=text: Path(tmp).write_text(text), overwrite=overwrite)
    return lists


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """What :func:`prepare_data` wrote: row slices, list file per region, the mean file."""

    regions: dict
    lists: dict
    mean_file: Path


def prepare_data(rgb, mask, out_dir, *, patch_size, gap=16, overwrite=False):
    """Split an image into bands and write what the U-Net templates read.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    mask : (H, W) array, nucleus > 0
    out_dir : path
        Gets ``<region>.png``, ``<region>_mask.png``, ``<region>_list.txt`` and
        ``mean.binaryproto`` (the training band's per-channel mean as a P×P image).
    patch_size : int
        Side P of the mean image (the training patch size).
    gap : int
        Rows left out between bands.
    overwrite : bool
        Replace files that already exist (default: refuse).

    Returns
    -------
    PreparedData
    """
    regions = split_regions(rgb.shape[0], gap=gap)
    lists = write_region_lists(rgb, mask, regions, out_dir, overwrite=overwrite)
    mean_file = Path(out_dir) / "mean.binaryproto"
    write_mean_binaryproto(mean_file, compute_mean_image([rgb[regions["train"]]], patch_size=patch_size),
                           overwrite=overwrite)
    return PreparedData(regions=regions, lists=lists, mean_file=mean_file)
