"""``caffe-stain-segment``: segment nuclei in RGB images with a Caffe deploy net, tile by tile."""
import argparse
import sys

from ..net.engines import make_segmenter
from ..net.segment import segment_files
from ..tiling import dihedral_tta
from . import (add_engine_argument, add_model_card_arguments, add_tiling_arguments, check_tiling_arguments,
               effective_overlap, engine_log, model_card_from_args, run)

__all__ = ["main"]


def main(argv=None):
    """Segment images; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-segment",
        description="Segment nuclei in RGB images with a Caffe deploy net, tile by tile.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="RGB images (PNG, TIFF, ...)")
    parser.add_argument("--model", required=True, help="deploy prototxt (its conventions: --card or the flags below)")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--out", required=True, help="output directory")
    add_tiling_arguments(parser)
    add_model_card_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--prob-format", choices=("png", "npy"), default="png",
                        help="nucleus probability as a uint8 PNG or as a float32 .npy of the image's size")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def body():
        check_tiling_arguments(args)
        card = model_card_from_args(args)
        segmenter = make_segmenter(args.model, args.weights, args.engine, tile=args.tile,
                                   multiple=card.size_multiple, batch=args.batch_tiles, log=engine_log(parser.prog),
                                   card=card)
        overlap = effective_overlap(args, segmenter, parser.prog)
        predict = dihedral_tta(segmenter) if args.tta else segmenter
        written = segment_files(predict, args.images, args.out, tile=args.tile, overlap=overlap,
                                threshold=args.threshold, multiple=card.size_multiple, prob_format=args.prob_format,
                                progress=not args.no_progress, overwrite=args.overwrite, batch_size=args.batch_tiles)
        for files in written:
            print(f"{files['name']}: {files['mask']}")

    return run(parser.prog, body, interrupted=lambda _: "outputs already written are complete; none is partial")


if __name__ == "__main__":
    sys.exit(main())
