"""``caffe-stain-lmdb``: Caffe ``Datum`` LMDBs for Caffe's own ``Data`` layer (``backend: LMDB``).

::

    caffe-stain-lmdb segmentation --list train.txt --output train_db        # train_db/{images,labels}
    caffe-stain-lmdb classification --folder photos/ --output train_lmdb   # + labels.txt beside it
    caffe-stain-lmdb classification --list train.txt --output train_lmdb   # 'image label' lines
"""
import argparse
import re
import sys
from pathlib import Path

from ..patches import read_pair_list
from . import UsageError, pycaffe_status, run

__all__ = ["main"]

PROG = "caffe-stain-lmdb"

#: caffe_layers.net.training.datum_lmdb.CHANNEL_ORDERS, repeated so that --help needs no Caffe.
CHANNEL_ORDERS = ("BGR", "RGB")


def _size(text):
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW (height x width, e.g. 256x256); got {text!r}")
    size = int(match.group(1)), int(match.group(2))
    if not all(1 <= side <= 16384 for side in size):
        raise argparse.ArgumentTypeError(f"sides must be in [1, 16384]; got {text!r}")
    return size


def _common(parser):
    parser.add_argument("--output", required=True, help="database folder to create")
    parser.add_argument("--channel-order", type=str.upper, choices=CHANNEL_ORDERS, default=CHANNEL_ORDERS[0],
                        help="channel order of the stored images (default BGR: what Caffe's convert_imageset "
                             "and DIGITS write and classic Caffe models expect; this package's U-Net "
                             "templates take RGB)")
    parser.add_argument("--resize", type=_size, metavar="HxW",
                        help="resize every image to H×W (bilinear; masks nearest-neighbour); without it all "
                             "images must have one size")
    parser.add_argument("--shuffle", action="store_true",
                        help="write the entries in a random order (Caffe's Data layer reads in key order)")
    parser.add_argument("--seed", type=int, default=None, help="seed of --shuffle (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing database")


def main(argv=None):
    """Write the database(s); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Write Caffe Datum LMDBs (raw uint8 pixels, C×H×W) from image files, "
                               "for Caffe's Data layer with backend: LMDB.")
    commands = parser.add_subparsers(dest="kind", required=True, metavar="{segmentation,classification}")
    seg = commands.add_parser(
        "segmentation", help="an 'image mask' list file -> OUTPUT/images and OUTPUT/labels",
        description="An 'image mask' list file -> an image LMDB (OUTPUT/images, 3×H×W) and an aligned label "
                    "LMDB (OUTPUT/labels, 1×H×W class indices, mask > 0 -> 1) under the same keys, in list "
                    "order (or --shuffle order).")
    seg.add_argument("--list", required=True, help="list file, one 'image mask' pair per line (paths relative "
                                                   "to the list file's folder), as for PatchDataLayer")
    _common(seg)
    cls = commands.add_parser(
        "classification", help="ROOT/<class>/images or an 'image label' list file -> one LMDB",
        description="Labelled images -> one LMDB (Datum.label set). From --folder ROOT/<class>/<images>: class "
                    "names sorted -> labels 0, 1, ... (as convert_imageset and DIGITS), names written to "
                    "labels.txt in the output's folder. From --list: 'image label' lines.")
    source = cls.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="ROOT holding one subfolder of images per class")
    source.add_argument("--list", help="list file, one 'image label' line per image (label an integer >= 0; "
                                       "paths relative to the list file's folder)")
    _common(cls)
    args = parser.parse_args(argv)
    if pycaffe_status(PROG):  # caffe_layers.net.training loads the training loop
        return 2
    from ..net.training.datum_lmdb import (check_output, class_folder_items, read_label_list,
                                           write_classification_lmdb, write_segmentation_lmdbs)

    def body():
        if args.seed is not None and not args.shuffle:
            raise UsageError("--seed is only used with --shuffle")
        if args.seed is not None and args.seed < 0:
            raise UsageError(f"--seed must be >= 0; got {args.seed}")
        output = check_output(args.output, args.overwrite)  # before reading any image
        options = dict(channel_order=args.channel_order, resize=args.resize, shuffle=args.shuffle,
                       seed=args.seed or 0, overwrite=args.overwrite)
        if args.kind == "segmentation":
            summaries = write_segmentation_lmdbs(read_pair_list(args.list), output, **options)
        else:
            if args.folder is not None:
                root = Path(args.folder).resolve()
                if root == output.resolve() or root in output.resolve().parents:
                    raise UsageError(f"{output}: the database would be inside the class folder {args.folder} "
                                     f"(and become a class of the next build); write it elsewhere")
                items, names = class_folder_items(args.folder)
            else:
                items, names = read_label_list(args.list), None
            summaries = [write_classification_lmdb(items, output, class_names=names, **options)]
        for summary in summaries:
            print(summary)

    return run(PROG, body, interrupted=lambda _: f"nothing was written to {args.output} "
                                               f"(the partial build was removed)")


if __name__ == "__main__":
    sys.exit(main())
