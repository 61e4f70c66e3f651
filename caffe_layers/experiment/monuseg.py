"""The stain-robustness benchmark on MoNuSeg: real slides of many labs, the field's instance metrics.

1. Split the 30 official training tiles by tissue source site into training and validation
   (:mod:`~caffe_layers.experiment.monuseg_data`); the 14 test tiles are used only for the
   final table.
2. Make the augmentation recipes (:data:`MONUSEG_MODELS`): the colour and stain range as the
   quick experiment estimates it, from the unlabelled test images against the training images;
   the same estimate from the spread between training sites alone (no test image); a range
   covering the 5-95 % of the observed shifts instead of the extreme; and stain-statistics
   sampling fitted on the training tiles.
3. Train the 2 × 2 design (mean file / per-patch centring × without / with the layer) and the
   per-patch model with each other recipe, every augmented model retrained from its base as a
   user would, every continuation for the same number of iterations.
4. On the validation tiles, choose each model's probability threshold and watershed spacing
   (:func:`~caffe_layers.instances.instances_from_probability`) for the best mean AJI.
5. Score every row on the test tiles at their own resolution: Dice, AJI and PQ per tile; the
   per-patch baseline after each test-time normaliser (fitted on a mosaic of training tiles);
   the augmented model after Macenko normalisation.

Each seed's scores go to ``seeds/seed_<seed>.json`` under the output folder; the table, CSV,
summary and figures are made from every seed file found there, so seeds run in separate
sessions combine into one table (:mod:`~caffe_layers.experiment.monuseg_report`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from .. import metrics
from ..image_io import write_atomic
from ..instances import instances_from_probability
from ..model_card import load_model_card
from ..net.inference.engines import make_segmenter
from ..net.inference.caffe_engine import use_cpu
from ..patches import derived_seed
from ..stain import (MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer, match_histograms,
                     suggest_color_params, suggest_hed_params)
from ..stain.statistics import fit_stain_statistics
from ..tiling import segment_tiled
from .monuseg_data import prepare_monuseg, resample_labels
from .monuseg_report import seed_file, write_report
from .trainings import ProgressLog, export_model, finished_training, relative_to, train_all

__all__ = ["MONUSEG_MODELS", "MONUSEG_PRESETS", "MonusegSettings", "run_monuseg"]

#: (name, centring, augmentation recipe): the trained models. None = no augmentation layer.
#: Recipes (:func:`_recipes`): "test_range" -- the quick experiment's estimate, unlabelled test
#: images against the training images, widened to the most extreme shift; "train_range" -- the
#: same estimate with no test image, validation sites against training sites; "train_percentile"
#: -- no test image, the 5-95 % of the observed shifts instead of the extreme; "stain_stats" --
#: per-sample target statistics drawn from their distribution over the training tiles.
MONUSEG_MODELS = (
    ("meanfile", "meanfile", None),
    ("meanfile+aug", "meanfile", "test_range"),
    ("patchmean", "patchmean", None),
    ("patchmean+aug", "patchmean", "test_range"),
    ("patchmean+aug-trainsites", "patchmean", "train_range"),
    ("patchmean+aug-p5-95", "patchmean", "train_percentile"),
    ("patchmean+stainstats", "patchmean", "stain_stats"),
)
BASELINE = "patchmean"
NORMALISERS = ("histmatch", "reinhard", "macenko", "vahadane")


@dataclasses.dataclass(frozen=True)
class MonusegSettings:
    """Everything that decides a MoNuSeg run's numbers (recorded in ``summary.json``)."""

    seed: int = 0
    mpp: float = 0.5  # training and inference scale, µm per pixel
    # Held-out tissue source sites: lung (21), breast (AR), prostate (CH), bladder (DK), colon (NH).
    val_sites: tuple = ("21", "AR", "CH", "DK", "NH")
    touching_gap: bool = True
    patch_size: int = 96
    batch_size: int = 8
    depth: int = 2
    base_width: int = 16
    base_iters: int = 800
    finetune_iters: int = 400
    base_lr: float = 1e-3
    finetune_lr: float = 5e-4
    validate_every: int = 200
    val_batches: int = 8
    color_margin: float = 0.1
    percentiles: tuple = (5.0, 95.0)  # of the observed shifts, for the "train_percentile" recipe
    hed_jitter: bool = True
    stain_space: str = "lab"  # the "stain_stats" recipe's colour space
    stain_spread: float = 1.0  # its spread multiplier
    tile: int = 256
    overlap: int = 64
    batch_tiles: int = 4
    engine: str = "auto"
    thresholds: tuple = (0.4, 0.5, 0.6)
    min_distances: tuple = (2, 3, 4)  # watershed marker spacing, pixels at the training scale
    min_size: int = 8  # smallest nucleus kept, pixels at the training scale (2 µm² at 0.5 µm/px)
    template_crop: int = 128  # side of each training tile's centre crop in the normalisers' template
    limit: int = 0  # > 0: the first N tiles of each split only (smoke runs)


