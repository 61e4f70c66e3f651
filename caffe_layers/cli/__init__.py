"""Console entry points: thin argparse wrappers over the library, with one error contract.

Each module is one command (``caffe-stain-<module>``) with a ``main(argv=None)`` that returns
the exit code:

* 0 on success;
* 2 on a user error -- a bad file, key, value or range -- with one line
  ``caffe-stain-<name>: error: <message naming the file/key/value>`` on stderr and no
  traceback (argparse's own usage errors also exit 2);
* 130 on Ctrl-C, with one line saying what was saved where.

Warnings (a blank image left unchanged, ...) are one line each too:
``caffe-stain-<name>: warning: <message>``.

Library modules never import argparse; only this package does.

Every command answers ``--help`` without pycaffe: a module imports Caffe tooling
(``caffe_layers.net``, ``caffe_layers.experiment``) only once its arguments are parsed. The
commands whose work is Caffe's (train, experiment, prepare, retrofit, lmdb) first call
:func:`pycaffe_status` and stop in one line with the install pointer when pycaffe is missing.
"""
import logging
import os
import sys
import warnings

from ..sample_data import DataPackageMissing
from ..tiling import DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE, check_threshold

__all__ = ["CARD_FLAGS", "USER_ERRORS", "UsageError", "add_model_card_arguments", "add_tiling_arguments",
           "check_output_folder", "check_tiling_arguments", "check_white_threshold", "effective_overlap", "model_card_from_args",
           "add_instance_arguments", "instance_options", "pycaffe_status", "run"]

# Before anything imports caffe: keep Caffe's log to warnings and errors unless asked.
os.environ.setdefault("GLOG_minloglevel", "1")
# tifffile logs what it cannot parse (a truncated slide) before raising; the command's own
# one-line error says it, naming the file.
logging.getLogger("tifffile").setLevel(logging.ERROR)


class UsageError(Exception):
    """A user error found by a command itself (a bad combination of options, ...)."""


#: What counts as a user error: reported in one line with exit code 2. ParamError is a ValueError.
USER_ERRORS = (UsageError, ValueError, OSError, DataPackageMissing)


def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


