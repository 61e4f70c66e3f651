"""The stain-robustness experiment, end to end on real packaged H&E.

1. Split ``hgsc_nest`` (histolytics) into train / validation / held-out test bands.
2. Re-stain the held-out band in H-E-DAB space (several shifts, one fitted to the mean
   ratios measured between labs in the field).
3. Estimate the colour (and stain-space) range from the training band vs the validation band
   under the same shifts (:func:`caffe_layers.stain.suggest_color_params`,
   :func:`~caffe_layers.stain.suggest_hed_params`): no choice looks at the held-out band.
4. Train a 2 × 2 design -- mean file / per-patch centring × no augmentation / augmentation:
   for each centring, one net from scratch, then two equal-length continuations from its
   weights, one without and one with the AugmentationLayer (the user's "retrain my
   .caffemodel with the layer" step), so every model gets the same number of iterations.
5. Segment the held-out band under every condition, plus the baseline after histogram
   matching to the training band, and write ``table.md``, ``summary.json`` and figures.

Run it with ``bash scripts/run_experiment.sh`` (or ``caffe-stain-experiment``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets, metrics, prepare
from .compare import save_comparison_figure, write_summary, write_table
from .segment import overlay, segment_tiled
from .stain import channel_mean_ratios, match_histograms, suggest_color_params, suggest_hed_params

__all__ = ["Settings", "PRESETS", "run_experiment", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = (  # (name, centring, augmented)
    ("meanfile", "meanfile", False),
    ("meanfile+aug", "meanfile", True),
    ("patchmean", "patchmean", False),
    ("patchmean+aug", "patchmean", True),
)
BASELINE = "meanfile"
HISTMATCH = "meanfile+histmatch"  # the baseline on histogram-matched input
INPUT_CONVENTION = {"blob": "data", "layout": "N×3×H×W float32", "channel_order": "RGB",
                    "value_range": [0, 255], "output": "prob: N×2×H×W softmax, channel 1 = nucleus",
                    "size_multiple": None}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides a run's numbers (recorded in ``summary.json``)."""

    seed: int = 0
    patch_size: int = 64
    batch_size: int = 8
    depth: int = 2
    base_width: int = 16
    base_iters: int = 400
    finetune_iters: int = 200
    base_lr: float = 1e-3
    finetune_lr: float = 5e-4
    validate_every: int = 100
    val_batches: int = 8
    color_margin: float = 0.1
    hed_jitter: bool = True  # add stain-space jitter with the estimated range to the augmentation
    tile: int = 256
    overlap: int = 64  # wider than the U-Net's receptive field (~47 px): tiles agree with one pass
    threshold: float = 0.5
    crop: int = 0  # >0: use only the top-left crop×crop of the slide (for tiny runs)
    example_size: int = 512  # side of the centre crop of each real differently stained image


PRESETS = {
    "quick": Settings(),
    "long": Settings(base_iters=3000, finetune_iters=1500, patch_size=96),
    "tiny": Settings(patch_size=32, batch_size=2, base_width=4, base_iters=6, finetune_iters=4,
                     validate_every=3, val_batches=1, tile=64, overlap=16, crop=320, example_size=64),
}


def _log(message, start=[time.perf_counter()]):  # noqa: B006 -- one clock for the run
    print(f"[experiment {time.perf_counter() - start[0]:7.1f} s] {message}", file=sys.stderr, flush=True)