MONUSEG_PRESETS = {
    "default": MonusegSettings(),
    "tiny": MonusegSettings(patch_size=32, batch_size=2, base_width=4, base_iters=6, finetune_iters=4,
                            validate_every=3, val_batches=1, tile=128, overlap=32, thresholds=(0.5,),
                            min_distances=(3,), template_crop=64, limit=2, val_sites=("21", "AR")),
}


def _range_keys(train, targets, settings, **options):
    colour = suggest_color_params(train, targets, margin=settings.color_margin, **options)
    hed = suggest_hed_params(train, targets, margin=settings.color_margin, **options) if settings.hed_jitter else None
    return {"rotate": True, "flip": True, **colour.params, **(hed.params if hed else {})}


def _recipes(data, settings):
    """Recipe name -> the AugmentationLayer keys it trains with (no seed yet)."""
    train = {name: t.rgb for name, t in data.train.items()}
    val = {name: t.rgb for name, t in data.val.items()}
    test = {name: t.rgb for name, t in data.test.items()}
    return {
        "test_range": _range_keys(train, test, settings),
        "train_range": _range_keys(train, val, settings),
        "train_percentile": _range_keys(train, val, settings, percentiles=settings.percentiles),
        "stain_stats": {"rotate": True, "flip": True,
                        "stain_stats": fit_stain_statistics(train, space=settings.stain_space,
                                                            spread=settings.stain_spread)},
    }


def _aliases(recipes):
    """Model -> an earlier model with the same centring and keys (trained once, scored as both)."""
    aliases, seen = {}, {}
    for name, centring, recipe in MONUSEG_MODELS:
        key = (centring, json.dumps(recipes.get(recipe), sort_keys=True))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _training_specs(data, settings, recipes, seed, work):
    """Every training of one seed: two bases, then their continuations (equal iterations); a
    model whose keys equal an earlier one's (:func:`_aliases`) is not trained twice."""
    seed_settings = dataclasses.replace(settings, seed=seed)
    specs = {}

    def spec(name, centring, keys, iters, lr, base=None):
        folder = work / f"seed_{seed}" / "train" / name.replace("+", "_")
        param_str = None if keys is None else json.dumps({**keys, "seed": derived_seed(seed, 2)})
        specs[seed, name] = dict(base=None if base is None else (seed, base), task=dict(
            name=name, centring=centring, augment_param_str=param_str, lists=data.lists,
            mean_file=data.mean_file, settings=seed_settings, folder=folder, iters=iters, lr=lr))

    for centring in ("meanfile", "patchmean"):
        spec(f"{centring}_base", centring, None, settings.base_iters, settings.base_lr)
    aliases = _aliases(recipes)
    for name, centring, recipe in MONUSEG_MODELS:
        if name not in aliases:
            spec(name, centring, None if recipe is None else recipes[recipe], settings.finetune_iters,
                 settings.finetune_lr, base=f"{centring}_base")
    return specs