def run(prog, body, interrupted=None):
    """Run ``body()`` under the error contract; return the exit code.

    Parameters
    ----------
    prog : str
        The command's name, first on every message.
    body : callable
        Does the work; returns an exit code or None (0).
    interrupted : callable, optional
        Called with the KeyboardInterrupt on Ctrl-C; returns a sentence saying what was saved
        where (or None).
    """
    def show_warning(message, category, filename, lineno, file=None, line=None):
        # One line like the errors, not Python's "file:line: Category: message" and source line.
        print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return body() or 0
    except USER_ERRORS as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        note = interrupted(interrupt) if interrupted is not None else None
        print(f"{prog}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130


def pycaffe_status(prog):
    """0 if pycaffe imports, else 2 after the one-line error with the install pointer: called by
    the commands whose work is Caffe's, right after parsing their arguments, before any work."""
    def require():
        from ..net.proto import require_pycaffe

        require_pycaffe(prog)

    return run(prog, require)


def add_tiling_arguments(parser):
    """The tiling options shared by segment and compare (defaults from :mod:`caffe_layers.tiling`)."""
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side in pixels (default {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=int, default=None,
                        help="overlap of neighbouring tiles in pixels (default: twice the net's receptive-field "
                             f"radius computed from the prototxt, or {DEFAULT_OVERLAP} when it has none; always "
                             "widened to the context a valid-convolution, strided or patch-classifier net needs)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"probability above which a pixel is nucleus, in [0, 1) (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--batch-tiles", type=int, default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average over the 8 rotations/flips of each tile")


def check_tiling_arguments(args):
    """Refuse tiling values no net can use, before Caffe is involved."""
    if not 1 <= args.tile <= 16384:
        raise UsageError(f"--tile must be in [1, 16384]; got {args.tile}")
    if args.overlap is not None and not 0 <= args.overlap < args.tile:
        raise UsageError(f"--overlap must be in [0, --tile); got {args.overlap} with --tile {args.tile}")
    try:
        check_threshold(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a probability in [0, 1); got {args.threshold}") from None
    if not 1 <= args.batch_tiles <= 256:
        raise UsageError(f"--batch-tiles must be in [1, 256]; got {args.batch_tiles}")
    if getattr(args, "size_multiple", None) is not None and not 1 <= args.size_multiple <= 1024:
        raise UsageError(f"--size-multiple must be in [1, 1024]; got {args.size_multiple}")


def check_white_threshold(args):
    """``--white-threshold`` is a grey level of the 8-bit images the commands read: [0, 255]."""
    value = getattr(args, "white_threshold", None)
    if value is not None and not 0 <= value <= 255:  # NaN fails too
        raise UsageError(f"--white-threshold must be a grey level in [0, 255]; got {value}")


def check_output_folder(path, option="--out"):
    """An output folder option names a folder or nothing yet, not a file (checked before any work)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: exists and is not a folder; name a folder for the outputs")


def _instance_defaults():
    import inspect

    from ..instances import instances_from_probability

    parameters = inspect.signature(instances_from_probability).parameters
    return {name: parameters[name].default for name in ("min_distance", "min_size", "sigma", "h", "fill_holes")}


def add_instance_arguments(parser, what):
    """``--instances`` and the parameters of :func:`caffe_layers.instances.instances_from_probability`
    (the documented step from probability to nuclei), with the library's defaults."""
    defaults = _instance_defaults()
    group = parser.add_argument_group("nucleus instances (threshold, distance watershed, size filter; "
                                      "docs/nuclei.md)")
    group.add_argument("--instances", action="store_true", help=what)
    group.add_argument("--min-distance", type=int, default=defaults["min_distance"],
                       help=f"markers: maxima of a (2·N+1)² window of the smoothed distance (default "
                            f"{defaults['min_distance']})")
    group.add_argument("--min-size", type=int, default=defaults["min_size"],
                       help=f"objects of fewer pixels are dropped (default {defaults['min_size']})")
    group.add_argument("--sigma", type=float, default=defaults["sigma"],
                       help=f"Gaussian smoothing of the distance, in pixels (default {defaults['sigma']:g})")
    group.add_argument("--h", type=float, default=defaults["h"],
                       help=f"peaks joined by a saddle less than this deep (pixels of distance) share a marker "
                            f"(default {defaults['h']:g})")
    group.add_argument("--no-fill-holes", dest="fill_holes", action="store_false", default=defaults["fill_holes"],
                       help="keep holes inside objects (default: filled)")


def instance_options(args):
    """The keyword arguments of instances_from_probability from ``args``, checked (whether or not
    ``--instances`` asks for the labels to be written)."""
    if args.min_distance < 1:
        raise UsageError(f"--min-distance must be >= 1; got {args.min_distance}")
    if args.min_size < 0:
        raise UsageError(f"--min-size must be >= 0; got {args.min_size}")
    for flag, value in (("--sigma", args.sigma), ("--h", args.h)):
        if not value >= 0 or value == float("inf"):  # NaN fails too
            raise UsageError(f"{flag} must be a finite number >= 0; got {value}")
    return dict(min_distance=args.min_distance, min_size=args.min_size, sigma=args.sigma, h=args.h,
                fill_holes=args.fill_holes)


#: Model-card keys that are also flags (``--input-blob`` ...), with their argparse options.
CARD_FLAGS = {
    "input_blob": dict(help="input blob of the deploy net (card default: data)"),
    "channel_order": dict(choices=("RGB", "BGR"), help="channel order the net was trained on (default RGB)"),
    "raw_scale": dict(type=float, help="pixels 0-255 are multiplied by this first (e.g. 0.00392156862745098)"),
    "mean_file": dict(help=".binaryproto mean subtracted next (net channel order, raw-scaled units)"),
    "mean_value": dict(type=float, nargs="+", help="per-channel means subtracted next, e.g. 104 117 123"),
    "input_scale": dict(type=float, help="multiplied last, after the mean (transform_param { scale })"),
    "output_blob": dict(help="blob with the class map or scores (card default: prob)"),
    "output": dict(choices=("probabilities", "scores"), help="scores get a softmax over channels"),
    "foreground_class": dict(type=int, help="output channel of the nucleus class (default 1)"),
    "patch_classifier": dict(action="store_const", const=True,
                             help="the net labels the centre pixel of a P×P patch (its input size)"),
    "patch_stride": dict(type=int, help="patch classifier: classify every N-th pixel's patch per row and column "
                                        "and interpolate (N² fewer forwards; default 1, every pixel)"),
    "size_multiple": dict(type=int, help="net input sides must be multiples of this (default 1)"),
    "mpp": dict(type=float, help="micrometres per pixel the net was trained at: a whole slide is segmented at "
                                 "its pyramid level nearest to it (default: the card's mpp, else level 0)"),
}


def add_model_card_arguments(parser):
    """``--card`` and one flag per model-card key; flags override the card."""
    group = parser.add_argument_group("model card (how to feed the net and read its output; flags override --card)")
    group.add_argument("--card", help="YAML/JSON model card of the deploy net")
    for key, options in CARD_FLAGS.items():
        flags = ["--" + key.replace("_", "-")] + (["--multiple"] if key == "size_multiple" else [])
        group.add_argument(*flags, dest=key, default=None, **options)


def model_card_from_args(args):
    """The :class:`~caffe_layers.model_card.ModelCard` of ``--card`` with the flags on top."""
    from ..model_card import load_model_card

    return load_model_card(args.card, **{key: getattr(args, key) for key in CARD_FLAGS})


def effective_overlap(args, predictor, prog):
    """``--overlap``, widened (with a note on stderr) to twice the context the net needs.

    Without ``--overlap``: twice the receptive-field radius the engine computed from the
    prototxt (``predictor.receptive_radius``), rounded up to an even number; tiles then
    overlap just enough to equal one pass. :data:`DEFAULT_OVERLAP` when the net has no
    finite field (or the radius does not fit the tile).
    """
    if args.overlap is None:
        radius = getattr(predictor, "receptive_radius", None)
        args.overlap = 2 * radius if radius is not None and 2 * radius < args.tile else \
            min(DEFAULT_OVERLAP, args.tile - 1)
    context = getattr(predictor, "context", None)
    if context is None or args.overlap >= 2 * context:
        return args.overlap
    overlap = 2 * context
    if overlap >= args.tile:
        raise UsageError(f"the net needs {context} pixels of context per side: --tile {args.tile} is too small "
                         f"for an overlap of {overlap}; use --tile {4 * overlap} or more")
    print(f"{prog}: overlap widened from {args.overlap} to {overlap} pixels (the net's {predictor.geometry} "
          f"geometry needs {context} pixels of context per side)", file=sys.stderr)
    return overlap


#: The inference engines (caffe_layers.net.inference.engines.ENGINES, repeated here so that the commands'
#: options need no Caffe to be listed).
ENGINE_CHOICES = ("auto", "caffe", "opencv", "onnxruntime")


def add_engine_argument(parser):
    """``--engine caffe|opencv|auto`` (see :mod:`caffe_layers.net.inference.engines`)."""
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="inference engine: caffe, opencv (OpenCV's DNN module, several times faster), onnxruntime "
                             "(the net converted to ONNX, pip install 'caffe-stain-augment[onnx]') or auto (the "
                             "first of ONNX Runtime and OpenCV that matches Caffe on a probe tile, checked once per "
                             "model; OpenCV unchecked "
                             "without pycaffe; default)")


def engine_log(prog):
    """Where a command reports its engine choice: one line ``<prog>: engine ...`` on stderr."""
    return lambda message: print(f"{prog}: {message}", file=sys.stderr, flush=True)
