"""Benchmark caffe_layers.stain on a 2000x2000x3 uint8 H&E image.

The image is the real ``hgsc_nest.jpg`` (histolytics data package) mirrored-tiled
to 2000x2000; the reference is the tiatoolbox ``target_image.png``. Times are
medians of several repeats (``timeit.repeat``, one call each).

    python scripts/benchmark_stain.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skimage.exposure import match_histograms as skimage_match_histograms  # noqa: E402

from caffe_layers import datasets, stain  # noqa: E402


def tiled_he(size=2000):
    """Real H&E tile grown to ``size x size`` by mirror-tiling (no synthetic pixels)."""
    rgb, _ = datasets.load_hgsc_nest()
    reps = (-(-size // rgb.shape[0]), -(-size // rgb.shape[1]))
    rows = [np.concatenate([rgb if j % 2 == 0 else rgb[:, ::-1] for j in range(reps[1])], axis=1)
            for _ in range(reps[0])]
    grown = np.concatenate([row if i % 2 == 0 else row[::-1] for i, row in enumerate(rows)], axis=0)
    return np.ascontiguousarray(grown[:size, :size])


def median_seconds(function, repeats):
    function()  # warm-up (imports, caches)
    return float(np.median(timeit.repeat(function, number=1, repeat=repeats)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    image = tiled_he(2000)
    reference = datasets.load_stained_examples()["tiatoolbox_target"]
    print(f"image {image.shape} {image.dtype} (tiled hgsc_nest), reference {reference.shape}")
    print(f"tissue fraction: image {stain.tissue_mask(image).mean():.3f}, "
          f"reference {stain.tissue_mask(reference).mean():.3f}; repeats={args.repeats}\n")

    timings = {
        "skimage.exposure.match_histograms": lambda: skimage_match_histograms(
            image, reference, channel_axis=-1),
        "match_histograms (unmasked)": lambda: stain.match_histograms(image, reference),
        "match_histograms (ignore_white)": lambda: stain.match_histograms(
            image, reference, ignore_white=True),
        "match_histograms (nbins=64)": lambda: stain.match_histograms(
            image, reference, nbins=64),
        "tissue_mask": lambda: stain.tissue_mask(image),
        "ReinhardNormalizer fit+transform": lambda: stain.ReinhardNormalizer().fit(
            reference).transform(image),
        "MacenkoNormalizer fit+transform": lambda: stain.MacenkoNormalizer().fit(
            reference).transform(image),
    }
    seconds = {name: median_seconds(function, args.repeats) for name, function in timings.items()}
    for name, value in seconds.items():
        print(f"{name:<36} {value * 1e3:9.1f} ms")

    speedup = seconds["skimage.exposure.match_histograms"] / seconds["match_histograms (unmasked)"]
    masked_cost = (seconds["match_histograms (ignore_white)"]
                   / seconds["match_histograms (unmasked)"])
    print()
    print(f"{'ratio':<36} {'measured':>9}   goal")
    print(f"{'skimage / ours (unmasked)':<36} {speedup:8.2f}x   >= 2x   "
          f"{'OK' if speedup >= 2 else 'MISSED'}")
    print(f"{'ours masked / unmasked':<36} {masked_cost:8.2f}x   <= 1.3x "
          f"{'OK' if masked_cost <= 1.3 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