def _template_mosaic(tiles, side):
    """A grid of the training tiles' centre crops: one template for the normalisers."""
    crops = []
    for tile in tiles.values():
        h, w = tile.rgb.shape[:2]
        s = min(side, h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crops.append(np.ascontiguousarray(tile.rgb[top:top + s, left:left + s]))
    s = min(c.shape[0] for c in crops)
    crops = [c[:s, :s] for c in crops]
    columns = int(np.ceil(np.sqrt(len(crops))))
    crops += [crops[i % len(crops)] for i in range(columns * columns - len(crops))]
    return np.concatenate([np.concatenate(crops[r * columns:(r + 1) * columns], axis=1)
                           for r in range(len(crops) // columns)], axis=0)


def _normalisers(template):
    return {"histmatch": lambda image: match_histograms(image, template, ignore_white=True),
            "reinhard": ReinhardNormalizer().fit(template).transform,
            "macenko": MacenkoNormalizer().fit(template).transform,
            "vahadane": VahadaneNormalizer().fit(template).transform}


def _rows():
    """Table row -> (model, test-time normaliser or None)."""
    rows = {name: (name, None) for name, _, _ in MONUSEG_MODELS}
    rows.update({f"{BASELINE}+{n}": (BASELINE, n) for n in NORMALISERS})
    # Augmented at training time and normalised at test time too.
    for model in ("patchmean+aug", "patchmean+stainstats"):
        rows[f"{model}+macenko"] = (model, "macenko")
    return rows


class _Scorer:
    """Probability maps of one model at the training scale, and its instances at the truth's scale."""

    def __init__(self, predict, settings, card):
        self.predict, self.settings, self.card = predict, settings, card
        self.choice = None

    def probability(self, rgb):
        s = self.settings
        return segment_tiled(self.predict, rgb, tile=s.tile, overlap=s.overlap, multiple=self.card.size_multiple,
                             batch_size=s.batch_tiles)

    def instances(self, prob, shape, threshold, min_distance):
        labels = instances_from_probability(prob, threshold, min_distance=min_distance,
                                            min_size=self.settings.min_size)
        return resample_labels(labels, shape)

    def choose(self, val_probs, val_tiles):
        """The (threshold, min_distance) with the best mean AJI on the validation tiles."""
        s, table = self.settings, []
        for threshold in s.thresholds:
            for distance in s.min_distances:
                scores = [metrics.instance_scores(self.instances(val_probs[n], t.native_shape, threshold, distance),
                                                  t.truth) for n, t in val_tiles.items()]
                table.append(dict(threshold=threshold, min_distance=distance,
                                  **{k: float(np.mean([sc[k] for sc in scores])) for k in ("dice", "aji", "pq")}))
        best = max(table, key=lambda row: (row["aji"], row["dice"]))
        self.choice = (best["threshold"], best["min_distance"])
        return best, table

    def score(self, prob, truth):
        labels = self.instances(prob, truth.shape, *self.choice)
        return labels, metrics.instance_scores(labels, truth)


def _logged_seconds(result):
    """Wall time of one training, from its CSV log (also for a reused training)."""
    with open(result.log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1]["elapsed_s"]) if rows else None


def _export_all(trained, seed, data, settings, folder):
    return {name: export_model(name, centring, trained[seed, name][0], data.mean_file, settings, folder,
                               mpp=settings.mpp)
            for name, centring, _ in MONUSEG_MODELS}


def _score_seed(seed, data, settings, trained, normalised, out_dir, work, log):
    """Validation choices and test scores of one seed's models; returns the seed record."""
    exported = _export_all(trained, seed, data, dataclasses.replace(settings, seed=seed),
                           work / f"seed_{seed}")
    scorers, validation, choices, engines = {}, {}, {}, {}
    for name, (deploy, weights, _, card_path) in exported.items():
        card = load_model_card(card_path)
        predict = make_segmenter(deploy, weights, settings.engine, tile=settings.tile,
                                 multiple=card.size_multiple, batch=settings.batch_tiles, log=log, card=card)
        engines[name] = predict.engine_choice.as_dict()
        scorers[name] = _Scorer(predict, settings, card)
        val_probs = {n: scorers[name].probability(t.rgb) for n, t in data.val.items()}
        best, grid = scorers[name].choose(val_probs, data.val)
        validation[name], choices[name] = best, grid
        log(f"seed {seed}: {name}: validation Dice {best['dice']:.3f} AJI {best['aji']:.3f} PQ {best['pq']:.3f} "
            f"(threshold {best['threshold']}, min distance {best['min_distance']})")
    scores, masks = {}, {}
    for row, (model, normaliser) in _rows().items():
        scores[row] = {}
        for name, tile in data.test.items():
            image = tile.rgb if normaliser is None else normalised[normaliser][name]
            labels, scores[row][name] = scorers[model].score(scorers[model].probability(image), tile.truth)
            masks[row, name] = labels
        log(f"seed {seed}: test {row}: " + " ".join(
            f"{k} {np.mean([s[k] for s in scores[row].values()]):.3f}" for k in ("dice", "aji", "pq")))
    return dict(seed=seed, validation=validation, post_processing_grid=choices, test=scores, engines=engines,
                exported={name: [relative_to(p, out_dir) if p else None for p in paths]
                          for name, paths in exported.items()},
                training={name: dict(first_loss=trained[seed, name][1].first_loss,
                                     last_loss=trained[seed, name][1].last_loss,
                                     seconds=_logged_seconds(trained[seed, name][1]))
                          for name in [f"{c}_base" for c in ("meanfile", "patchmean")]
                          + [m for m, _, _ in MONUSEG_MODELS]}), masks, exported


def _train_seeds(data, settings, recipes, seed_list, work, jobs, log):
    """Every training of the seeds; returns (key -> (weights, TrainResult), number reused)."""
    specs = {}
    for seed in seed_list:
        specs.update(_training_specs(data, settings, recipes, seed, work))
    jobs = jobs or max(1, min(len(os.sched_getaffinity(0)), len(specs)))
    log(f"{len(specs)} trainings for seed(s) {', '.join(map(str, seed_list))} on {jobs} worker process(es)")
    reused = sum(finished_training(spec["task"]) is not None for spec in specs.values())
    return train_all(log, specs, jobs, reuse=True), reused  # a run stopped after training resumes there


def _normalised_test_tiles(data, settings):
    """Every test tile after every test-time normaliser: normaliser -> tile name -> image."""
    normalise = _normalisers(_template_mosaic(data.train, settings.template_crop))
    return {n: {name: f(t.rgb) for name, t in data.test.items()} for n, f in normalise.items()}


def _write_seed_record(out_dir, record):
    path = seed_file(out_dir, record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, default=float) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return path


def _tile_record(data):
    return dict(train=sorted(data.train), val=sorted(data.val),
                test={n: dict(organ=t.organ, site=t.site) for n, t in data.test.items()})


def run_monuseg(data_root, out_dir="results/monuseg", settings=MonusegSettings(), preset="default", seeds=1,
                jobs=None):
    """Run the benchmark for ``seeds`` seeds from ``settings.seed``; write the combined report.

    Seeds whose ``seeds/seed_<seed>.json`` already exists under ``out_dir`` are not run again;
    the report is made from every seed file there. Returns the summary.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    use_cpu()
    log = ProgressLog("monuseg")
    out_dir = Path(out_dir)
    work = out_dir / "work"
    seed_list = [s for s in range(settings.seed, settings.seed + seeds) if not seed_file(out_dir, s).exists()]
    if not seed_list:
        log(f"seed(s) {settings.seed}-{settings.seed + seeds - 1} are on record already: only the report is made")
        return write_report(out_dir, log=log)
    started = time.perf_counter()
    timer = _Timer()
    log(f"loading MoNuSeg from {data_root} at {settings.mpp} µm/px")
    with timer("data_s"):
        data = prepare_monuseg(data_root, work / "data", mpp=settings.mpp, val_sites=settings.val_sites,
                               patch_size=settings.patch_size, touching_gap=settings.touching_gap,
                               limit=settings.limit)
        recipes = _recipes(data, settings)
    log(f"{len(data.train)} training, {len(data.val)} validation (sites {', '.join(settings.val_sites)}), "
        f"{len(data.test)} test tiles")
    for key, keys in recipes.items():
        log(f"{key}: {json.dumps(keys)}")
    aliases = _aliases(recipes)
    for name, same in aliases.items():
        log(f"{name} trains with the keys of {same}: trained once, scored as both")
    with timer("training_s"):
        trained, reused = _train_seeds(data, settings, recipes, seed_list, work, jobs, log)
        for seed in seed_list:
            trained.update({(seed, name): trained[seed, same] for name, same in aliases.items()})
    with timer("normalising_s"):
        normalised = _normalised_test_tiles(data, settings)
    for seed in seed_list:
        with timer(f"scoring_seed_{seed}_s"):
            record, masks, exported = _score_seed(seed, data, settings, trained, normalised, out_dir, work, log)
        record.update(settings=dataclasses.asdict(dataclasses.replace(settings, seed=seed)), preset=preset,
                      recipes=recipes, aliases=aliases, reused_trainings=reused, timings=timer.rounded(), elapsed_s=round(time.perf_counter() - started, 1),
                      tiles=_tile_record(data))
        path = _write_seed_record(out_dir, record)
        write_report(out_dir, data, masks, exported, log=log)
        log(f"seed {seed} done in {record['elapsed_s']} s: {path}")
    return write_report(out_dir, log=log)


class _Timer:
    """Named wall-clock durations: ``with timer("training_s"): ...``."""

    def __init__(self):
        self.seconds = {}
        self._name = None

    def __call__(self, name):
        self._name = name
        return self

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start

    def rounded(self):
        return {k: round(v, 1) for k, v in self.seconds.items()}
