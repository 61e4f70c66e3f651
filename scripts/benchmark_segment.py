"""Whole-image segmentation: seconds per megapixel and peak memory, by image size.

Each size runs in its own process (peak RSS is per process), on the real hgsc_nest H&E
mirror-tiled to the size, through ``caffe-stain-segment``'s library path (streamed tiles).

    .venv/bin/python scripts/benchmark_segment.py --model results/models/patchmean_aug/deploy.prototxt \
        --weights results/models/patchmean_aug/weights.caffemodel --sizes 1000 2000 4000
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _child(model, weights, size, tile, overlap):
    os.environ.setdefault("GLOG_minloglevel", "2")
    import numpy as np

    from caffe_layers.datasets import load_hgsc_nest
    from caffe_layers.net.predictor import CaffeSegmenter
    from caffe_layers.tiling import segment_tiled

    rgb, _ = load_hgsc_nest()
    reps = -(-size // rgb.shape[0])
    image = np.pad(rgb, ((0, rgb.shape[0] * (reps - 1)), (0, rgb.shape[1] * (reps - 1)), (0, 0)),
                   mode="symmetric")[:size, :size]
    segmenter = CaffeSegmenter(model, weights)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prob = segment_tiled(segmenter, image, tile=tile, overlap=overlap, multiple=4)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(size=size, seconds=elapsed, s_per_mpx=elapsed / (size * size / 1e6),
                          peak_rss_mb=peak / 1024, rss_before_mb=before / 1024,
                          image_mb=image.nbytes / 2**20, prob_mb=prob.nbytes / 2**20)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.model, args.weights, args.child, args.tile, args.overlap)
        return 0
    print(f"{'size':>6} {'s':>8} {'s/Mpx':>7} {'peak RSS MB':>12} {'image MB':>9} {'prob MB':>8}")
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--weights", args.weights,
                              "--tile", str(args.tile), "--overlap", str(args.overlap), "--child", str(size)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{size:>6} {row['seconds']:8.1f} {row['s_per_mpx']:7.2f} {row['peak_rss_mb']:12.0f} "
              f"{row['image_mb']:9.0f} {row['prob_mb']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
