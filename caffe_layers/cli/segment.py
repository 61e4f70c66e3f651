"""``caffe-stain-segment``: segment nuclei in RGB images and whole slides with a Caffe deploy net, tile by tile.

The net runs in pycaffe or, without it, in OpenCV (``--engine``); the engines are imported once
the arguments are parsed, so ``--help`` needs neither.
"""
import argparse
import math
import sys
from pathlib import Path

from ..image_io import image_shape, same_file
from ..tiling import DEFAULT_OVERLAP, dihedral_tta
from ..wsi.pipeline import DEFAULT_BLOCK, SlideSettings, find_slides, slide_name, slide_outputs
from ..wsi.reader import is_slide, open_slide
from . import (UsageError, add_engine_argument, add_instance_arguments, add_model_card_arguments,
               add_tiling_arguments, check_output_folder, check_tiling_arguments, check_white_threshold,
               effective_overlap, engine_log, instance_options, model_card_from_args, run)

__all__ = ["main"]


def _split_inputs(entries):
    """(plain images, slides): folders give their slides; other files go by is_slide."""
    images, slides = [], []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = find_slides([path])
            if not found:
                raise UsageError(f"{path}: folder contains no whole slides (.svs, pyramidal .tif/.tiff, "
                                 "OpenSlide formats)")
            slides += found
        elif path.is_file() and is_slide(path):
            slides.append(path)
        else:
            images.append(entry)
    return images, slides


def _check_image_mpp(value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"--image-mpp must be a positive number of micrometres per pixel; got {value}")


def _probe_side(args, images, slides):
    """The largest tile side the run will feed the net: ``--tile``, but no larger than the largest
    image (a tile is cut to the image) or a slide's block and its margins, so that the engine's
    probe of ``--batch-tiles`` tiles is not larger than the work itself."""
    sides = []
    for image in images:
        try:
            sides.append(max(image_shape(image)))
        except (OSError, ValueError):  # reported, naming the file, when it is segmented
            sides.append(args.tile)
    if slides:
        sides.append(args.block + 2 * (DEFAULT_OVERLAP if args.overlap is None else args.overlap))
    from ..net.inference.engines import probe_side

    return probe_side(args.tile, sides)


