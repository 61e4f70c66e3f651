"""``caffe-stain-segment``: segment nuclei in RGB images with a Caffe deploy net, tile by tile."""
import argparse
import sys

from ..net.engines import make_segmenter
from ..net.segment import segment_files
from . import add_engine_argument, add_tiling_arguments, check_tiling_arguments, engine_log, run

__all__ = ["main"]


def main(argv=None):
    """Segment images; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-segment",
        description="Segment nuclei in RGB images with a Caffe deploy net, tile by tile.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="RGB images (PNG, TIFF, ...)")
    parser.add_argument("--model", required=True, help="deploy prototxt (input 'data', output 'prob')")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--out", required=True, help="output directory")
    add_tiling_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--prob-format", choices=("png", "npy"), default="png")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def body():
        check_tiling_arguments(args)
        segmenter = make_segmenter(args.model, args.weights, args.engine, tile=args.tile, multiple=args.multiple,
                                   log=engine_log(parser.prog))
        written = segment_files(segmenter, args.images, args.out, tile=args.tile, overlap=args.overlap,
                                threshold=args.threshold, multiple=args.multiple, prob_format=args.prob_format,
                                progress=not args.no_progress, overwrite=args.overwrite)
        for files in written:
            print(f"{files['name']}: {files['mask']}")

    return run(parser.prog, body, interrupted=lambda _: "outputs already written are complete; none is partial")


if __name__ == "__main__":
    sys.exit(main())
