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

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .. import datasets, metrics
from ..net.engines import make_segmenter
from ..net.predictor import use_cpu
from ..net.training import train
from ..net.unet import net_to_text, solver, solver_to_text, unet_deploy, unet_train_val
from ..patches import derived_seed
from ..reports import (
    overlay,
    save_bar_figure,
    save_comparison_figure,
    write_dice_table,
    write_summary,
    write_table,
)
from ..stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    VahadaneNormalizer,
    channel_mean_ratios,
    make_stain_shifts,
    match_histograms,
    shift_stains,
    suggest_color_params,
    suggest_hed_params,
)
from ..model_card import load_model_card, write_model_card
from ..tiling import dihedral_tta, segment_tiled
from .regions import prepare_data
from .settings import BASELINE, INPUT_CONVENTION, MODELS, TTA_MODELS, Settings

__all__ = ["run_experiment"]


class _Log:
    """Progress lines on stderr, timed from the start of one run."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message):
        print(f"[experiment {time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def _relative_to(path, folder):
    """``path`` relative to ``folder`` when it is inside it, else absolute (as the summary records)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(folder).resolve()))
    except ValueError:
        return str(path)


def _train_model(log, name, centring, augment_param_str, lists, mean_file, settings, work, *, iters, lr,
                 weights=None):
    """Write a train/val net and solver for one model and train it; return the weights path."""
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
    log(f"training {name}: {iters} iterations" + (f" from {Path(weights).name}" if weights else ""))
    result = train(solver_path, weights=weights, log_csv=folder / "log.csv",
                   progress=True, seed=settings.seed)
    last = result.validation[-1] if result.validation else {}
    log(f"trained {name}: loss {result.first_loss:.3f} -> {result.last_loss:.3f}, "
         f"val Dice {last.get('val_dice', float('nan')):.3f}")
    return Path(result.caffemodel), result


def _export_model(name, centring, weights, mean_file, settings, out_dir):
    """A self-contained model folder ``out_dir/models/<name>``: deploy prototxt, weights, model
    card (and mean file, named relative to the folder: the tools resolve it from there)."""
    folder = out_dir / "models" / name.replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    deployed_mean = None
    if centring == "meanfile":
        deployed_mean = folder / "mean.binaryproto"
        shutil.copyfile(mean_file, deployed_mean)
    side = settings.tile
    deploy = unet_deploy(centring=centring, depth=settings.depth, base_width=settings.base_width,
                         mean_file="mean.binaryproto" if deployed_mean else None, input_shape=(1, 3, side, side))
    (folder / "deploy.prototxt").write_text(net_to_text(deploy))
    shutil.copyfile(weights, folder / "weights.caffemodel")
    card = folder / "model_card.yaml"
    write_model_card(card, dict(size_multiple=2 ** settings.depth), overwrite=True,
                     comment=f"{name}: RGB 0-255 in, softmax 'prob' out, nucleus = channel 1 (the defaults)")
    return folder / "deploy.prototxt", folder / "weights.caffemodel", deployed_mean, card


def _estimate_record(estimate):
    """A ColorRangeEstimate as the summary records it (ratios rounded to 4 decimals)."""
    return dict(params=estimate.params, param_str=estimate.param_str,
                ratios={k: np.asarray(v).round(4).tolist() for k, v in estimate.ratios.items()})


def _centre_crop(rgb, side):
    h, w = rgb.shape[:2]
    side_h, side_w = min(side, h), min(side, w)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    return np.ascontiguousarray(rgb[top:top + side_h, left:left + side_w])