def main(argv=None):
    """Segment images and slides; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-segment",
        description="Segment nuclei in RGB images and whole slides with a Caffe deploy net, tile by tile. "
                    "Slides (.svs, pyramidal .tif/.tiff, OpenSlide formats, or folders of them) are read "
                    "block by block at the pyramid level matching the model's mpp, glass is skipped, and the "
                    "outputs are a pyramidal mask TIFF, a GeoJSON of nuclei and a summary; an interrupted "
                    "run resumes when the same command is run again.")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="RGB images (PNG, TIFF, ...), whole slides, or folders of slides")
    parser.add_argument("--model", required=True, help="deploy prototxt (its conventions: --card or the flags below)")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--out", required=True, help="output directory")
    add_tiling_arguments(parser)
    add_model_card_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--prob-format", choices=("png", "npy"), default="png",
                        help="images: nucleus probability as a uint8 PNG or as a float32 .npy of the image's size")
    parser.add_argument("--image-mpp", type=float, default=None, metavar="MPP",
                        help="images: their micrometres per pixel, instead of what their files record (TIFF "
                             "resolution tags, PNG pHYs). With an mpp in the model card (or --mpp) each image is "
                             "resampled to it, segmented, and its outputs written at the image's own size")
    add_instance_arguments(parser, "images: also write <name>_instances.png, nucleus instances as 16-bit labels "
                                   "(0 background, 1..N); slides always write <name>_nuclei.geojson")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--no-progress", action="store_true")
    slides = parser.add_argument_group("whole slides")
    slides.add_argument("--workers", type=int, default=None,
                        help="segment on a local dask cluster of N single-threaded worker processes "
                             "(default: in this process)")
    slides.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="segment on a running dask cluster (e.g. tcp://10.0.0.5:8786); its workers must "
                             "see the slides and the model files")
    slides.add_argument("--prob-tiff", action="store_true",
                        help="also write the nucleus probability as a uint8 pyramidal TIFF (<name>_prob.tif)")
    slides.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                        help=f"side of a unit of work, in pixels (default {DEFAULT_BLOCK})")
    slides.add_argument("--white-threshold", type=float, default=200.0,
                        help="tissue is where the mean of R, G, B is at or below this (default 200); "
                             "tiles without tissue are written as background without running the net")
    slides.add_argument("--restart", action="store_true",
                        help="discard the progress of an interrupted run instead of resuming it")
    args = parser.parse_args(argv)
    state = {"slides": [], "out": args.out}

    def body():
        check_tiling_arguments(args)
        check_output_folder(args.out)
        if args.workers is not None and args.scheduler is not None:
            raise UsageError("give --workers or --scheduler, not both")
        if args.workers is not None and not 1 <= args.workers <= 1024:
            raise UsageError(f"--workers must be in [1, 1024]; got {args.workers}")
        if not 16 <= args.block <= 16384:
            raise UsageError(f"--block must be in [16, 16384]; got {args.block}")
        check_white_threshold(args)
        _check_image_mpp(args.image_mpp)
        parameters = instance_options(args)  # checked with or without --instances
        instances = parameters if args.instances else None
        images, slides = _split_inputs(args.images)
        state["slides"] = slides
        if not slides and (args.workers is not None or args.scheduler is not None or args.prob_tiff):
            raise UsageError("--workers, --scheduler and --prob-tiff apply to whole slides; no input is one")
        if not images and (instances is not None or args.image_mpp is not None):
            raise UsageError("--instances and --image-mpp apply to plain images; no input is one (slides: "
                             "<name>_nuclei.geojson, at the pyramid level nearest to the model's mpp)")
        for slide in slides:  # a corrupt slide or an existing output is refused before any net is loaded
            open_slide(slide).close()
            for output in slide_outputs(args.out, slide_name(slide), args.prob_tiff).values():
                for given in [*images, *slides]:  # e.g. an image case_pred.tif beside the slide case.svs
                    if same_file(output, given):
                        raise UsageError(f"{output}: the output of slide {slide} would replace the input {given}; "
                                         "choose another --out")
                if output.exists() and not args.overwrite:
                    raise FileExistsError(f"{output}: already exists (use --overwrite to replace it)")
        card = model_card_from_args(args)
        from ..net.inference.engines import make_segmenter

        segmenter = make_segmenter(args.model, args.weights, args.engine, tile=_probe_side(args, images, slides),
                                   multiple=card.size_multiple, batch=args.batch_tiles, log=engine_log(parser.prog),
                                   card=card)
        overlap = effective_overlap(args, segmenter, parser.prog)
        if slides and getattr(segmenter, "geometry", None) == "patch" and card.patch_stride == 1:
            print(f"{parser.prog}: note: a patch classifier runs one forward pass per pixel of tissue: on a whole "
                  "slide that takes hours; patch_stride: 8 in the card (or --patch-stride 8) classifies every 8th "
                  "pixel's patch per row and column and interpolates, 64× fewer passes", file=sys.stderr)
        if images:
            from ..net.inference.image_files import segment_files

            predict = dihedral_tta(segmenter) if args.tta else segmenter
            written = segment_files(predict, images, args.out, tile=args.tile, overlap=overlap,
                                    threshold=args.threshold, multiple=card.size_multiple,
                                    prob_format=args.prob_format, progress=not args.no_progress,
                                    overwrite=args.overwrite, batch_size=args.batch_tiles, model_mpp=card.mpp,
                                    image_mpp=args.image_mpp, instances=instances, log=engine_log(parser.prog))
            for files in written:
                print(f"{files['name']}: {files['mask']}")
        if slides:
            from ..net.inference.slides import segment_slides

            settings = SlideSettings(tile=args.tile, overlap=overlap, multiple=card.size_multiple,
                                     threshold=args.threshold, batch_size=args.batch_tiles, block=args.block,
                                     mpp=card.mpp, white_threshold=args.white_threshold, prob=args.prob_tiff)
            summaries = segment_slides(segmenter, slides, args.out, settings, deploy=args.model,
                                       weights=args.weights, card=card, tta=args.tta, workers=args.workers,
                                       scheduler=args.scheduler, overwrite=args.overwrite, restart=args.restart,
                                       progress=not args.no_progress,
                                       log=lambda message: print(f"{parser.prog}: {message}", file=sys.stderr,
                                                                 flush=True))
            for summary in summaries:
                print(f"{Path(summary['slide']).name}: {summary['outputs']['mask']}")

    def interrupted(_):
        if state["slides"]:
            return (f"finished outputs are complete, none is partial; the progress of unfinished slides is kept in "
                    f"{args.out}/.<name>.slide-progress: run the same command again to resume")
        return "outputs already written are complete; none is partial"

    return run(parser.prog, body, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
