"""``caffe-stain-meanfile``: the mean of a list file's images (RGB) or of a Datum LMDB's (in its
stored channel order, BGR for Caffe/DIGITS databases, as Caffe's ``compute_image_mean``) as a
Caffe ``.binaryproto``."""
import argparse
import sys
from pathlib import Path

from ..image_io import read_rgb, same_file
from ..patches import compute_mean_image, read_pair_list
from . import UsageError, run

__all__ = ["main"]


def main(argv=None):
    """Write the mean file; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-meanfile",
        description="Compute a mean file (1×3×H×W .binaryproto) from the images of an 'image mask' "
                    "list file (RGB, for this package's templates) or of a Datum LMDB (in the database's "
                    "channel order -- BGR for caffe-stain-lmdb's default and DIGITS databases -- as Caffe's "
                    "compute_image_mean writes it for a Data layer's transform_param mean_file).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", help="list file, one 'image mask' pair per line "
                        "(paths relative to the list file's directory), as for PatchDataLayer")
    source.add_argument("--lmdb", help="Datum LMDB folder of raw images (caffe-stain-lmdb's output, a "
                        "segmentation database's images/), e.g. the train database of a Data layer")
    parser.add_argument("--output", required=True, help="output .binaryproto")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="training patch side: write the per-channel mean as a P×P image "
                             "(default: per-pixel mean; all images must then have the same size)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    def body():
        from ..net.meanfile import write_mean_binaryproto  # protobuf only: no Caffe needed

        output = Path(args.output)
        if output.suffix.lower() != ".binaryproto":
            raise UsageError(f"{output}: the output must be a .binaryproto file")
        if args.patch_size is not None and not 1 <= args.patch_size <= 8192:
            raise UsageError(f"--patch-size must be in [1, 8192]; got {args.patch_size}")
        if args.lmdb is not None:
            from ..net.proto import require_pycaffe

            require_pycaffe("caffe-stain-meanfile --lmdb")  # caffe_layers.net.training loads the training loop
            from ..net.training.datum_lmdb import iter_datums

            database = Path(args.lmdb)
            if not (database / "data.mdb").is_file():
                raise UsageError(f"--lmdb {database}: not an LMDB database folder (no data.mdb)")
            if database.resolve() in output.resolve().parents:
                raise UsageError(f"{output}: the output would be written inside the database {database}")

            def images():
                for key, array, _ in iter_datums(database):
                    if array.ndim != 3 or array.shape[0] != 3:
                        raise ValueError(f"{database}: entry {key} holds a {array.shape[0]}-channel "
                                         "image; a mean file is made from the 3-channel image database")
                    yield array.transpose(1, 2, 0)

            source, names, order, what = images(), None, "database-order", "entries"
        else:
            # The data layer's own list reader and image reader, so both see the same pixels.
            pairs = read_pair_list(args.list)
            if any(same_file(output, p) for p in [args.list, *(p for pair in pairs for p in pair)]):
                raise UsageError(f"{output}: the output would replace the list file or one of its images")
            source = (read_rgb(image) for image, _ in pairs)
            names, order, what = [str(image) for image, _ in pairs], "RGB", "images"
        if output.exists() and not args.overwrite:
            raise UsageError(f"{output}: already exists (use --overwrite to replace it)")
        count = 0

        def counted():
            nonlocal count
            for image in source:
                count += 1
                yield image

        mean = compute_mean_image(counted(), args.patch_size, names=names)
        write_mean_binaryproto(output, mean, overwrite=args.overwrite)
        channel_mean = ", ".join(f"{value:.2f}" for value in mean.mean(axis=(1, 2)))
        print(f"wrote {output}: 1×{mean.shape[0]}×{mean.shape[1]}×{mean.shape[2]}, "
              f"{order} channel means {channel_mean} from {count} {what}")

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
