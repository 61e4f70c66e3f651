"""``caffe-stain-normalize``: normalise the stain of H&E images to a template image.

A folder (several inputs) is normalised by a pool of processes (``--jobs``, default one per
core) with a progress bar; every normaliser is deterministic (fixed-seed samples), so the output
files are the same bytes as those of a one-process run (``--jobs 1``).
"""
import argparse
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..image_io import find_images, read_rgb, same_file, write_image
from ..stain import (MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer, match_histograms,
                     tissue_mask)
from ..stain.histogram import check_reference
from . import UsageError, check_white_threshold, run

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
    parser.add_argument("--method", choices=("histmatch", "reinhard", "macenko", "vahadane"), default="histmatch")
    parser.add_argument(
        "--ignore-white", action="store_true",
        help="use and change tissue pixels only (histmatch, reinhard; an error with macenko and "
        "vahadane, which fit on tissue themselves and re-compose every pixel)",
    )
    parser.add_argument("--white-threshold", type=float, default=200.0,
                        help="grey level above which a pixel is background (default 200; histmatch, "
                        "reinhard, vahadane)")
    parser.add_argument("--nbins", type=int, default=None,
                        help="histmatch: quantise the template histogram to N bins (2..65536)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--jobs", "-j", type=int, default=None,
                        help="processes for several inputs (default: one per available core; 1: this "
                        "process only); the outputs do not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    for target in targets:
        if any(same_file(target, p) for p in protected):
            raise UsageError(f"{target}: output would replace an input image or the template; "
                             "choose another --output")
        if target.exists() and not overwrite:
            raise UsageError(f"{target}: already exists (use --overwrite to replace it)")
    if not single_file:
        output.mkdir(parents=True, exist_ok=True)
    return targets


class _HistogramMatcher:
    """``match_histograms`` to a fixed template, as a picklable callable (for the process pool)."""

    def __init__(self, template, ignore_white, nbins, white_threshold):
        self.template = template
        self.ignore_white = ignore_white
        self.nbins = nbins
        self.white_threshold = white_threshold

    def __call__(self, image):
        return match_histograms(image, self.template, ignore_white=self.ignore_white, nbins=self.nbins,
                                white_threshold=self.white_threshold)


def _normalizer(args, template):
    """A picklable callable image -> normalised image, fitted to the template (errors name it)."""
    if args.method == "histmatch":
        mask = tissue_mask(template, args.white_threshold) if args.ignore_white else None
        if mask is not None and not mask.any():
            raise UsageError(f"{args.template}: the template has no tissue (every pixel above "
                             f"--white-threshold {args.white_threshold:g}); choose a template with tissue")
        try:
            check_reference(template, mask, name="the template")
        except ValueError as error:
            raise UsageError(f"{args.template}: {error}") from None
        return _HistogramMatcher(template, args.ignore_white, args.nbins, args.white_threshold)
    if args.method == "reinhard":
        normalizer = ReinhardNormalizer(ignore_white=args.ignore_white, white_threshold=args.white_threshold)
    elif args.method == "vahadane":
        normalizer = VahadaneNormalizer(white_threshold=args.white_threshold)
    else:
        normalizer = MacenkoNormalizer()
    try:
        normalizer.fit(template)
    except ValueError as error:
        raise UsageError(f"{args.template}: {error}") from error
    return normalizer.transform


# The worker's normaliser, set once per process by _start_worker (not pickled per image).
_WORKER_NORMALIZE = None


def _start_worker(normalize):
    global _WORKER_NORMALIZE
    _WORKER_NORMALIZE = normalize
    try:  # one process per core already: OpenCV's own threads would only compete
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass


def _normalize_file(file, target, overwrite, normalize=None):
    """Read, normalise and write one image; return the warnings' messages."""
    normalize = _WORKER_NORMALIZE if normalize is None else normalize
    image = read_rgb(file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # NoTissueWarning, StainSeparationWarning
        result = normalize(image)
    write_image(target, result, overwrite=overwrite)
    return [str(warning.message) for warning in caught]


def _run_files(normalize, files, targets, overwrite, jobs):
    """Yield ``(file, target, warnings)`` in input order, from this process or a pool."""
    if jobs <= 1 or len(files) <= 1:
        for file, target in zip(files, targets):
            yield file, target, _normalize_file(file, target, overwrite, normalize)
        return
    # forkserver: workers are forked from a clean server process that has imported this module
    # once (not from this one, whose OpenCV and BLAS threads may hold locks at the fork).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["caffe_layers.cli.normalize"])  # not __main__ under -m
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(files)), mp_context=context,
                               initializer=_start_worker, initargs=(normalize,))
    try:
        results = pool.map(_normalize_file, files, targets, [overwrite] * len(files))
        for file, target, caught in zip(files, targets, results):
            yield file, target, caught
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def main(argv=None):
    """Write stain-normalised images; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)

    def body():
        if args.nbins is not None and args.method != "histmatch":
            raise UsageError("--nbins only applies to --method histmatch")
        if args.nbins is not None and not 2 <= args.nbins <= 65536:
            raise UsageError(f"--nbins must be in [2, 65536]; got {args.nbins}")
        if args.ignore_white and args.method in ("macenko", "vahadane"):
            # Macenko and Vahadane pick tissue themselves and re-compose every pixel.
            raise UsageError(f"--ignore-white only applies to --method histmatch and reinhard; "
                             f"{args.method} selects tissue itself and re-composes every pixel")
        check_white_threshold(args)
        if args.jobs is not None and not 1 <= args.jobs <= 1024:
            raise UsageError(f"--jobs must be in [1, 1024]; got {args.jobs}")
        jobs = _available_cores() if args.jobs is None else args.jobs
        template = read_rgb(args.template)
        files = find_images(args.inputs)
        targets = _output_paths(args.inputs, files, args.output, [*files, args.template], args.overwrite)
        normalize = _normalizer(args, template)
        bar = None
        if not args.no_progress and len(files) > 1:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm comes with the [scripts] extra
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=len(files), unit="image", desc="normalize", file=sys.stderr, disable=None)

        def say(line, stream):
            if bar is None or bar.disable:
                print(line, file=stream)
            else:  # above the bar, which is redrawn below
                bar.write(line, file=stream)
        try:
            for file, target, caught in _run_files(normalize, files, targets, args.overwrite, jobs):
                for message in caught:
                    say(f"warning: {file}: {message}", sys.stderr)
                say(f"{file} -> {target}", sys.stdout)
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
