"""``caffe-stain-prepare``: the packaged H&E split into the files the U-Net templates read."""
import argparse
import sys
from pathlib import Path

from .. import sample_data
from . import UsageError, pycaffe_status, run

__all__ = ["main"]


def main(argv=None):
    """Write the bands, list files and mean file; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-prepare",
        description="Write hgsc_nest (histolytics) as train/val/test bands with nucleus masks, "
                    "their PatchDataLayer list files and a mean file: what prototxt/ expects in data/.")
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--patch-size", type=int, default=96, help="side of the mean image (default 96)")
    parser.add_argument("--gap", type=int, default=16, help="rows left out between bands (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier run")
    args = parser.parse_args(argv)
    if pycaffe_status(parser.prog):  # its files are the Caffe templates' training data
        return 2
    from ..experiment.regions import prepare_data

    def body():
        if not 1 <= args.patch_size <= 1024:
            raise UsageError(f"--patch-size must be in [1, 1024]; got {args.patch_size}")
        if not 0 <= args.gap <= 256:
            raise UsageError(f"--gap must be in [0, 256]; got {args.gap}")
        rgb, instances = sample_data.load_hgsc_nest()
        prepared = prepare_data(rgb, sample_data.nucleus_mask(instances), args.out, patch_size=args.patch_size,
                                gap=args.gap, overwrite=args.overwrite)
        for name, path in prepared.lists.items():
            rows = prepared.regions[name]
            print(f"{name}: rows {rows.start}-{rows.stop} -> {path}")
        print(f"mean file -> {Path(prepared.mean_file)}")

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
