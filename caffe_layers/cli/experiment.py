"""``caffe-stain-experiment``: the stain-robustness experiment (the README's main job), or, with
``--dataset monuseg --data DIR``, the MoNuSeg benchmark on real slides of many labs."""
import argparse
import dataclasses
import sys

from . import add_engine_argument, pycaffe_status, run

__all__ = ["main"]


def main(argv=None):
    """Run the experiment; returns the exit code."""
    parser = argparse.ArgumentParser(prog="caffe-stain-experiment",
                                     description="The stain-robustness experiment, end to end on real packaged H&E "
                                                 "(default), or the MoNuSeg benchmark (--dataset monuseg).")
    parser.add_argument("--dataset", choices=("packaged", "monuseg"), default="packaged",
                        help="packaged: the packaged H&E tile and its stain shifts (default); monuseg: MoNuSeg 2018, "
                             "training/validation on its training tiles split by hospital, scored on its test tiles")
    parser.add_argument("--data", default=None,
                        help="with --dataset monuseg: the MoNuSeg folder (the official download's layout)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: results, or results/monuseg with --dataset monuseg); a "
                             "MoNuSeg run adds its seeds to those already there")
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
    parser.set_defaults(preset=None)
    args = parser.parse_args(argv)
    if pycaffe_status(parser.prog):
        return 2
    from ..experiment import PRESETS, run_experiment

    if args.dataset == "monuseg":
        return _monuseg(parser, args)
    if args.data is not None:
        parser.error("--data is for --dataset monuseg (the packaged data needs no folder)")
    args.preset = args.preset or "quick"
    args.out = args.out or "results"
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


def _monuseg(parser, args):
    from ..experiment.monuseg import MONUSEG_PRESETS, run_monuseg

    if args.data is None:
        parser.error("--dataset monuseg needs --data DIR (the MoNuSeg folder)")
    if args.preset == "long" or args.leave_one_out:
        parser.error("--long and --leave-one-out are for the packaged experiment")
    preset = "tiny" if args.preset == "tiny" else "default"
    overrides = {k: v for k, v in dict(seed=args.seed, base_iters=args.base_iters, finetune_iters=args.finetune_iters,
                                        hed_jitter=args.hed_jitter).items() if v is not None}
    for key in ("seed", "base_iters", "finetune_iters"):
        if key in overrides and overrides[key] < (0 if key == "seed" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {0 if key == 'seed' else 1}, got {overrides[key]}")
    if args.seeds < 1 or (args.jobs is not None and args.jobs < 1):
        parser.error("--seeds and --jobs must be >= 1")
    settings = dataclasses.replace(MONUSEG_PRESETS[preset], engine=args.engine, **overrides)
    out = args.out or "results/monuseg"

    def body():
        run_monuseg(args.data, out, settings, preset=preset, seeds=args.seeds, jobs=args.jobs)

    return run(parser.prog, body, interrupted=lambda _: f"seeds finished so far are under {out}/seeds")


if __name__ == "__main__":
    sys.exit(main())
