"""Which augmentation settings keep the in-domain Dice, judged on the validation band only.

The experiment's augmented per-patch model pays some in-domain Dice for its robustness. This
study continues the experiment's per-patch base net (same seed, same data) with variants of
the augmentation -- a narrower range, no stain-space jitter, hue jitter, longer fine-tuning,
a curriculum from half to the full range -- and scores each on the validation band, in-domain
and under the synthetic shifts. The held-out band is never looked at, so a variant chosen here
can be carried to the experiment without tuning on its test conditions.

Run it with ``python scripts/tune_augmentation.py`` (``--help`` for options).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .. import metrics
from ..image_io import write_atomic
from ..net.inference.engines import make_segmenter
from ..net.inference.caffe_engine import use_cpu
from ..patches import derived_seed
from ..reports import write_summary
from ..stain import suggest_color_params, suggest_hed_params
from ..model_card import load_model_card
from ..tiling import segment_tiled
from .run import load_bands
from .trainings import ProgressLog, export_model, train_all
from .settings import Settings

__all__ = ["VARIANTS", "tune_augmentation"]

# name -> how the variant differs from the experiment's augmented continuation.
VARIANTS = {
    "no augmentation": "the base continued without the layer (the in-domain reference)",
    "as in the experiment": "the estimated range (margin 0.1), colour + stain-space jitter",
    "margin 0": "the estimated range without its 10 % margin",
    "colour only": "no stain-space (HED) jitter",
    "hue jitter 5°": "plus stain_angle 5: the H and E vectors turned by up to 5 degrees",
    "2× iterations": "twice the fine-tuning iterations",
    "curriculum": "half the fine-tuning at half the range, then the rest at the full range",
}


def _halved(keys):
    """The augmentation keys with every range halved towards the identity."""
    half = dict(keys)
    if "color_a_min" in half:
        half["color_a_min"] = round(1 - (1 - half["color_a_min"]) / 2, 3)
        half["color_a_max"] = round(1 + (half["color_a_max"] - 1) / 2, 3)
    if "hed_alpha" in half:
        half["hed_alpha"] = round(half["hed_alpha"] / 2, 3)
    return half


def tune_augmentation(out_dir, settings=Settings(), jobs=None):
    """Train every variant of :data:`VARIANTS` from one per-patch base; score them on validation.

    Returns the summary written to ``out_dir/tuning.json`` (and ``out_dir/tuning.md``):
    per variant its ``param_str``, iterations, validation Dice in-domain and per shift, the
    mean and the worst shift as shares of its in-domain Dice.
    """
    use_cpu()
    log = ProgressLog()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    started = time.perf_counter()
    bands = load_bands(settings, work, log)
    train_rgb = bands.train_rgb
    shifted = {k: v for k, v in bands.val_conditions.items() if k != "in_domain"}

    def estimate(margin, hed=True):
        keys = {"rotate": True, "flip": True,
                **suggest_color_params({"train": train_rgb}, shifted, margin=margin).params}
        if hed:
            keys.update(suggest_hed_params({"train": train_rgb}, shifted, margin=margin).params)
        return keys

    reference = estimate(settings.color_margin)
    ranges = {"no augmentation": None, "as in the experiment": reference, "margin 0": estimate(0.0),
              "colour only": estimate(settings.color_margin, hed=False),
              "hue jitter 5°": {**reference, "stain_angle": 5.0}, "2× iterations": reference,
              "curriculum": reference}
    iterations = {name: settings.finetune_iters for name in ranges}
    iterations["2× iterations"] *= 2
    seed = settings.seed

    def param_str(keys):
        return None if keys is None else json.dumps({**keys, "seed": derived_seed(seed, 2)})

    specs = {}

    def spec(name, keys, iters, base):
        folder = work / "train" / name.replace(" ", "_").replace("×", "x").replace("°", "deg")
        specs[seed, name] = dict(base=None if base is None else (seed, base), task=dict(
            name=name, centring="patchmean", augment_param_str=param_str(keys), lists=bands.lists,
            mean_file=bands.mean_file, settings=settings, folder=folder, iters=iters,
            lr=settings.base_lr if base is None else settings.finetune_lr))

    spec("patchmean_base", None, settings.base_iters, None)
    for name, keys in ranges.items():
        if name == "curriculum":
            half = settings.finetune_iters // 2
            spec("curriculum (first half)", _halved(keys), half, "patchmean_base")
            spec(name, keys, settings.finetune_iters - half, "curriculum (first half)")
        else:
            spec(name, keys, iterations[name], "patchmean_base")
    trained = train_all(log, specs, jobs or 2)

    results = {}
    for name, keys in ranges.items():
        deploy, weights, _, card = export_model(name.replace(" ", "_"), "patchmean", trained[seed, name][0],
                                                 bands.mean_file, settings, work)
        card = load_model_card(card)
        predict = make_segmenter(deploy, weights, settings.engine, tile=settings.tile, multiple=card.size_multiple,
                                 batch=settings.batch_tiles, log=None, card=card)
        dice = {condition: metrics.dice(segment_tiled(predict, image, tile=settings.tile, overlap=settings.overlap,
                                                      multiple=card.size_multiple,
                                                      batch_size=settings.batch_tiles) > settings.threshold,
                                        bands.val_truth)
                for condition, image in bands.val_conditions.items()}
        shifts = [dice[c] for c in shifted]
        in_domain = dice["in_domain"]
        results[name] = dict(description=VARIANTS[name], param_str=param_str(keys), iterations=iterations[name],
                             validation_dice=dice, mean_shift_dice=float(np.mean(shifts)),
                             mean_share=float(np.mean(shifts) / in_domain) if in_domain else None,
                             worst_share=float(min(shifts) / in_domain) if in_domain else None)
        log(f"{name}: in-domain {in_domain:.3f}, shifts " + " ".join(f"{d:.3f}" for d in shifts))

    lines = ["| variant | fine-tuning iterations | validation in-domain Dice | mean over shifts | "
             "mean / in-domain | worst shift / in-domain | what differs |", "|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        def share(value):
            return "n/a" if value is None else f"{100 * value:.1f} %"
        lines.append(f"| {name} | {entry['iterations']} | {entry['validation_dice']['in_domain']:.3f} | "
                     f"{entry['mean_shift_dice']:.3f} | {share(entry['mean_share'])} | {share(entry['worst_share'])} | "
                     f"{entry['description']} |")
    text = "\n".join(lines) + "\n"
    write_atomic(out_dir / "tuning.md", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    summary = dict(description="Augmentation variants on the experiment's per-patch base, scored on the "
                               "validation band (the held-out band is not used)",
                   settings=dataclasses.asdict(settings), variants=results,
                   elapsed_s=round(time.perf_counter() - started, 1))
    write_summary(summary, out_dir, name="tuning.json")
    log(f"done in {summary['elapsed_s']} s: {out_dir / 'tuning.md'}")
    return summary
