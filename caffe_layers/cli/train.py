"""``caffe-stain-train``: train a Caffe net with a progress bar, CSV log and checked weight loading."""
import argparse
import sys

from . import UsageError, pycaffe_status, run

__all__ = ["main"]


def main(argv=None):
    """Train from a solver prototxt; returns the exit code."""
    parser = argparse.ArgumentParser(prog="caffe-stain-train", description="Train a Caffe net with a progress "
                                     "bar, CSV log and checked weight loading.")
    parser.add_argument("--solver", required=True, help="solver prototxt")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--weights", help=".caffemodel to start from (fine-tuning)")
    start.add_argument("--resume", help=".solverstate to continue from")
    parser.add_argument("--iters", type=int, help="iteration to stop at (default: the solver's max_iter)")
    parser.add_argument("--log", help="CSV log of loss and validation metrics per iteration (never "
                        "replaces an existing file unless --overwrite-log)")
    parser.add_argument("--overwrite-log", action="store_true", help="replace an existing --log file")
    parser.add_argument("--overwrite-snapshots", action="store_true",
                        help="replace snapshots of an earlier run under the solver's snapshot_prefix (never "
                             "the --weights or --resume file)")
    parser.add_argument("--validate-every", type=int, help="validation period (default: the solver's "
                        "test_interval; 0 disables)")
    parser.add_argument("--seed", type=int, help="override the solver's random_seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if pycaffe_status(parser.prog):
        return 2
    from ..net.training import train

    def body():
        if args.iters is not None and not 1 <= args.iters < 2 ** 31:
            raise UsageError(f"--iters must be in [1, 2**31); got {args.iters}")
        if args.validate_every is not None and not 0 <= args.validate_every < 2 ** 31:
            raise UsageError(f"--validate-every must be in [0, 2**31); got {args.validate_every}")
        if args.seed is not None and not 0 <= args.seed < 2 ** 63:
            raise UsageError(f"--seed must be in [0, 2**63); got {args.seed}")
        result = train(args.solver, weights=args.weights, resume=args.resume, max_iter=args.iters,
                       log_csv=args.log, validate_every=args.validate_every, progress=not args.no_progress,
                       seed=args.seed, overwrite_log=args.overwrite_log,
                       overwrite_snapshots=args.overwrite_snapshots)
        print(f"trained to iteration {result.iterations}; last loss {result.last_loss}")
        if result.validation:
            print("last validation: " + ", ".join(f"{key}={value:.4g}" for key, value in result.validation[-1].items()
                                                   if key != "iter"))
        if result.caffemodel:
            print(f"snapshot: {result.caffemodel} {result.solverstate}")

    def saved(interrupt):
        snapshot = getattr(interrupt, "snapshot", None)
        if not snapshot:
            return "no snapshot was written"
        return f"saved {snapshot[0]} and {snapshot[1]}; continue with --resume {snapshot[1]}"

    return run(parser.prog, body, interrupted=saved)

if __name__ == "__main__":
    sys.exit(main())
