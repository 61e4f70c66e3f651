"""``caffe-stain-compare``: compare segmenters on images, as they are and stain-matched.

The nets run in pycaffe or, without it, in OpenCV (``--engine``); the engines are imported once
the arguments are parsed, so ``--help`` needs neither.
"""
import argparse
import sys
from pathlib import Path

from ..image_io import read_rgb
from ..model_card import load_model_card
from ..tiling import DEFAULT_OVERLAP
from . import (UsageError, add_engine_argument, add_instance_arguments, add_tiling_arguments, check_output_folder,
               check_tiling_arguments, engine_log, instance_options, run)

__all__ = ["main"]


class _ImageAction(argparse.Action):
    """``--image`` starts an entry; a following ``--mask`` attaches to it."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = getattr(namespace, "entries", None) or []
        if self.dest == "image":
            entries.append([value, None])
        else:
            if not entries:
                parser.error("--mask must follow the --image it belongs to")
            if entries[-1][1] is not None:
                parser.error(f"two masks for image {entries[-1][0]}")
            entries[-1][1] = value
        namespace.entries = entries


def main(argv=None):
    """Compare models; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-compare",
        description="Segment images with several Caffe nets, optionally after histogram "
                    "matching to a template, and write pooled scores, tables and figures.")
    parser.add_argument("--model", nargs="+", action="append", required=True,
                        metavar="NAME DEPLOY WEIGHTS [CARD]",
                        help="a model: its name, deploy prototxt, weights and optionally its YAML/JSON model card")
    parser.add_argument("--image", action=_ImageAction, required=True, help="RGB image")
    parser.add_argument("--mask", action=_ImageAction,
                        help="ground truth of the preceding --image: a mask (nucleus > 0), or nucleus instances -- "
                             "a label image whose foreground holds several values (e.g. 16-bit, 0 background) or "
                             "an Aperio ImageScope .xml -- which adds AJI and PQ to the scores")
    parser.add_argument("--template", help="RGB template for histogram matching")
    parser.add_argument("--out", required=True, help="output directory")
    add_tiling_arguments(parser)
    parser.add_argument("--multiple", dest="size_multiple", type=int, default=None,
                        help="input sides must be multiples of this, for models without a card (default 1)")
    add_engine_argument(parser)
    add_instance_arguments(parser, "also write each model's predicted instances as 16-bit labels, "
                                   "instances/<image>_<condition>_<model>.png (the parameters below also make the "
                                   "instances scored against instance ground truth)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tables, summary and figures of an earlier comparison in --out")
    args = parser.parse_args(argv)

    def body():
        from ..annotations import read_ground_truth
        from ..net.inference.compare import ModelSpec, compare_models

        check_tiling_arguments(args)
        check_output_folder(args.out)
        instances = instance_options(args)
        models = []
        for entry in args.model:
            if len(entry) not in (3, 4):
                raise UsageError(f"--model takes NAME DEPLOY WEIGHTS [CARD], got {len(entry)} values: {' '.join(entry)}")
            name, deploy, weights = entry[:3]
            card = load_model_card(entry[3] if len(entry) == 4 else None,
                                   size_multiple=None if len(entry) == 4 else args.size_multiple)
            models.append(ModelSpec(name, Path(deploy), Path(weights), card))
        images = []
        for image_path, mask_path in args.entries:
            rgb = read_rgb(image_path, memmap=True)  # large uncompressed TIFFs stay on disk
            truth = None if mask_path is None else read_ground_truth(mask_path, rgb.shape[:2])
            images.append((Path(image_path).stem, rgb, truth))
        template = None if args.template is None else read_rgb(args.template)
        summary = compare_models(models, images, args.out, template_rgb=template,
                                 tile=args.tile, overlap=DEFAULT_OVERLAP if args.overlap is None else args.overlap,
                                 threshold=args.threshold,
                                 figures=not args.no_figures, tta=args.tta, batch_size=args.batch_tiles,
                                 engine=args.engine, engine_log=engine_log(parser.prog),
                                 overwrite=args.overwrite, instances=instances, instance_labels=args.instances,
                                 inputs=[path for entry in args.entries for path in entry if path is not None]
                                 + ([args.template] if args.template else []))
        print((Path(args.out) / summary["files"]["table_md"]).read_text(), end="")

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
