"""``caffe-stain-estimate``: the colour shift between train and test H&E images, as a param_str.

With ``--hed`` it also suggests the stain-space (``hed_alpha``) jitter range and the hue jitter
``stain_angle`` (from the angles between the groups' Macenko stain vectors).

With ``--fit-stats IMAGES... [--target IMAGES...]`` it fits instead the distribution of the
images' tissue colour statistics (:func:`caffe_layers.stain.statistics.fit_stain_statistics`)
and prints the ``stain_stats`` param_str of the augmentation layer; ``--json OUT`` writes it to a
file that ``caffe-stain-retrofit --param-str @OUT`` reads as it is.
"""
import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..image_io import find_images, read_rgb, same_file, write_atomic
from ..param_str import format_param_str
from ..stain import suggest_color_params, suggest_hed_params, suggest_stain_angle, tissue_mask
from ..stain.statistics import STAIN_SPACES, SPREAD_MAX, fit_stain_statistics
from . import UsageError, check_white_threshold, run

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="caffe-stain-estimate",
        description="Estimate the colour shift between train and test H&E images and "
        "suggest a colour-augmentation range (color_a_min/color_a_max); with --hed also a "
        "stain-space jitter range (hed_alpha).",
    )
    parser.add_argument("--train", nargs="+", help="train image files or folders (required without --fit-stats)")
    parser.add_argument("--test", nargs="+", help="test image files or folders (required without --fit-stats)")
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
    parser.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"),
                        help="cover the LO-th to HI-th percentile of the observed shifts (e.g. 5 95) instead of "
                             "their extremes, then widen by --margin")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="JSON instead of a table: printed, or written to OUT (an object with params and "
                             "param_str, which caffe-stain-retrofit --param-str @OUT reads)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json OUT file")
    stats = parser.add_argument_group(
        "stain statistics (--fit-stats): the distribution of per-image tissue colour statistics, for the "
        "augmentation layer's stain_stats")
    stats.add_argument("--fit-stats", nargs="+", metavar="IMAGE",
                       help="training image files or folders to fit the statistics on (instead of --train/--test)")
    stats.add_argument("--target", nargs="+", metavar="IMAGE",
                       help="with --fit-stats: unlabelled images of the target lab(s), pooled with them")
    stats.add_argument("--space", choices=tuple(STAIN_SPACES), default=None,
                       help="colour space of the statistics: lab (CIE L*a*b*, default) or hed (stain concentrations)")
    stats.add_argument("--spread", type=float, default=None,
                       help=f"multiplier of the fitted spreads when the layer draws, in [0, {SPREAD_MAX:g}] (default 1)")
    stats.add_argument("--min-tissue", type=float, default=None,
                       help="images with a smaller tissue fraction are named and skipped (default 0.05)")
    return parser


def _unique_names(files):
    """Short names for the ratio table (file name; full path if names clash)."""
    names = [file.name for file in files]
    if len(set(names)) != len(names):
        names = [str(file) for file in files]
    return names


class _ImageFiles(Mapping):
    """Image files by path, each read when it is looked up (one image in memory at a time)."""

    def __init__(self, files):
        self._files = {str(file): file for file in files}

    def __getitem__(self, name):
        return read_rgb(self._files[name])

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)


def _write_or_print(report, destination, overwrite, inputs):
    """Print the JSON report (``-``) or write it atomically to ``destination``, never over an input."""
    text = json.dumps(report, indent=2) + "\n"
    if destination == "-":
        print(text, end="")
        return
    for file in inputs:
        if same_file(destination, file):
            raise UsageError(f"--json {destination}: is one of the input images; write the JSON elsewhere")
    if Path(destination).is_dir():
        raise UsageError(f"--json {destination}: is a folder; name a file")
    if Path(destination).exists() and not overwrite:
        raise UsageError(f"--json {destination}: already exists (use --overwrite to replace it)")
    write_atomic(destination, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)
    print(f"wrote {destination}", file=sys.stderr)


def _fit_stats(args):
    """``--fit-stats``: fit, print the table and the param_str (or the JSON)."""
    if args.train or args.test:
        raise UsageError("--fit-stats fits the statistics of its own images; --train/--test belong to the colour "
                         "ranges (run them separately)")
    if args.spread is not None and not 0 <= args.spread <= SPREAD_MAX:  # NaN fails too
        raise UsageError(f"--spread must be in [0, {SPREAD_MAX:g}]; got {args.spread}")
    if args.min_tissue is not None and not 0 <= args.min_tissue <= 1:
        raise UsageError(f"--min-tissue must be a fraction in [0, 1]; got {args.min_tissue}")
    files = find_images(args.fit_stats) + (find_images(args.target) if args.target else [])
    stats = fit_stain_statistics(
        _ImageFiles(files), space=args.space or "lab", spread=1.0 if args.spread is None else args.spread,
        min_tissue=0.05 if args.min_tissue is None else args.min_tissue, white_threshold=args.white_threshold)
    params = {"stain_stats": stats}
    param_str = format_param_str(params)
    if args.json is not None:
        _write_or_print({"params": params, "param_str": param_str}, args.json, args.overwrite, files)
        return
    channels = STAIN_SPACES[stats["space"]]
    print(f"tissue statistics in {stats['space']} space over {len(files)} images "
          f"(spread {stats['spread']:g}): mean and sd over the images of")
    print(f"{'channel':<8}  {'mean: mu':>9}  {'sd':>8}  {'std: mu':>9}  {'sd':>8}")
    for name, (mean_mu, mean_sd), (std_mu, std_sd) in zip(channels, stats["mean"], stats["std"]):
        print(f"{name:<8}  {mean_mu:9.4g}  {mean_sd:8.4g}  {std_mu:9.4g}  {std_sd:8.4g}")
    print()
    print(param_str)


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

    if args.fit_stats is None:
        if not (args.train and args.test):
            parser.error("the following arguments are required: --train, --test (or --fit-stats IMAGES...)")
        for option in ("target", "space", "spread", "min_tissue"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} goes with --fit-stats")
    else:
        for option in ("percentiles", "hed", "include_offset"):
            if getattr(args, option):
                parser.error(f"--{option.replace('_', '-')} goes with --train/--test, not --fit-stats")

    def body():
        check_white_threshold(args)
        if args.fit_stats is not None:
            return _fit_stats(args)
        if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
            raise UsageError(f"--margin must be a number in [0, 10]; got {args.margin}")
        groups, inputs = {}, []
        for group, entries in (("train", args.train), ("test", args.test)):
            files = find_images(entries)
            inputs.extend(files)
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
            white_threshold=args.white_threshold, percentiles=args.percentiles,
        )
        params, hed, hue = dict(estimate.params), None, None
        if args.hed:
            hed = suggest_hed_params(
                groups["train"], groups["test"], margin=args.margin,
                ignore_white=args.ignore_white, white_threshold=args.white_threshold,
                percentiles=args.percentiles,
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

        if args.json is not None:
            report = {"params": params, "param_str": param_str,
                      "ratios": rounded(estimate.ratios)}
            if hed is not None:
                report["hed_ratios"] = rounded(hed.ratios)
            _write_or_print(report, args.json, args.overwrite, inputs)
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
