"""``caffe-stain-estimate``: the colour shift between train and test H&E images, as a param_str.

With ``--hed`` it also suggests the stain-space (``hed_alpha``) jitter range and the hue jitter
``stain_angle`` (from the angles between the groups' Macenko stain vectors).
"""
import argparse
import json
import math
import sys

import numpy as np

from ..image_io import find_images, read_rgb
from ..param_str import format_param_str
from ..stain import suggest_color_params, suggest_hed_params, suggest_stain_angle, tissue_mask
from . import UsageError, check_white_threshold, run

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="caffe-stain-estimate",
        description="Estimate the colour shift between train and test H&E images and "
        "suggest a colour-augmentation range (color_a_min/color_a_max); with --hed also a "
        "stain-space jitter range (hed_alpha).",
    )
    parser.add_argument("--train", nargs="+", required=True, help="train image files or folders")
    parser.add_argument("--test", nargs="+", required=True, help="test image files or folders")
    parser.add_argument("--margin", type=float, default=0.1, help="relative widening (0.1)")
    # Two flags rather than argparse.BooleanOptionalAction, which needs Python 3.9.
    parser.add_argument("--ignore-white", action="store_true", default=True,
                        help="use tissue pixels only (default on)")
    parser.add_argument("--no-ignore-white", dest="ignore_white", action="store_false",
                        help="use every pixel, white background included")
    parser.add_argument("--white-threshold", type=float, default=200.0)
    parser.add_argument("--include-offset", action="store_true",
                        help="also suggest an additive color_b range")
    parser.add_argument("--hed", action="store_true",
                        help="also estimate the haematoxylin/eosin concentration shift and suggest "
                        "hed_alpha, and the angle between the groups' stain vectors (Macenko, on their "
                        "tissue) and suggest stain_angle; the param_str then holds the color and the hed keys")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _unique_names(files):
    """Short names for the ratio table (file name; full path if names clash)."""
    names = [file.name for file in files]
    if len(set(names)) != len(names):
        names = [str(file) for file in files]
    return names


def main(argv=None):
    """Print ratios and a suggested param_str; returns the exit code.

    With ``--hed`` it also prints the tissue's haematoxylin/eosin/DAB concentration ratios
    (:func:`caffe_layers.stain.suggest_hed_params`) and the suggested ``hed_alpha`` range,
    the angles between the train and test stain vectors
    (:func:`caffe_layers.stain.suggest_stain_angle`) and the suggested ``stain_angle``, and the
    final param_str holds the colour keys followed by the hed keys. In ``--json`` mode
    ``params``/``param_str`` are then the combined ones and ``hed_ratios`` is added. When the
    stain vectors of a group cannot be fitted (too little tissue, one stain colour) a warning
    says so and ``stain_angle`` is left out.
    """
    parser = _parser()
    args = parser.parse_args(argv)

    def body():
        if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
            raise UsageError(f"--margin must be a number in [0, 10]; got {args.margin}")
        check_white_threshold(args)
        groups = {}
        for group, entries in (("train", args.train), ("test", args.test)):
            files = find_images(entries)
            images = {}
            for name, file in zip(_unique_names(files), files):
                image = read_rgb(file)
                if args.ignore_white and not tissue_mask(image, args.white_threshold).any():
                    raise UsageError(
                        f"{file}: no tissue (every pixel above --white-threshold "
                        f"{args.white_threshold:g}); drop it or use --no-ignore-white"
                    )
                images[name] = image
            groups[group] = images
        estimate = suggest_color_params(
            groups["train"], groups["test"], margin=args.margin,
            ignore_white=args.ignore_white, include_offset=args.include_offset,
            white_threshold=args.white_threshold,
        )
        params, hed, hue = dict(estimate.params), None, None
        if args.hed:
            hed = suggest_hed_params(
                groups["train"], groups["test"], margin=args.margin,
                ignore_white=args.ignore_white, white_threshold=args.white_threshold,
            )
            params.update(hed.params)
            try:
                hue = suggest_stain_angle(groups["train"], groups["test"], margin=args.margin)
            except ValueError as error:
                print(f"warning: no stain_angle suggested: {error}", file=sys.stderr)
            else:
                params.update(hue.params)
        param_str = format_param_str(params)

        def rounded(table):
            return {name: [round(float(r), 4) for r in ratios] for name, ratios in table.items()}

        if args.json:
            report = {"params": params, "param_str": param_str,
                      "ratios": rounded(estimate.ratios)}
            if hed is not None:
                report["hed_ratios"] = rounded(hed.ratios)
            print(json.dumps(report, indent=2))
            return
        tables = [(("R", "G", "B"), estimate.ratios)]
        if hed is not None:
            tables.append((("H", "E", "DAB"), hed.ratios))
        for columns, table in tables:
            width = max(len("image"), *(len(name) for name in table))
            print(f"{'image':<{width}}  " + "  ".join(f"{column:>6}" for column in columns))
            for name, ratios in table.items():
                print(f"{name:<{width}}  " + "  ".join(f"{r:6.3f}" for r in ratios))
            print()
        if hue is not None:
            angles = {name: values for name, values in hue.angles.items()}
            width = max(len("stain vectors, degrees"), *(len(name) for name in angles))
            print(f"{'stain vectors, degrees':<{width}}  " + "  ".join(f"{column:>6}" for column in ("H", "E")))
            for name, values in angles.items():
                print(f"{name:<{width}}  " + "  ".join("     -" if not np.isfinite(v) else f"{v:6.2f}"
                                                       for v in values))
            print()
        if hed is not None:
            alpha = hed.params["hed_alpha"]
            print(f"stain jitter: hed_alpha = {alpha:g} (H, E, DAB scaled by "
                  f"U[{1 - alpha:g}, {1 + alpha:g}])")
            if hue is not None:
                angle = hue.params["stain_angle"]
                print(f"hue jitter: stain_angle = {angle:g} (H and E vectors turned by U[-{angle:g}, {angle:g}] "
                      "degrees)")
            print()
        print(param_str)

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
