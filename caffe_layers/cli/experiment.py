"""``caffe-stain-experiment``: the stain-robustness experiment (the README's main job)."""
import argparse
import dataclasses
import sys

from ..experiment import PRESETS, run_experiment
from . import add_engine_argument, run

__all__ = ["main"]


def main(argv=None):
    """Run the experiment; returns the exit code."""
    parser = argparse.ArgumentParser(prog="caffe-stain-experiment",
                                     description="The stain-robustness experiment, end to end on real packaged H&E.")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--long", dest="preset", action="store_const", const="long",
                      help="longer training on larger patches, for better numbers")
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                      help="a seconds-long smoke run on a small crop (for tests)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice (default 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run N seeds (--seed, --seed+1, ...) and report mean ± sd per cell (default 1)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes for the trainings (default: one per core)")
    parser.add_argument("--leave-one-out", dest="leave_one_out", action="store_true", default=None,
                        help="also test each synthetic shift on a model whose range was estimated "
                             "without it (on in --long)")
    parser.add_argument("--base-iters", type=int, default=None)
    parser.add_argument("--finetune-iters", type=int, default=None)
    parser.add_argument("--no-hed", dest="hed_jitter", action="store_false", default=None,
                        help="augment with rotation, flips and a*x+b only (no stain-space jitter)")
    add_engine_argument(parser)
    parser.set_defaults(preset="quick")
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    overrides = {k: v for k, v in dict(seed=args.seed, base_iters=args.base_iters,
                                        finetune_iters=args.finetune_iters).items() if v is not None}
    for key, value in [*overrides.items(), ("seeds", args.seeds), ("jobs", args.jobs)]:
        lowest = 0 if key == "seed" else 1
        if value is not None and value < lowest:
            parser.error(f"--{key.replace('_', '-')} must be >= {lowest}, got {value}")
    for key in ("hed_jitter", "leave_one_out"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = dataclasses.replace(settings, engine=args.engine, **overrides)

    def body():
        run_experiment(args.out, settings, preset=args.preset, seeds=args.seeds, jobs=args.jobs)

    return run(parser.prog, body, interrupted=lambda _: f"files already written under {args.out} are complete")


if __name__ == "__main__":
    sys.exit(main())
