"""``caffe-stain-normalize``: normalise the stain of H&E images to a template image."""
import argparse
import sys
import warnings
from pathlib import Path

from ..image_io import find_images, read_rgb, write_image
from ..stain import MacenkoNormalizer, NoTissueWarning, ReinhardNormalizer, match_histograms, tissue_mask
from ..stain.histogram import check_reference
from . import UsageError, run

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="caffe-stain-normalize",
        description="Normalise the stain of H&E images to a template image.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("--template", required=True, help="template (reference) image")
    parser.add_argument("--output", "-o", required=True,
                        help="output image (one input; .png, .tif or .jpg) or folder (PNGs)")
    parser.add_argument("--method", choices=("histmatch", "reinhard", "macenko"), default="histmatch")
    parser.add_argument(
        "--ignore-white", action="store_true",
        help="use and change tissue pixels only (histmatch, reinhard; an error with macenko, "
        "whose tissue is its own OD threshold)",
    )
    parser.add_argument("--white-threshold", type=float, default=200.0,
                        help="grey level above which a pixel is background (default 200)")
    parser.add_argument("--nbins", type=int, default=None,
                        help="histmatch: quantise the template histogram to N bins (2..65536)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    return parser


def _output_paths(inputs, files, output, protected, overwrite):
    """One output file for a single input file, else one PNG per input in a folder.

    Refuses, before anything is written, an output that is one of ``protected`` (the inputs
    and the template) or that exists without ``overwrite``.
    """
    output = Path(output)
    single_file = len(files) == 1 and Path(inputs[0]).is_file() and len(inputs) == 1
    if single_file and not output.is_dir():
        targets = [output]
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: several inputs need an output folder, but this is a file")
        targets, seen = [], {}
        for file in files:
            target = output / (file.stem + ".png")
            if target in seen:
                raise UsageError(f"{file} and {seen[target]} would both be written to {target}")
            seen[target] = file
            targets.append(target)
    protected = {Path(p).resolve() for p in protected}
    for target in targets:
        if target.resolve() in protected:
            raise UsageError(f"{target}: output would replace an input image or the template; "
                             "choose another --output")
        if target.exists() and not overwrite:
            raise UsageError(f"{target}: already exists (use --overwrite to replace it)")
    if not single_file:
        output.mkdir(parents=True, exist_ok=True)
    return targets


def _normalizer(args, template):
    if args.method == "histmatch":
        mask = tissue_mask(template, args.white_threshold) if args.ignore_white else None
        if mask is not None and not mask.any():
            raise UsageError(f"{args.template}: the template has no tissue (every pixel above "
                             f"--white-threshold {args.white_threshold:g}); choose a template with tissue")
        try:
            check_reference(template, mask, name="the template")
        except ValueError as error:
            raise UsageError(f"{args.template}: {error}") from None
        return lambda image: match_histograms(image, template, ignore_white=args.ignore_white,
                                              nbins=args.nbins, white_threshold=args.white_threshold)
    if args.method == "reinhard":
        normalizer = ReinhardNormalizer(ignore_white=args.ignore_white, white_threshold=args.white_threshold)
    else:
        normalizer = MacenkoNormalizer()
    try:
        normalizer.fit(template)
    except ValueError as error:
        raise UsageError(f"{args.template}: {error}") from error
    return normalizer.transform


def main(argv=None):
    """Write stain-normalised images; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)

    def body():
        if args.nbins is not None and args.method != "histmatch":
            raise UsageError("--nbins only applies to --method histmatch")
        if args.nbins is not None and not 2 <= args.nbins <= 65536:
            raise UsageError(f"--nbins must be in [2, 65536]; got {args.nbins}")
        if args.ignore_white and args.method == "macenko":
            # Macenko picks tissue by optical density itself and re-composes every pixel.
            raise UsageError("--ignore-white only applies to --method histmatch and reinhard; "
                             "macenko selects tissue by its own optical-density threshold")
        template = read_rgb(args.template)
        files = find_images(args.inputs)
        targets = _output_paths(args.inputs, files, args.output, [*files, args.template], args.overwrite)
        normalize = _normalizer(args, template)
        for file, target in zip(files, targets):
            image = read_rgb(file)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoTissueWarning)
                result = normalize(image)
            for warning in caught:
                print(f"warning: {file}: {warning.message}", file=sys.stderr)
            write_image(target, result, overwrite=args.overwrite)
            print(f"{file} -> {target}")

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
