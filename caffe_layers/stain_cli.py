"""Console scripts for stain normalisation and colour-shift estimation.

``caffe-stain-normalize`` (:func:`normalize_main`) and ``caffe-stain-estimate``
(:func:`estimate_main`) are thin argparse wrappers over :mod:`caffe_layers.stain`.
Both return 0 on success and 2 (with a message naming the file) on bad input,
including unreadable folders and corrupt images. ``caffe-stain-estimate --hed``
also suggests the stain-space (``hed_alpha``) jitter range.
``python -m caffe_layers.stain_cli {normalize,estimate} ...`` runs them too.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from caffe_layers import imageio, stain

__all__ = ["IMAGE_SUFFIXES", "CliError", "normalize_main", "estimate_main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class CliError(Exception):
    """Bad input file or argument; reported as ``prog: error: message`` with exit code 2."""


def _read_image(path):
    """:func:`caffe_layers.imageio.read_rgb`, its errors (which name the file) as CliError."""
    try:
        return imageio.read_rgb(path)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from error


def _expand_inputs(inputs):
    """Files given directly, plus every image file (sorted) in given folders.

    Raises
    ------
    CliError
        For a missing entry, a folder without images, or one that cannot be read
        (e.g. no permission); the message names the path.
    """
    files = []
    for entry in inputs:
        entry = Path(entry)
        try:
            if entry.is_dir():
                found = sorted(
                    p for p in entry.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            elif entry.is_file():
                files.append(entry)
                continue
            else:
                raise CliError(f"{entry}: no such image file or folder")
        except OSError as error:  # e.g. a folder without read permission
            raise CliError(f"{entry}: cannot read this folder or file ({error})") from error
        if not found:
            raise CliError(f"{entry}: folder contains no {'/'.join(IMAGE_SUFFIXES)} images")
        files.extend(found)
    return files


def _write_png(path, rgb):
    from PIL import Image

    try:
        Image.fromarray(rgb).save(path, format="PNG")
    except OSError as error:
        raise CliError(f"{path}: cannot write output ({error})") from error


def _output_paths(inputs, files, output):
    """One output file for a single input file, else one PNG per input in a folder."""
    output = Path(output)
    single_file = len(files) == 1 and Path(inputs[0]).is_file() and len(inputs) == 1
    if single_file and not output.is_dir():
        if output.parent and not output.parent.is_dir():
            raise CliError(f"{output}: output folder {output.parent} does not exist")
        return [output]
    if output.exists() and not output.is_dir():
        raise CliError(f"{output}: several inputs need an output folder, but this is a file")
    output.mkdir(parents=True, exist_ok=True)
    targets, seen = [], {}
    for file in files:
        target = output / (file.stem + ".png")
        if target in seen:
            raise CliError(f"{file} and {seen[target]} would both be written to {target}")
        seen[target] = file
        targets.append(target)
    return targets


def _run(parser, argv, body):
    args = parser.parse_args(argv)
    try:
        return body(args)
    except (CliError, ValueError) as error:  # ValueError: e.g. a blank template
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def _normalize_parser():
    parser = argparse.ArgumentParser(
        prog="caffe-stain-normalize",
        description="Normalise the stain of H&E images to a template image.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("--template", required=True, help="template (reference) image")
    parser.add_argument("--output", "-o", required=True, help="output PNG (one input) or folder")
    parser.add_argument(
        "--method", choices=("histmatch", "reinhard", "macenko"), default="histmatch"
    )
    parser.add_argument(
        "--ignore-white", action="store_true",
        help="use and change tissue pixels only (histmatch, reinhard; an error with macenko, "
        "whose tissue is its own OD threshold)",
    )
    parser.add_argument("--white-threshold", type=float, default=200.0,
                        help="grey level above which a pixel is background (default 200)")
    parser.add_argument("--nbins", type=int, default=None,
                        help="histmatch: quantise the template histogram to N bins")
    return parser


def normalize_main(argv=None):
    """``caffe-stain-normalize``: write stain-normalised PNGs. Returns the exit code."""
    parser = _normalize_parser()

    def body(args):
        if args.nbins is not None and args.method != "histmatch":
            raise CliError("--nbins only applies to --method histmatch")
        if args.nbins is not None and args.nbins < 2:
            raise CliError(f"--nbins must be >= 2; got {args.nbins}")
        if args.ignore_white and args.method == "macenko":
            # Macenko picks tissue by optical density itself and re-composes every pixel.
            raise CliError("--ignore-white only applies to --method histmatch and reinhard; "
                           "macenko selects tissue by its own optical-density threshold")
        template = _read_image(args.template)
        files = _expand_inputs(args.inputs)
        targets = _output_paths(args.inputs, files, args.output)
        if args.method == "reinhard":
            normalizer = stain.ReinhardNormalizer(
                ignore_white=args.ignore_white, white_threshold=args.white_threshold
            )
        elif args.method == "macenko":
            normalizer = stain.MacenkoNormalizer()
        if args.method != "histmatch":
            try:
                normalizer.fit(template)
            except ValueError as error:
                raise CliError(f"{args.template}: {error}") from error
        for file, target in zip(files, targets):
            image = _read_image(file)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", stain.NoTissueWarning)
                if args.method == "histmatch":
                    result = stain.match_histograms(
                        image, template, ignore_white=args.ignore_white,
                        nbins=args.nbins, white_threshold=args.white_threshold,
                    )
                else:
                    result = normalizer.transform(image)
            for warning in caught:
                print(f"warning: {file}: {warning.message}", file=sys.stderr)
            _write_png(target, result)
            print(f"{file} -> {target}")
        return 0

    return _run(parser, argv, body)


def _estimate_parser():
    parser = argparse.ArgumentParser(
        prog="caffe-stain-estimate",
        description="Estimate the colour shift between train and test H&E images and "
        "suggest a colour-augmentation range (color_a_min/color_a_max); with --hed also a "
        "stain-space jitter range (hed_alpha).",
    )
    parser.add_argument("--train", nargs="+", required=True, help="train image files or folders")
    parser.add_argument("--test", nargs="+", required=True, help="test image files or folders")
    parser.add_argument("--margin", type=float, default=0.1, help="relative widening (0.1)")
    parser.add_argument("--ignore-white", action=argparse.BooleanOptionalAction, default=True,
                        help="use tissue pixels only (default on)")
    parser.add_argument("--white-threshold", type=float, default=200.0)
    parser.add_argument("--include-offset", action="store_true",
                        help="also suggest an additive color_b range")
    parser.add_argument("--hed", action="store_true",
                        help="also estimate the haematoxylin/eosin concentration shift and suggest "
                        "hed_alpha; the param_str then holds both the color and the hed keys")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _unique_names(files):
    """Short names for the ratio table (file name; full path if names clash)."""
    names = [file.name for file in files]
    if len(set(names)) != len(names):
        names = [str(file) for file in files]
    return names


def estimate_main(argv=None):
    """``caffe-stain-estimate``: print ratios and a suggested param_str. Returns the exit code.

    With ``--hed`` it also prints the tissue's haematoxylin/eosin/DAB concentration ratios
    (:func:`caffe_layers.stain.suggest_hed_params`) and the suggested ``hed_alpha`` range,
    and the final param_str holds the colour keys followed by the hed keys. In ``--json``
    mode ``params``/``param_str`` are then the combined ones and ``hed_ratios`` is added.
    """
    parser = _estimate_parser()

    def body(args):
        if args.margin < 0:
            raise CliError(f"--margin must be >= 0; got {args.margin}")
        groups = {}
        for group, entries in (("train", args.train), ("test", args.test)):
            files = _expand_inputs(entries)
            images = {}
            for name, file in zip(_unique_names(files), files):
                image = _read_image(file)
                if args.ignore_white and not stain.tissue_mask(image, args.white_threshold).any():
                    raise CliError(
                        f"{file}: no tissue (every pixel above --white-threshold "
                        f"{args.white_threshold:g}); drop it or use --no-ignore-white"
                    )
                images[name] = image
            groups[group] = images
        estimate = stain.suggest_color_params(
            groups["train"], groups["test"], margin=args.margin,
            ignore_white=args.ignore_white, include_offset=args.include_offset,
            white_threshold=args.white_threshold,
        )
        params, hed = dict(estimate.params), None
        if args.hed:
            hed = stain.suggest_hed_params(
                groups["train"], groups["test"], margin=args.margin,
                ignore_white=args.ignore_white, white_threshold=args.white_threshold,
            )
            params.update(hed.params)
        param_str = stain.format_param_str(params)

        def rounded(table):
            return {name: [round(float(r), 4) for r in ratios] for name, ratios in table.items()}

        if args.json:
            report = {"params": params, "param_str": param_str,
                      "ratios": rounded(estimate.ratios)}
            if hed is not None:
                report["hed_ratios"] = rounded(hed.ratios)
            print(json.dumps(report, indent=2))
            return 0
        tables = [(("R", "G", "B"), estimate.ratios)]
        if hed is not None:
            tables.append((("H", "E", "DAB"), hed.ratios))
        for columns, table in tables:
            width = max(len("image"), *(len(name) for name in table))
            print(f"{'image':<{width}}  " + "  ".join(f"{column:>6}" for column in columns))
            for name, ratios in table.items():
                print(f"{name:<{width}}  " + "  ".join(f"{r:6.3f}" for r in ratios))
            print()
        if hed is not None:
            alpha = hed.params["hed_alpha"]
            print(f"stain jitter: hed_alpha = {alpha:g} (H, E, DAB scaled by "
                  f"U[{1 - alpha:g}, {1 + alpha:g}])")
            print()
        print(param_str)
        return 0

    return _run(parser, argv, body)


def main(argv=None):
    """``python -m caffe_layers.stain_cli {normalize,estimate} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"normalize": normalize_main, "estimate": estimate_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m caffe_layers.stain_cli {normalize,estimate} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