def _shown_path(path):
    """A path relative to the repository when it is inside it (as the summary records)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _train_model(name, centring, augment_param_str, lists, mean_file, settings, work, *, iters, lr,
                 weights=None):
    """Write a train/val net and solver for one model and train it; return the weights path."""
    from .training import train
    from .unet import net_to_text, solver, solver_to_text, unet_train_val

    folder = work / "train" / name.replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    net = unet_train_val(str(lists["train"]), str(lists["val"]), centring=centring,
                         mean_file=str(mean_file) if centring == "meanfile" else None,
                         augment_param_str=augment_param_str, batch_size=settings.batch_size,
                         patch_size=settings.patch_size, depth=settings.depth,
                         base_width=settings.base_width, seed=settings.seed)
    (folder / "train_val.prototxt").write_text(net_to_text(net))
    solver_param = solver(str(folder / "train_val.prototxt"), base_lr=lr, max_iter=iters,
                          snapshot_prefix=str(folder / "snapshot"), snapshot=0,
                          test_iter=settings.val_batches, test_interval=settings.validate_every,
                          random_seed=settings.seed, display=0)
    solver_path = folder / f"{folder.name}_solver.prototxt"  # its stem labels the progress bar
    solver_path.write_text(solver_to_text(solver_param))
    _log(f"training {name}: {iters} iterations" + (f" from {Path(weights).name}" if weights else ""))
    result = train(solver_path, weights=weights, log_csv=folder / "log.csv",
                   progress=True, seed=settings.seed)
    last = result.validation[-1] if result.validation else {}
    _log(f"trained {name}: loss {result.first_loss:.3f} -> {result.last_loss:.3f}, "
         f"val Dice {last.get('val_dice', float('nan')):.3f}")
    return Path(result.caffemodel), result


def _export_model(name, centring, weights, mean_file, settings, out_dir):
    """Deploy prototxt + weights (+ mean file) of a model under ``out_dir/models/<name>``."""
    import shutil

    from .unet import net_to_text, unet_deploy

    folder = out_dir / "models" / name.replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    deployed_mean = None
    if centring == "meanfile":
        deployed_mean = folder / "mean.binaryproto"
        shutil.copyfile(mean_file, deployed_mean)
    side = settings.tile
    deploy = unet_deploy(centring=centring, depth=settings.depth, base_width=settings.base_width,
                         mean_file=_shown_path(deployed_mean) if deployed_mean else None,
                         input_shape=(1, 3, side, side))
    (folder / "deploy.prototxt").write_text(net_to_text(deploy))
    shutil.copyfile(weights, folder / "weights.caffemodel")
    return folder / "deploy.prototxt", folder / "weights.caffemodel", deployed_mean


def _estimate_record(estimate):
    """A ColorRangeEstimate as the summary records it (ratios rounded to 4 decimals)."""
    return dict(params=estimate.params, param_str=estimate.param_str,
                ratios={k: np.asarray(v).round(4).tolist() for k, v in estimate.ratios.items()})


def _centre_crop(rgb, side):
    h, w = rgb.shape[:2]
    side_h, side_w = min(side, h), min(side, w)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    return np.ascontiguousarray(rgb[top:top + side_h, left:left + side_w])


def _write_dice_table(path, results, conditions, model_names):
    """Markdown Dice matrix: models × conditions, plus shift mean and retention."""
    shifts = [c for c in conditions if c != "in_domain"]
    header = ["model", *conditions, "mean over shifts", "shift / in-domain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in model_names:
        dice = [results[model][c]["dice"] for c in conditions]
        shift_mean = float(np.mean([results[model][c]["dice"] for c in shifts]))
        retention = shift_mean / results[model]["in_domain"]["dice"] if results[model]["in_domain"]["dice"] else 0.0
        lines.append("| " + " | ".join([model, *(f"{d:.3f}" for d in dice), f"{shift_mean:.3f}",
                                        f"{100 * retention:.1f} %"]) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _save_bar_figure(path, results, conditions, model_names):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2 + 1.6 * len(conditions), 4))
    ax = figure.subplots()
    width = 0.8 / len(model_names)
    for i, model in enumerate(model_names):
        xs = np.arange(len(conditions)) + (i - (len(model_names) - 1) / 2) * width
        ax.bar(xs, [results[model][c]["dice"] for c in conditions], width, label=model)
    ax.set_xticks(np.arange(len(conditions)), conditions, fontsize=8)
    ax.set_ylabel("Dice (held-out band)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3, loc="lower left")
    ax.set_title("Nucleus Dice per model and stain condition")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def run_experiment(out_dir="results", settings=Settings(), preset="custom"):
    """Run the whole experiment; return the summary written to ``out_dir/summary.json``."""
    import caffe

    from .meanfile import compute_mean_image, write_mean_binaryproto
    from .segment import CaffeSegmenter

    caffe.set_mode_cpu()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _log("loading hgsc_nest (histolytics) and its nucleus mask")
    rgb, instances = datasets.load_hgsc_nest()
    truth_full = datasets.nucleus_mask(instances)
    if settings.crop:
        rgb, truth_full = rgb[:settings.crop, :settings.crop], truth_full[:settings.crop, :settings.crop]
    regions = prepare.split_regions(rgb.shape[0])
    lists = prepare.write_region_lists(rgb, truth_full, regions, work / "data")
    train_rgb, test_rgb, test_truth = rgb[regions["train"]], rgb[regions["test"]], truth_full[regions["test"]] > 0
    _log("regions (rows): " + ", ".join(f"{k} {v.start}-{v.stop}" for k, v in regions.items()))

    _log("making stain-shifted versions of the held-out band")
    conditions, shift_settings = prepare.make_stain_shifts(test_rgb, train_rgb)
    # The same shifts on the validation band: the colour range is estimated there, and the
    # models are checked there, so no choice ever looks at the held-out band.
    val_rgb, val_truth = rgb[regions["val"]], truth_full[regions["val"]] > 0
    val_conditions = {name: val_rgb if name == "in_domain" else
                      prepare.shift_stains(val_rgb, shift["alpha"], shift["beta"])
                      for name, shift in shift_settings.items()}
    shifted = {k: v for k, v in val_conditions.items() if k != "in_domain"}
    estimate = suggest_color_params({"train": train_rgb}, shifted, margin=settings.color_margin)
    augment = {"rotate": True, "flip": True, **estimate.params}
    _log(f"estimated colour range: {estimate.param_str}")
    hed_estimate = None
    if settings.hed_jitter:
        hed_estimate = suggest_hed_params({"train": train_rgb}, shifted, margin=settings.color_margin)
        augment.update(hed_estimate.params)
        _log(f"estimated stain-space range: {hed_estimate.param_str}")
    augment_param_str = json.dumps(augment)

    mean_file = work / "data" / "mean.binaryproto"
    write_mean_binaryproto(mean_file, compute_mean_image([train_rgb], patch_size=settings.patch_size))

    trained, training_logs = {}, {}
    for centring in ("meanfile", "patchmean"):
        base, base_result = _train_model(f"{centring}_base", centring, None, lists, mean_file, settings,
                                         work, iters=settings.base_iters, lr=settings.base_lr)
        training_logs[f"{centring}_base"] = base_result
        for name, model_centring, augmented in MODELS:
            if model_centring != centring:
                continue
            weights, result = _train_model(name, centring, augment_param_str if augmented else None,
                                           lists, mean_file, settings, work,
                                           iters=settings.finetune_iters, lr=settings.finetune_lr,
                                           weights=base)
            trained[name] = weights
            training_logs[name] = result

    exported = {name: _export_model(name, centring, trained[name], mean_file, settings, out_dir)
                for name, centring, _ in MODELS}
    predictors = {name: CaffeSegmenter(deploy, weights) for name, (deploy, weights, _) in exported.items()}
    multiple = 2 ** settings.depth

    def segment(model, image):
        prob = segment_tiled(predictors[model], image, tile=settings.tile, overlap=settings.overlap,
                             multiple=multiple)
        return prob > settings.threshold

    validation = {name: {} for name, _, _ in MODELS}
    for condition, shifted_val in val_conditions.items():
        for model in validation:
            validation[model][condition] = metrics.dice(segment(model, shifted_val), val_truth)
    _log("validation band Dice: " + "; ".join(
        f"{m} " + " ".join(f"{v:.2f}" for v in validation[m].values()) for m in validation))

    _log("segmenting the held-out band under every condition")
    model_names = [name for name, _, _ in MODELS] + [HISTMATCH]
    results = {name: {} for name in model_names}
    rows, masks = [], {}
    for condition, image in conditions.items():
        matched = match_histograms(image, train_rgb, ignore_white=True)
        for model in model_names:
            shown = matched if model == HISTMATCH else image
            mask = segment(BASELINE if model == HISTMATCH else model, shown)
            masks[model, condition] = mask
            scores = metrics.pool_scores([metrics.segmentation_scores(mask, test_truth)])
            results[model][condition] = scores
            rows.append(dict(model=model, condition=condition, **scores))
        _log(f"  {condition}: " + ", ".join(f"{m} {results[m][condition]['dice']:.3f}" for m in model_names))

    figures = out_dir / "figures"
    crop = (slice(0, min(384, test_rgb.shape[0])), slice(0, min(384, test_rgb.shape[1])))
    for condition, image in conditions.items():
        panels = [(f"input: {condition}", image[crop]), ("ground truth", test_truth[crop])]
        panels += [(f"{m}\nDice {results[m][condition]['dice']:.3f}", masks[m, condition][crop])
                   for m in model_names]
        save_comparison_figure(figures / f"test_{condition}.png", panels, panel_size=3.0)
    save_comparison_figure(figures / "stain_shifts.png",
                           [(f"{c}\nratios {np.round(shift_settings[c]['mean_ratios_vs_train'], 2).tolist()}",
                             image[crop]) for c, image in conditions.items()], panel_size=3.0)
    _save_bar_figure(figures / "dice_by_condition.png", results, list(conditions), model_names)

    _log("segmenting the differently stained packaged images (no ground truth)")
    examples = {}
    for name, image in datasets.load_stained_examples().items():
        image = _centre_crop(image, settings.example_size)
        matched = match_histograms(image, train_rgb, ignore_white=True)
        tissue_fraction = {}
        panels = [(name, image)]
        for model in model_names:
            mask = segment(BASELINE if model == HISTMATCH else model, matched if model == HISTMATCH else image)
            tissue_fraction[model] = float(mask.mean())
            panels.append((f"{model}\nnucleus {100 * mask.mean():.1f} %", overlay(image, mask)))
        save_comparison_figure(figures / f"example_{name}.png", panels, panel_size=3.0)
        examples[name] = dict(shape=list(image.shape[:2]),
                              mean_ratios_vs_train=channel_mean_ratios(image, train_rgb, ignore_white=True).round(4).tolist(),
                              nucleus_fraction=tissue_fraction)

    condition_names = list(conditions)
    write_table(rows, out_dir, stem="metrics")
    _write_dice_table(out_dir / "table.md", results, condition_names, model_names)
    summary = dict(
        description="Nucleus segmentation Dice on the held-out band of histolytics hgsc_nest under stain shifts",
        preset=preset,
        settings=dataclasses.asdict(settings),
        seed=settings.seed,
        regions={k: [v.start, v.stop] for k, v in regions.items()},
        test_pixels=int(test_truth.size),
        stain_shifts=shift_settings,
        color_estimate=dict(estimated_on="train band vs the stain-shifted validation band",
                            **_estimate_record(estimate)),
        hed_estimate=None if hed_estimate is None else _estimate_record(hed_estimate),
        augment_param_str=augment_param_str,
        models={name: dict(centring=centring, augmented=augmented,
                           deploy=_shown_path(exported[name][0]), weights=_shown_path(exported[name][1]),
                           mean_file=_shown_path(exported[name][2]) if exported[name][2] else None,
                           input=dict(INPUT_CONVENTION, size_multiple=multiple),
                           training=dict(first_loss=training_logs[name].first_loss,
                                         last_loss=training_logs[name].last_loss,
                                         validation=training_logs[name].validation[-1:] or None))
                for name, centring, augmented in MODELS},
        histmatch=dict(model=BASELINE, template="train band", ignore_white=True),
        results=results,
        validation_dice=validation,
        examples=examples,
        files=dict(table="table.md", metrics=["metrics.md", "metrics.csv"],
                   figures=sorted(str(p.relative_to(out_dir)) for p in figures.glob("*.png"))),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    write_summary(summary, out_dir)
    _log(f"done in {summary['elapsed_s']} s: {out_dir / 'table.md'}, {out_dir / 'summary.json'}, {figures}/")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="caffe-stain-experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--long", dest="preset", action="store_const", const="long",
                      help="longer training on larger patches, for better numbers")
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                      help="a seconds-long smoke run on a small crop (for tests)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice (default 0)")
    parser.add_argument("--base-iters", type=int, default=None)
    parser.add_argument("--finetune-iters", type=int, default=None)
    parser.add_argument("--no-hed", dest="hed_jitter", action="store_false", default=None,
                        help="augment with rotation, flips and a*x+b only (no stain-space jitter)")
    parser.set_defaults(preset="quick")
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    overrides = {k: v for k, v in dict(seed=args.seed, base_iters=args.base_iters,
                                        finetune_iters=args.finetune_iters).items() if v is not None}
    for key, value in overrides.items():
        lowest = 0 if key == "seed" else 1
        if value < lowest:
            parser.error(f"--{key.replace('_', '-')} must be >= {lowest}, got {value}")
    if args.hed_jitter is not None:
        overrides["hed_jitter"] = args.hed_jitter
    settings = dataclasses.replace(settings, **overrides)
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        run_experiment(args.out, settings, preset=args.preset)
    except (datasets.DataPackageMissing, FileNotFoundError, ValueError) as error:
        print(f"caffe-stain-experiment: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