def run_experiment(out_dir="results", settings=Settings(), preset="custom"):
    """Run the whole experiment; return the summary written to ``out_dir/summary.json``.

    Files of an earlier run in ``out_dir`` (its table, summary, figures, models and ``work/``)
    are replaced.
    """
    use_cpu()
    log = _Log()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    log("loading hgsc_nest (histolytics) and its nucleus mask")
    rgb, instances = datasets.load_hgsc_nest()
    truth_full = datasets.nucleus_mask(instances)
    if settings.crop:
        rgb, truth_full = rgb[:settings.crop, :settings.crop], truth_full[:settings.crop, :settings.crop]
    prepared = prepare_data(rgb, truth_full, work / "data", patch_size=settings.patch_size, overwrite=True)
    regions, lists, mean_file = prepared.regions, prepared.lists, prepared.mean_file
    train_rgb, test_rgb, test_truth = rgb[regions["train"]], rgb[regions["test"]], truth_full[regions["test"]] > 0
    log("regions (rows): " + ", ".join(f"{k} {v.start}-{v.stop}" for k, v in regions.items()))

    log("making stain-shifted versions of the held-out band")
    conditions, shift_settings = make_stain_shifts(test_rgb, train_rgb)
    seen = {name: name != "in_domain" for name in conditions}  # the synthetic shifts: the estimate saw them
    # The same shifts on the validation band: the colour range is estimated there, and the
    # models are checked there, so no choice ever looks at the held-out band.
    val_rgb, val_truth = rgb[regions["val"]], truth_full[regions["val"]] > 0
    val_conditions = {name: val_rgb if name == "in_domain" else
                      shift_stains(val_rgb, shift["alpha"], shift["beta"])
                      for name, shift in shift_settings.items()}
    shifted = {k: v for k, v in val_conditions.items() if k != "in_domain"}
    # Conditions the estimate never saw: the held-out band re-stained to each real, differently
    # stained packaged image by stain-vector transfer (Macenko, Vahadane), which changes hue as
    # labs do.
    stained_examples = datasets.load_stained_examples()
    for method, normalizer in (("macenko", MacenkoNormalizer), ("vahadane", VahadaneNormalizer)):
        for name, example in stained_examples.items():
            condition = f"{method}_to_{name}"
            conditions[condition] = normalizer().fit(example).transform(test_rgb)
            shift_settings[condition] = dict(
                transfer=f"{method} stain vectors and concentration scale of the packaged image", image=name,
                mean_ratios_vs_train=channel_mean_ratios(conditions[condition], train_rgb, ignore_white=True)
                .round(4).tolist())
            seen[condition] = False
    estimate = suggest_color_params({"train": train_rgb}, shifted, margin=settings.color_margin)
    augment = {"rotate": True, "flip": True, **estimate.params}
    log(f"estimated colour range: {estimate.param_str}")
    hed_estimate = None
    if settings.hed_jitter:
        hed_estimate = suggest_hed_params({"train": train_rgb}, shifted, margin=settings.color_margin)
        augment.update(hed_estimate.params)
        log(f"estimated stain-space range: {hed_estimate.param_str}")
    # Its own stream of the run's seed: same seed, same augmentation draws.
    augment["seed"] = derived_seed(settings.seed, 2)
    augment_param_str = json.dumps(augment)

    trained, training_logs = {}, {}
    for centring in ("meanfile", "patchmean"):
        base, base_result = _train_model(log, f"{centring}_base", centring, None, lists, mean_file, settings,
                                         work, iters=settings.base_iters, lr=settings.base_lr)
        training_logs[f"{centring}_base"] = base_result
        for name, model_centring, augmented in MODELS:
            if model_centring != centring:
                continue
            weights, result = _train_model(log, name, centring, augment_param_str if augmented else None,
                                           lists, mean_file, settings, work,
                                           iters=settings.finetune_iters, lr=settings.finetune_lr,
                                           weights=base)
            trained[name] = weights
            training_logs[name] = result

    exported = {name: _export_model(name, centring, trained[name], mean_file, settings, out_dir)
                for name, centring, _ in MODELS}
    cards = {name: load_model_card(card) for name, (_, _, _, card) in exported.items()}
    predictors = {name: make_segmenter(deploy, weights, settings.engine, tile=settings.tile,
                                       multiple=cards[name].size_multiple, batch=settings.batch_tiles,
                                       log=log, card=cards[name])
                  for name, (deploy, weights, _, _) in exported.items()}
    multiple = 2 ** settings.depth

    def segment(model, image, tta=False):
        predict = dihedral_tta(predictors[model]) if tta else predictors[model]
        prob = segment_tiled(predict, image, tile=settings.tile, overlap=settings.overlap,
                             multiple=cards[model].size_multiple, batch_size=settings.batch_tiles)
        return prob > settings.threshold

    # Table rows: row name -> (model, test-time normaliser or None, test-time augmentation). The
    # normalisers are fitted once, on the training band: "normalise at test time" rows beside
    # the "augment at train time" ones.
    normalizers = {"histmatch": lambda image: match_histograms(image, train_rgb, ignore_white=True),
                   "reinhard": ReinhardNormalizer().fit(train_rgb).transform,
                   "macenko": MacenkoNormalizer().fit(train_rgb).transform,
                   "vahadane": VahadaneNormalizer().fit(train_rgb).transform}
    table_rows = {name: (name, None, False) for name, _, _ in MODELS}
    for normalizer in normalizers:
        table_rows[f"{BASELINE}+{normalizer}"] = (BASELINE, normalizer, False)
    if settings.tta:
        for model in TTA_MODELS:
            table_rows[f"{model}+tta"] = (model, None, True)

    def segment_row(row, image, normalised):
        model, normalizer, tta = table_rows[row]
        return segment(model, image if normalizer is None else normalised[normalizer], tta)

    validation = {name: {} for name, _, _ in MODELS}
    for condition, shifted_val in val_conditions.items():
        for model in validation:
            validation[model][condition] = metrics.dice(segment(model, shifted_val), val_truth)
    log("validation band Dice: " + "; ".join(
        f"{m} " + " ".join(f"{v:.2f}" for v in validation[m].values()) for m in validation))

    log("segmenting the held-out band under every condition")
    model_names = list(table_rows)
    results = {name: {} for name in model_names}
    rows, masks = [], {}
    for condition, image in conditions.items():
        normalised = {name: normalize(image) for name, normalize in normalizers.items()}
        for model in model_names:
            mask = segment_row(model, image, normalised)
            masks[model, condition] = mask
            scores = metrics.pool_scores([metrics.segmentation_scores(mask, test_truth)])
            results[model][condition] = scores
            rows.append(dict(model=model, condition=condition, **scores))
        log(f"  {condition}: " + ", ".join(f"{m} {results[m][condition]['dice']:.3f}" for m in model_names))

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
    save_bar_figure(figures / "dice_by_condition.png", results, list(conditions), model_names)

    log("segmenting the differently stained packaged images (no ground truth)")
    examples = {}
    for name, image in stained_examples.items():
        image = _centre_crop(image, settings.example_size)
        normalised = {name_: normalize(image) for name_, normalize in normalizers.items()}
        tissue_fraction = {}
        panels = [(name, image)]
        for model in model_names:
            mask = segment_row(model, image, normalised)
            tissue_fraction[model] = float(mask.mean())
            panels.append((f"{model}\nnucleus {100 * mask.mean():.1f} %", overlay(image, mask)))
        save_comparison_figure(figures / f"example_{name}.png", panels, panel_size=3.0)
        examples[name] = dict(shape=list(image.shape[:2]),
                              mean_ratios_vs_train=channel_mean_ratios(image, train_rgb, ignore_white=True).round(4).tolist(),
                              nucleus_fraction=tissue_fraction)

    condition_names = list(conditions)
    write_table(rows, out_dir, stem="metrics")
    write_dice_table(out_dir / "table.md", results, condition_names, model_names, seen=seen)
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
                           deploy=_relative_to(exported[name][0], out_dir), weights=_relative_to(exported[name][1], out_dir),
                           mean_file=_relative_to(exported[name][2], out_dir) if exported[name][2] else None,
                           model_card=_relative_to(exported[name][3], out_dir),
                           input=dict(INPUT_CONVENTION, size_multiple=multiple),
                           training=dict(first_loss=training_logs[name].first_loss,
                                         last_loss=training_logs[name].last_loss,
                                         validation=training_logs[name].validation[-1:] or None))
                for name, centring, augmented in MODELS},
        histmatch=dict(model=BASELINE, template="train band", ignore_white=True),
        rows={row: dict(model=model, test_time_normaliser=normalizer, tta=tta)
              for row, (model, normalizer, tta) in table_rows.items()},
        conditions={name: dict(seen_by_estimate=seen[name]) for name in conditions},
        engines={name: predict.engine_choice.as_dict() for name, predict in predictors.items()},
        results=results,
        validation_dice=validation,
        examples=examples,
        files=dict(table="table.md", metrics=["metrics.md", "metrics.csv"],
                   figures=sorted(str(p.relative_to(out_dir)) for p in figures.glob("*.png"))),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    write_summary(summary, out_dir)
    log(f"done in {summary['elapsed_s']} s: {out_dir / 'table.md'}, {out_dir / 'summary.json'}, {figures}/")
    return summary
