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
5. Segment the held-out band under every condition, plus the baseline after each test-time
   normaliser and with test-time augmentation, and write ``table.md``, ``summary.json`` and
   figures.

With several seeds, what does not depend on the seed (the data, the conditions, the range
estimates, the normalised test images) is made once; the trainings of every seed run in
worker processes, one BLAS thread each, so a seed's models do not depend on how many run at
once. With ``leave_one_out``, each synthetic shift is also tested on a model whose range was
estimated without it.

Run it with ``bash scripts/run_experiment.sh`` (or ``caffe-stain-experiment``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from .. import metrics
from .. import sample_data as datasets
from ..net.inference.engines import make_segmenter
from ..net.inference.caffe_engine import use_cpu
from ..patches import derived_seed
from ..image_io import write_atomic
from ..params import format_param_str
from ..reports import (
    TABLE_COLUMNS,
    mean_sd_text,
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
from ..model_card import load_model_card
from ..stain.statistics import fit_stain_statistics
from ..tiling import dihedral_tta, segment_tiled
from .regions import prepare_data
from .trainings import ProgressLog, export_model, relative_to, train_all
from .settings import AUGMENTED_AND_NORMALISED, BASELINE, INPUT_CONVENTION, MODELS, TTA_MODELS, Settings

__all__ = ["run_experiment"]

# Panels per row of the figures: ten or more panels in one row are unreadable at page width.
FIGURE_COLUMNS = 4


def _estimate_record(estimate):
    """A ColorRangeEstimate as the summary records it (ratios rounded to 4 decimals)."""
    return dict(params=estimate.params, param_str=estimate.param_str,
                ratios={k: np.asarray(v).round(4).tolist() for k, v in estimate.ratios.items()})


def _centre_crop(rgb, side):
    h, w = rgb.shape[:2]
    side_h, side_w = min(side, h), min(side, w)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    return np.ascontiguousarray(rgb[top:top + side_h, left:left + side_w])


@dataclasses.dataclass(frozen=True)
class Bands:
    """The experiment's data: the bands of ``hgsc_nest`` and their stain-shifted versions.

    ``test_conditions`` / ``val_conditions``: condition name -> (H, W, 3) uint8 image of the
    held-out / validation band (``"in_domain"`` unchanged, then each synthetic shift, the same
    ``alpha``/``beta`` on both bands); ``shift_settings``: condition -> its stain parameters.
    """

    regions: dict
    lists: dict
    mean_file: Path
    train_rgb: np.ndarray
    test_rgb: np.ndarray
    test_truth: np.ndarray
    val_truth: np.ndarray
    test_conditions: dict
    val_conditions: dict
    shift_settings: dict


def load_bands(settings, work, log):
    """Split ``hgsc_nest`` into bands on disk under ``work/data`` and make the synthetic shifts."""
    log("loading hgsc_nest (histolytics) and its nucleus mask")
    rgb, instances = datasets.load_hgsc_nest()
    truth_full = datasets.nucleus_mask(instances)
    if settings.crop:
        rgb, truth_full = rgb[:settings.crop, :settings.crop], truth_full[:settings.crop, :settings.crop]
    prepared = prepare_data(rgb, truth_full, Path(work) / "data", patch_size=settings.patch_size, overwrite=True)
    regions = prepared.regions
    train_rgb, test_rgb = rgb[regions["train"]], rgb[regions["test"]]
    log("regions (rows): " + ", ".join(f"{k} {v.start}-{v.stop}" for k, v in regions.items()))
    log("making stain-shifted versions of the held-out band")
    test_conditions, shift_settings = make_stain_shifts(test_rgb, train_rgb)
    # The same shifts on the validation band: the colour range is estimated there, and the
    # models are checked there, so no choice ever looks at the held-out band.
    val_rgb = rgb[regions["val"]]
    val_conditions = {name: val_rgb if name == "in_domain" else shift_stains(val_rgb, shift["alpha"], shift["beta"])
                      for name, shift in shift_settings.items()}
    return Bands(regions=regions, lists=prepared.lists, mean_file=prepared.mean_file, train_rgb=train_rgb,
                 test_rgb=test_rgb, test_truth=truth_full[regions["test"]] > 0,
                 val_truth=truth_full[regions["val"]] > 0, test_conditions=test_conditions,
                 val_conditions=val_conditions, shift_settings=shift_settings)


def _leave_one_out_name(shift):
    return f"patchmean+aug-without-{shift}"


def _conditions_unseen_by_the_estimate(examples, test_rgb, train_rgb):
    """The held-out band re-stained to each real, differently stained packaged image by
    stain-vector transfer (Macenko, Vahadane), which changes hue as labs do: the conditions the
    estimate never saw. Returns (images, settings) keyed by condition."""
    images, settings = {}, {}
    for method, normalizer in (("macenko", MacenkoNormalizer), ("vahadane", VahadaneNormalizer)):
        for name, example in examples.items():
            condition = f"{method}_to_{name}"
            images[condition] = normalizer().fit(example).transform(test_rgb)
            settings[condition] = dict(
                transfer=f"{method} stain vectors and concentration scale of the packaged image", image=name,
                mean_ratios_vs_train=channel_mean_ratios(images[condition], train_rgb, ignore_white=True)
                .round(4).tolist())
    return images, settings


def _estimate_ranges(train_rgb, shifted_images, settings, **options):
    """The augmentation keys estimated from ``shifted_images`` (validation band) vs the train band."""
    colour = suggest_color_params({"train": train_rgb}, shifted_images, margin=settings.color_margin, **options)
    hed = (suggest_hed_params({"train": train_rgb}, shifted_images, margin=settings.color_margin, **options)
           if settings.hed_jitter else None)
    return {"rotate": True, "flip": True, **colour.params, **(hed.params if hed else {})}, colour, hed


def _recipes(train_rgb, shifted, settings):
    """Recipe name -> AugmentationLayer keys (:data:`~caffe_layers.experiment.settings.MODELS`)."""
    return {"range": _estimate_ranges(train_rgb, shifted, settings)[0],
            "percentile": _estimate_ranges(train_rgb, shifted, settings, percentiles=settings.percentiles)[0],
            "stain_stats": {"rotate": True, "flip": True, "stain_stats": fit_stain_statistics(
                {"train": train_rgb, **shifted}, space=settings.stain_space, spread=settings.stain_spread)}}


def _param_str(keys, seed):
    # Its own stream of the seed: same seed, same augmentation draws.
    return json.dumps({**keys, "seed": derived_seed(seed, 2)})


def _training_specs(seed_list, settings, bands, recipes, leave_one_out, loso_trained, work):
    """Every training of every seed: the two bases, their continuations without and with the
    layer (equal iterations), and the leave-one-shift-out continuations of the per-patch base."""
    specs = {}
    for seed in seed_list:
        seed_settings = dataclasses.replace(settings, seed=seed)

        def spec(name, centring, augment_param_str, iters, lr, base=None, seed=seed, seed_settings=seed_settings):
            folder = work / f"seed_{seed}" / "train" / name.replace("+", "_")
            specs[seed, name] = dict(base=None if base is None else (seed, base), task=dict(
                name=name, centring=centring, augment_param_str=augment_param_str, lists=bands.lists,
                mean_file=bands.mean_file, settings=seed_settings, folder=folder, iters=iters, lr=lr))

        for centring in ("meanfile", "patchmean"):
            spec(f"{centring}_base", centring, None, settings.base_iters, settings.base_lr)
        for name, centring, recipe in MODELS:
            spec(name, centring, _param_str(recipes[recipe], seed) if recipe else None, settings.finetune_iters,
                 settings.finetune_lr, base=f"{centring}_base")
        for held_out in loso_trained:
            spec(_leave_one_out_name(held_out), "patchmean", _param_str(leave_one_out[held_out], seed),
                 settings.finetune_iters, settings.finetune_lr, base="patchmean_base")
    return specs


def _normalizers(train_rgb):
    """Test-time normalisers fitted once on the training band."""
    return {"histmatch": lambda image: match_histograms(image, train_rgb, ignore_white=True),
            "reinhard": ReinhardNormalizer().fit(train_rgb).transform,
            "macenko": MacenkoNormalizer().fit(train_rgb).transform,
            "vahadane": VahadaneNormalizer().fit(train_rgb).transform}


def _table_rows(settings, normalizers):
    """Row name -> (model, test-time normaliser or None, test-time augmentation)."""
    rows = {name: (name, None, False) for name, _, _ in MODELS}
    for normalizer in normalizers:
        rows[f"{BASELINE}+{normalizer}"] = (BASELINE, normalizer, False)
    for model in AUGMENTED_AND_NORMALISED:
        rows[f"{model}+macenko"] = (model, "macenko", False)
    if settings.tta:
        for model in TTA_MODELS:
            rows[f"{model}+tta"] = (model, None, True)
    return rows


class _SeedScoring:
    """One seed's models, exported and loaded, and their scores on the bands."""

    def __init__(self, seed, settings, trained, bands, loso_trained, models_dir, work, log):
        self.seed, self.settings = seed, dataclasses.replace(settings, seed=seed)
        self.exported = {name: export_model(name, centring, trained[seed, name][0], bands.mean_file, self.settings,
                                            models_dir) for name, centring, _ in MODELS}
        self.exported.update({_leave_one_out_name(s): export_model(
            _leave_one_out_name(s), "patchmean", trained[seed, _leave_one_out_name(s)][0], bands.mean_file,
            self.settings, work / f"seed_{seed}") for s in loso_trained})
        self.cards = {name: load_model_card(card) for name, (_, _, _, card) in self.exported.items()}
        self.predictors = {name: make_segmenter(deploy, weights, settings.engine, tile=settings.tile,
                                                multiple=self.cards[name].size_multiple, batch=settings.batch_tiles,
                                                log=log, card=self.cards[name])
                           for name, (deploy, weights, _, _) in self.exported.items()}

    def segment(self, model, image, tta=False):
        predict = dihedral_tta(self.predictors[model]) if tta else self.predictors[model]
        prob = segment_tiled(predict, image, tile=self.settings.tile, overlap=self.settings.overlap,
                             multiple=self.cards[model].size_multiple, batch_size=self.settings.batch_tiles)
        return prob > self.settings.threshold

    def segment_row(self, table_rows, row, image, normalised_images):
        model, normalizer, tta = table_rows[row]
        return self.segment(model, image if normalizer is None else normalised_images[normalizer], tta)

    def engines(self):
        return {name: predict.engine_choice.as_dict() for name, predict in self.predictors.items()}


def _score_seed(scoring, bands, conditions, normalised, table_rows, leave_one_out, loso_model, keep_masks, log):
    """Validation Dice, held-out scores under every condition and the leave-one-out scores of one seed."""
    seed = scoring.seed
    validation = {name: {condition: metrics.dice(scoring.segment(name, image), bands.val_truth)
                         for condition, image in bands.val_conditions.items()} for name, _, _ in MODELS}
    log(f"seed {seed}: validation band Dice: " + "; ".join(
        f"{m} " + " ".join(f"{v:.2f}" for v in validation[m].values()) for m in validation))
    log(f"seed {seed}: segmenting the held-out band under every condition")
    results = {name: {} for name in table_rows}
    rows, masks = [], {}
    for condition, image in conditions.items():
        for model in table_rows:
            mask = scoring.segment_row(table_rows, model, image, normalised[condition])
            if keep_masks:
                masks[model, condition] = mask
            scores = metrics.pool_scores([metrics.segmentation_scores(mask, bands.test_truth)])
            results[model][condition] = scores
            rows.append(dict(seed=seed, model=model, condition=condition, **scores))
        log(f"  {condition}: " + ", ".join(f"{m} {results[m][condition]['dice']:.3f}" for m in table_rows))
    loso = {}
    for held_out in leave_one_out:
        name = loso_model[held_out]
        loso[held_out] = {condition: metrics.pool_scores([metrics.segmentation_scores(
            scoring.segment(name, conditions[condition]), bands.test_truth)]) for condition in ("in_domain", held_out)}
        log(f"  {name}: in_domain {loso[held_out]['in_domain']['dice']:.3f}, "
            f"{held_out} {loso[held_out][held_out]['dice']:.3f}")
    return dict(results=results, validation=validation, rows=rows, masks=masks, loso=loso)


def _condition_figures(figures, conditions, shift_settings, test_rgb, test_truth, first, model_names, results_by_seed,
                       seen):
    crop = (slice(0, min(384, test_rgb.shape[0])), slice(0, min(384, test_rgb.shape[1])))
    for condition, image in conditions.items():
        panels = [(f"input: {condition}", image[crop]), ("ground truth", test_truth[crop])]
        panels += [(f"{m}\nDice {first['results'][m][condition]['dice']:.3f}", first["masks"][m, condition][crop])
                   for m in model_names]
        save_comparison_figure(figures / f"test_{condition}.png", panels, panel_size=3.0, columns=FIGURE_COLUMNS)
    save_comparison_figure(figures / "stain_shifts.png",
                           [(f"{c}\nratios {np.round(shift_settings[c]['mean_ratios_vs_train'], 2).tolist()}",
                             image[crop]) for c, image in conditions.items()], panel_size=3.0, columns=FIGURE_COLUMNS)
    save_bar_figure(figures / "dice_by_condition.png", results_by_seed, list(conditions), model_names, seen=seen)


def _segment_examples(figures, stained_examples, normalizers, scoring, table_rows, train_rgb, settings):
    """The differently stained packaged images (no ground truth), segmented by the first seed's models."""
    examples = {}
    for name, image in stained_examples.items():
        image = _centre_crop(image, settings.example_size)
        normalised_example = {name_: normalize(image) for name_, normalize in normalizers.items()}
        tissue_fraction = {}
        panels = [(name, image)]
        for model in table_rows:
            mask = scoring.segment_row(table_rows, model, image, normalised_example)
            tissue_fraction[model] = float(mask.mean())
            panels.append((f"{model}\nnucleus {100 * mask.mean():.1f} %", overlay(image, mask)))
        save_comparison_figure(figures / f"example_{name}.png", panels, panel_size=3.0, columns=FIGURE_COLUMNS)
        examples[name] = dict(shape=list(image.shape[:2]),
                              mean_ratios_vs_train=channel_mean_ratios(image, train_rgb, ignore_white=True)
                              .round(4).tolist(),
                              nucleus_fraction=tissue_fraction)
    return examples


def _leave_one_out_summary(leave_one_out, loso_trained, per_seed, seed_list):
    return {held_out: dict(
        augment_param_str=format_param_str(keys),
        same_range_as_full=held_out not in loso_trained,
        dice=_mean_sd_record([per_seed[s]["loso"][held_out][held_out]["dice"] for s in seed_list]),
        in_domain_dice=_mean_sd_record([per_seed[s]["loso"][held_out]["in_domain"]["dice"] for s in seed_list]),
        full_range_dice=_mean_sd_record([per_seed[s]["results"]["patchmean+aug"][held_out]["dice"]
                                         for s in seed_list]))
        for held_out, keys in leave_one_out.items()}


def _model_records(first, per_seed, seed_list, out_dir, multiple):
    return {name: dict(centring=centring, augmented=recipe is not None, recipe=recipe,
                       deploy=relative_to(first["exported"][name][0], out_dir),
                       weights=relative_to(first["exported"][name][1], out_dir),
                       mean_file=relative_to(first["exported"][name][2], out_dir) if first["exported"][name][2] else None,
                       model_card=relative_to(first["exported"][name][3], out_dir),
                       input=dict(INPUT_CONVENTION, size_multiple=multiple),
                       training={str(seed): dict(first_loss=per_seed[seed]["training"][name].first_loss,
                                                 last_loss=per_seed[seed]["training"][name].last_loss,
                                                 validation=per_seed[seed]["training"][name].validation[-1:] or None)
                                 for seed in seed_list})
            for name, centring, recipe in MODELS}


def run_experiment(out_dir="results", settings=Settings(), preset="custom", seeds=1, jobs=None):
    """Run the whole experiment; return the summary written to ``out_dir/summary.json``.

    Parameters
    ----------
    out_dir : path
        Files of an earlier run there (its table, summary, figures, models and ``work/``) are
        replaced.
    settings : Settings
    preset : str
        Recorded in the summary.
    seeds : int
        Number of seeds: ``settings.seed``, ``settings.seed + 1``, ... Every table cell is then
        ``mean ± sd`` over them; figures and ``models/`` are the first seed's (the others'
        models are under ``work/seed_<seed>/models``).
    jobs : int, optional
        Worker processes for the trainings (default: one per core, at most one per training).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    use_cpu()
    log = ProgressLog()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_list = [settings.seed + k for k in range(seeds)]

    bands = load_bands(settings, work, log)
    train_rgb, test_rgb, test_truth = bands.train_rgb, bands.test_rgb, bands.test_truth
    conditions, shift_settings = dict(bands.test_conditions), dict(bands.shift_settings)
    seen = {name: name != "in_domain" for name in conditions}  # the synthetic shifts: the estimate saw them
    shifted = {k: v for k, v in bands.val_conditions.items() if k != "in_domain"}
    stained_examples = datasets.load_stained_examples()
    unseen, unseen_settings = _conditions_unseen_by_the_estimate(stained_examples, test_rgb, train_rgb)
    conditions.update(unseen)
    shift_settings.update(unseen_settings)
    seen.update({condition: False for condition in unseen})

    augment, estimate, hed_estimate = _estimate_ranges(train_rgb, shifted, settings)
    log(f"estimated colour range: {estimate.param_str}")
    if hed_estimate is not None:
        log(f"estimated stain-space range: {hed_estimate.param_str}")
    recipes = _recipes(train_rgb, shifted, settings)
    for recipe in ("percentile", "stain_stats"):
        log(f"recipe {recipe}: {format_param_str(recipes[recipe])}")
    leave_one_out = {}  # held-out synthetic shift -> the augmentation keys estimated without it
    if settings.leave_one_out:
        for held_out in shifted:
            leave_one_out[held_out] = _estimate_ranges(
                train_rgb, {k: v for k, v in shifted.items() if k != held_out}, settings)[0]
            log(f"range estimated without {held_out}: {format_param_str(leave_one_out[held_out])}")
    # A range estimated without a shift can equal the full one (the other shifts span it): the
    # full-range model, trained with the same param_str and seed, is then that shift's model.
    loso_trained = [held_out for held_out, keys in leave_one_out.items() if keys != augment]
    loso_model = {held_out: _leave_one_out_name(held_out) if held_out in loso_trained else "patchmean+aug"
                  for held_out in leave_one_out}

    specs = _training_specs(seed_list, settings, bands, recipes, leave_one_out, loso_trained, work)
    jobs = jobs or max(1, min(len(os.sched_getaffinity(0)), 2 * len(seed_list)))
    log(f"{len(specs)} trainings for seed(s) {', '.join(map(str, seed_list))} on {jobs} worker process(es)")
    trained = train_all(log, specs, jobs)

    # Every condition normalised once: the "normalise at test time" rows beside the "augment at
    # train time" ones.
    normalizers = _normalizers(train_rgb)
    log("normalising every condition with " + ", ".join(normalizers))
    normalised = {condition: {name: normalize(image) for name, normalize in normalizers.items()}
                  for condition, image in conditions.items()}
    table_rows = _table_rows(settings, normalizers)
    model_names = list(table_rows)

    per_seed, scorings = {}, {}
    for seed in seed_list:
        first = seed == seed_list[0]
        scorings[seed] = _SeedScoring(seed, settings, trained, bands, loso_trained,
                                      out_dir if first else work / f"seed_{seed}", work, log)
        per_seed[seed] = _score_seed(scorings[seed], bands, conditions, normalised, table_rows, leave_one_out,
                                     loso_model, first, log)
        per_seed[seed].update(exported=scorings[seed].exported, engines=scorings[seed].engines(),
                              training={name: trained[seed, name][1] for name in
                                        [f"{c}_base" for c in ("meanfile", "patchmean")]
                                        + list(scorings[seed].exported)})

    first = per_seed[seed_list[0]]
    results_by_seed = [per_seed[seed]["results"] for seed in seed_list]
    results = _mean_results(results_by_seed)
    figures = out_dir / "figures"
    _condition_figures(figures, conditions, shift_settings, test_rgb, test_truth, first, model_names,
                       results_by_seed, seen)
    log("segmenting the differently stained packaged images (no ground truth; first seed's models)")
    examples = _segment_examples(figures, stained_examples, normalizers, scorings[seed_list[0]], table_rows,
                                 train_rgb, settings)

    write_table([row for seed in seed_list for row in per_seed[seed]["rows"]], out_dir, stem="metrics",
                columns=(("seed", "seed"), *TABLE_COLUMNS))
    table = out_dir / "table.md"
    write_dice_table(table, results_by_seed, list(conditions), model_names, seen=seen)
    loso_summary = None
    if leave_one_out:
        loso_summary = _leave_one_out_summary(leave_one_out, loso_trained, per_seed, seed_list)
        text = table.read_text() + "\n" + _leave_one_out_table(loso_summary)
        write_atomic(table, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    summary = dict(
        description="Nucleus segmentation Dice on the held-out band of histolytics hgsc_nest under stain shifts",
        preset=preset,
        settings=dataclasses.asdict(settings),
        seed=settings.seed,
        seeds=seed_list,
        regions={k: [v.start, v.stop] for k, v in bands.regions.items()},
        test_pixels=int(test_truth.size),
        stain_shifts=shift_settings,
        color_estimate=dict(estimated_on="train band vs the stain-shifted validation band",
                            **_estimate_record(estimate)),
        hed_estimate=None if hed_estimate is None else _estimate_record(hed_estimate),
        augment_param_str=_param_str(augment, seed_list[0]),
        recipes={name: _param_str(keys, seed_list[0]) for name, keys in recipes.items()},
        models=_model_records(first, per_seed, seed_list, out_dir, 2 ** settings.depth),
        histmatch=dict(model=BASELINE, template="train band", ignore_white=True),
        rows={row: dict(model=model, test_time_normaliser=normalizer, tta=tta)
              for row, (model, normalizer, tta) in table_rows.items()},
        conditions={name: dict(seen_by_estimate=seen[name]) for name in conditions},
        engines=first["engines"],
        results=results,
        results_sd=None if seeds == 1 else _sd_results(results_by_seed),
        results_by_seed={str(seed): per_seed[seed]["results"] for seed in seed_list},
        leave_one_shift_out=loso_summary,
        validation_dice={str(seed): per_seed[seed]["validation"] for seed in seed_list},
        examples=examples,
        files=dict(table="table.md", metrics=["metrics.md", "metrics.csv"],
                   figures=sorted(str(p.relative_to(out_dir)) for p in figures.glob("*.png"))),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    write_summary(summary, out_dir)
    log(f"done in {summary['elapsed_s']} s: {table}, {out_dir / 'summary.json'}, {figures}/")
    return summary


def _mean_results(results_by_seed):
    """Cell-wise mean of every score over seeds (counts such as ``pixels`` are the same in each)."""
    first = results_by_seed[0]
    return {model: {condition: {key: (float(np.mean([r[model][condition][key] for r in results_by_seed]))
                                      if isinstance(value, float) else value)
                                for key, value in scores.items()}
                    for condition, scores in conditions.items()}
            for model, conditions in first.items()}


def _sd_results(results_by_seed):
    """Cell-wise sample standard deviation of the Dice over seeds."""
    first = results_by_seed[0]
    return {model: {condition: float(np.std([r[model][condition]["dice"] for r in results_by_seed], ddof=1))
                    for condition in conditions}
            for model, conditions in first.items()}


def _mean_sd_record(values):
    values = np.asarray(values, float)
    return dict(mean=float(values.mean()), sd=float(values.std(ddof=1)) if values.size > 1 else None,
                by_seed=values.tolist())


def _leave_one_out_table(loso_summary):
    """Markdown: each synthetic shift, tested on the model whose range was estimated without it."""
    lines = ["| held-out shift (unseen by its range) | range estimated without it | Dice on the shift, "
             "range without it | Dice on the shift, full range | in-domain Dice, range without it | "
             "shift / in-domain |", "|---|---|---|---|---|---|"]
    for held_out, entry in loso_summary.items():
        on_shift = np.array(entry["dice"]["by_seed"])
        in_domain = np.array(entry["in_domain_dice"]["by_seed"])
        share = mean_sd_text(100 * on_shift / in_domain, "{:.1f}") + " %" if (in_domain > 0).all() else "n/a"
        same = " (the full range: the other shifts span it)" if entry["same_range_as_full"] else ""
        lines.append(f"| {held_out} | `{entry['augment_param_str']}`{same} | {mean_sd_text(on_shift, '{:.3f}')} | "
                     f"{mean_sd_text(entry['full_range_dice']['by_seed'], '{:.3f}')} | "
                     f"{mean_sd_text(in_domain, '{:.3f}')} | {share} |")
    return "\n".join(lines) + "\n"
