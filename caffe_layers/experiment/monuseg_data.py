"""The MoNuSeg benchmark's data: tiles split by tissue source site, resampled to the training scale.

Training and validation come from the 30 official training tiles only: validation is made of
whole tissue source sites (hospitals) held out of training, so every choice made on it is a
choice made on unseen labs. The 14 official test tiles are only scored, once, for the final
table. Tiles are resampled to the benchmark's micrometres per pixel (MoNuSeg is scanned at
~0.25 µm/px, 40×) and written as PatchDataLayer image/mask pairs; the ground truth for scoring
stays at the tiles' own resolution.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ..image_io import write_atomic, write_image
from ..monuseg import DEFAULT_MPP, find_tiles
from ..net.meanfile import write_mean_binaryproto
from ..patches import compute_mean_image
from ..resolution import resample_probability, resample_rgb  # noqa: F401 - also this module's names

__all__ = ["MonusegData", "ScaledTile", "prepare_monuseg", "resample_rgb", "resample_probability",
           "separate_touching", "split_by_site"]

@dataclasses.dataclass(frozen=True)
class ScaledTile:
    """One tile, as the benchmark uses it.

    ``rgb``: (h, w, 3) uint8 at the training scale; ``truth``: (H, W) int32 instance labels at
    the tile's own resolution (scores are computed there); ``native_shape``: (H, W).
    """

    name: str
    organ: str
    site: str
    rgb: np.ndarray
    truth: np.ndarray

    @property
    def native_shape(self):
        return self.truth.shape


@dataclasses.dataclass(frozen=True)
class MonusegData:
    """The three splits (name -> ScaledTile), the training lists and the training mean file."""

    train: dict
    val: dict
    test: dict
    lists: dict
    mean_file: Path


def split_by_site(tiles, val_sites):
    """Training tiles of the sites in ``val_sites`` form validation; the others train.

    Returns (train, val, test): lists of :class:`~caffe_layers.monuseg.MonusegTile`.
    """
    train_tiles = [t for t in tiles if t.split == "train"]
    known = {t.site for t in train_tiles}
    unknown = sorted(set(val_sites) - known)
    if unknown:
        raise ValueError(f"validation site(s) {', '.join(unknown)} are not among the training tiles' "
                         f"sites ({', '.join(sorted(known))})")
    val = [t for t in train_tiles if t.site in val_sites]
    train = [t for t in train_tiles if t.site not in val_sites]
    test = [t for t in tiles if t.split == "test"]
    if not train or not val or not test:
        raise ValueError(f"the split leaves {len(train)} training, {len(val)} validation and {len(test)} test "
                         "tiles; each needs at least one")
    return train, val, test


def resample_labels(labels, shape):
    """Instance labels to ``shape`` by nearest neighbour (ids are not averaged)."""
    if labels.shape == tuple(shape):
        return labels
    return cv2.resize(labels.astype(np.int32).astype(np.float32), (shape[1], shape[0]),
                      interpolation=cv2.INTER_NEAREST).astype(np.int32)


def separate_touching(labels):
    """Foreground mask with a 1-px background line between touching nuclei.

    A binary net cannot tell two touching nuclei apart if its labels join them; removing the
    pixels that touch another instance teaches it to leave a gap, which the instance step then
    keeps. (H, W) int labels -> (H, W) bool.
    """
    labels = np.asarray(labels)
    higher = ndimage.grey_dilation(labels, size=3) > labels
    lower = ndimage.grey_erosion(np.where(labels > 0, labels, np.iinfo(np.int32).max), size=3) < labels
    return (labels > 0) & ~(higher | lower)


def _scaled_tile(tile, mpp):
    rgb, truth = tile.load()
    scale = (tile.mpp or DEFAULT_MPP) / mpp
    return ScaledTile(name=tile.name, organ=tile.organ, site=tile.site, rgb=resample_rgb(rgb, scale),
                      truth=truth.astype(np.int32))


def _training_mask(tile, touching_gap):
    labels = resample_labels(tile.truth, tile.rgb.shape[:2])
    return separate_touching(labels) if touching_gap else labels > 0


def _write_pairs(tiles, folder, touching_gap):
    """Each tile as ``<name>.png`` + ``<name>_mask.png``; returns the list file's text."""
    lines = []
    for tile in tiles.values():
        write_image(folder / f"{tile.name}.png", tile.rgb, overwrite=True)
        mask = _training_mask(tile, touching_gap).astype(np.uint8) * 255
        write_image(folder / f"{tile.name}_mask.png", mask, overwrite=True)
        lines.append(f"{tile.name}.png {tile.name}_mask.png\n")
    return "".join(lines)


def prepare_monuseg(root, out_dir, *, mpp, val_sites, patch_size, touching_gap=True, limit=0):
    """Load the tiles, split them by site, resample them and write the training files.

    Parameters
    ----------
    root : path
        The MoNuSeg download (see :func:`caffe_layers.monuseg.find_tiles`).
    out_dir : path
        Gets ``<name>.png``/``<name>_mask.png`` of every training and validation tile,
        ``train_list.txt``, ``val_list.txt`` and ``mean.binaryproto`` (P×P).
    mpp : float
        Training scale, µm per pixel.
    val_sites : sequence of str
        Tissue source sites of the training tiles held out for validation.
    patch_size : int
        Side P of the mean image.
    touching_gap : bool
        Train on masks with a gap between touching nuclei (:func:`separate_touching`).
    limit : int
        > 0: only the first ``limit`` tiles of each split (smoke runs).

    Returns
    -------
    MonusegData
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = split_by_site(find_tiles(root), tuple(val_sites))
    if limit:
        splits = [tiles[:limit] for tiles in splits]
    train, val, test = ({t.name: _scaled_tile(t, mpp) for t in tiles} for tiles in splits)
    lists = {}
    for name, tiles in (("train", train), ("val", val)):
        text = _write_pairs(tiles, out_dir, touching_gap)
        lists[name] = out_dir / f"{name}_list.txt"
        write_atomic(lists[name], lambda tmp, text=text: Path(tmp).write_text(text), overwrite=True)
    mean_file = out_dir / "mean.binaryproto"
    write_mean_binaryproto(mean_file, compute_mean_image([t.rgb for t in train.values()], patch_size=patch_size),
                           overwrite=True)
    return MonusegData(train=train, val=val, test=test, lists=lists, mean_file=mean_file)
