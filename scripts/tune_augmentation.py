"""Augmentation variants on the experiment's per-patch base net, scored on the validation band.

    python scripts/tune_augmentation.py [--out results/tuning] [--seed 0] [--tiny]

Writes ``tuning.md`` and ``tuning.json`` (see caffe_layers.experiment.tuning). The held-out
band is never used: a variant chosen from this table can go into the experiment honestly.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_layers.experiment import PRESETS  # noqa: E402
from caffe_layers.experiment.tuning import tune_augmentation  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (a smoke run)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the trainings (default 2)")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(PRESETS["tiny" if args.tiny else "quick"], seed=args.seed)
    tune_augmentation(args.out, settings, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
