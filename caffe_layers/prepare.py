"""Data preparation for the stain-robustness experiment: region split and stain shifts.

Pure numpy (no Caffe). The split is spatial -- horizontal bands of one slide region with a
gap between them -- so no training patch overlaps validation or test tissue.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import optimize

from .stain import channel_mean_ratios
from .transforms import BatchAugmenter, draw_params

__all__ = ["REGION_NAMES", "split_regions", "write_region_lists", "shift_stains", "prepare_main",
           "fit_stain_shift", "STAIN_SHIFTS", "make_stain_shifts"]

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


def write_region_lists(rgb, mask, regions, out_dir):
    """Write each region's image and mask as PNG, and a PatchDataLayer list file per region.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    mask : (H, W) array, nucleus > 0
    regions : dict of str -> slice
        Row slices, as from :func:`split_regions`.
    out_dir : path

    Returns
    -------
    dict of str -> Path
        The list file of each region (lines ``<name>.png <name>_mask.png``, relative to it).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lists = {}
    for name, rows in regions.items():
        Image.fromarray(np.ascontiguousarray(rgb[rows])).save(out_dir / f"{name}.png")
        Image.fromarray((np.asarray(mask[rows]) > 0).astype(np.uint8) * 255).save(out_dir / f"{name}_mask.png")
        lists[name] = out_dir / f"{name}_list.txt"
        lists[name].write_text(f"{name}.png {name}_mask.png\n")
    return lists


def shift_stains(rgb, alpha, beta=(0.0, 0.0, 0.0)):
    """Re-stain an RGB image in haematoxylin-eosin-DAB space: ``s' = alpha*s + beta``.

    The same stain-space transform as the augmentation layer's ``hed`` jitter, with fixed
    factors instead of random ones, so a test shift and the training augmentation speak
    the same language.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    alpha, beta : 3 floats
        Scale and offset of the H, E and DAB concentrations.

    Returns
    -------
    (H, W, 3) uint8 array
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"shift_stains needs an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    batch = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
    augmenter = BatchAugmenter(hed=True, seed=0)
    identity = draw_params(1, batch.shape[1:], np.random.default_rng(0), augmenter.params)
    draws = dataclasses.replace(identity, hed_applied=np.array([True]),
                                alpha=np.asarray(alpha, float).reshape(1, 3),
                                beta=np.asarray(beta, float).reshape(1, 3))
    shifted, _ = augmenter(batch, draws=draws)
    return np.clip(np.rint(shifted[0].transpose(1, 2, 0)), 0, 255).astype(np.uint8)


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


def prepare_main(argv=None):
    """``caffe-stain-prepare``: the packaged H&E split into the files the templates read."""
    import argparse

    from . import datasets

    parser = argparse.ArgumentParser(
        prog="caffe-stain-prepare",
        description="Write hgsc_nest (histolytics) as train/val/test bands with nucleus masks, "
                    "their PatchDataLayer list files and a mean file: what prototxt/ expects in data/.")
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--patch-size", type=int, default=96, help="side of the mean image (default 96)")
    parser.add_argument("--gap", type=int, default=16, help="rows left out between bands (default 16)")
    args = parser.parse_args(argv)
    try:
        rgb, instances = datasets.load_hgsc_nest()
    except datasets.DataPackageMissing as error:
        parser.exit(1, f"caffe-stain-prepare: error: {error}\n")
    regions = split_regions(rgb.shape[0], gap=args.gap)
    lists = write_region_lists(rgb, datasets.nucleus_mask(instances), regions, args.out)
    from .meanfile import compute_mean_image, write_mean_binaryproto

    mean_path = Path(args.out) / "mean.binaryproto"
    write_mean_binaryproto(mean_path, compute_mean_image([rgb[regions["train"]]], patch_size=args.patch_size))
    for name, path in lists.items():
        rows = regions[name]
        print(f"{name}: rows {rows.start}-{rows.stop} -> {path}")
    print(f"mean file -> {mean_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(prepare_main())
