"""Console entry points: thin argparse wrappers over the library, with one error contract.

Each module is one command (``caffe-stain-<module>``) with a ``main(argv=None)`` that returns
the exit code:

* 0 on success;
* 2 on a user error -- a bad file, key, value or range -- with one line
  ``caffe-stain-<name>: error: <message naming the file/key/value>`` on stderr and no
  traceback (argparse's own usage errors also exit 2);
* 130 on Ctrl-C, with one line saying what was saved where.

Library modules never import argparse; only this package does.
"""
import os
import sys

from ..datasets import DataPackageMissing
from ..tiling import DEFAULT_MULTIPLE, DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE, check_threshold

__all__ = ["ENGINE_CHOICES", "USER_ERRORS", "UsageError", "add_engine_argument", "add_tiling_arguments",
           "check_tiling_arguments", "engine_log", "run"]

# Before anything imports caffe: keep Caffe's log to warnings and errors unless asked.
os.environ.setdefault("GLOG_minloglevel", "1")


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
    try:
        return body() or 0
    except USER_ERRORS as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        note = interrupted(interrupt) if interrupted is not None else None
        print(f"{prog}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130


def add_tiling_arguments(parser):
    """The tiling options shared by segment and compare (defaults from :mod:`caffe_layers.tiling`)."""
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side in pixels (default {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                        help="overlap of neighbouring tiles in pixels, at least twice the net's "
                             f"receptive-field radius (default {DEFAULT_OVERLAP})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"probability above which a pixel is nucleus, in [0, 1) (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--multiple", type=int, default=DEFAULT_MULTIPLE,
                        help=f"net input sizes must be multiples of this, 2**depth (default {DEFAULT_MULTIPLE})")


def check_tiling_arguments(args):
    """Refuse tiling values no net can use, before Caffe is involved."""
    if not 1 <= args.tile <= 16384:
        raise UsageError(f"--tile must be in [1, 16384]; got {args.tile}")
    if not 0 <= args.overlap < args.tile:
        raise UsageError(f"--overlap must be in [0, --tile); got {args.overlap} with --tile {args.tile}")
    try:
        check_threshold(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a probability in [0, 1); got {args.threshold}") from None
    if not 1 <= args.multiple <= 1024:
        raise UsageError(f"--multiple must be in [1, 1024]; got {args.multiple}")


#: The inference engines (caffe_layers.net.engines.ENGINES, repeated here so that the commands'
#: options need no Caffe to be listed).
ENGINE_CHOICES = ("auto", "caffe", "opencv")


def add_engine_argument(parser):
    """``--engine caffe|opencv|auto`` (see :mod:`caffe_layers.net.engines`)."""
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="inference engine: caffe, opencv (OpenCV's DNN module, several times faster) or auto "
                             "(OpenCV if it matches Caffe on a probe tile, checked once per model; default)")


def engine_log(prog):
    """Where a command reports its engine choice: one line ``<prog>: engine ...`` on stderr."""
    return lambda message: print(f"{prog}: {message}", file=sys.stderr, flush=True)
