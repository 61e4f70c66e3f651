"""Compare nuclei segmenters on the same images, as they are and stain-normalised.

:func:`compare_models` segments every image with every model under each input condition
(``original``, and ``matched`` = histogram-matched to a template when one is given), scores
the masks against ground truth where it exists and writes into ``out_dir``:

* ``table.md`` and ``table.csv``: pooled Dice, IoU and object F1 per model × condition, and
  AJI and PQ (:func:`caffe_layers.metrics.instance_scores`, mean over the images) where the
  ground truth holds nucleus instances;
* ``instances/<image>_<condition>_<model>.png`` (with ``instance_labels``): the predicted
  instances as 16-bit labels;
* ``figures/<image>_<condition>.png``: input, ground truth and each model's mask side by side;
* ``summary.json``: the same scores with the number of images and pixels measured, plus the
  per-image scores.

Scores are pooled over images (:func:`caffe_layers.metrics.pool_scores`): a condition's
Dice is that of all its pixels together, not a mean of per-image Dice. AJI and PQ are the mean
of the per-image values, as the field reports them (MoNuSeg: per tile, then averaged).

Predicted instances come from each probability map by the documented step
(:func:`caffe_layers.instances.instances_from_probability`, its parameters in ``instances``).

The writers are in :mod:`caffe_layers.reports`. Command line (:mod:`caffe_layers.cli.compare`)::

    caffe-stain-compare --model NAME DEPLOY WEIGHTS [--model ...] \\
        --image IMG [--mask MASK] [--image ...] [--template T.png] --out DIR
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import metrics
from ...annotations import write_instance_image
from ...image_io import same_file
from ...instances import instances_from_probability
from ...reports import TABLE_COLUMNS, save_comparison_figure, write_summary, write_table
from ...stain import match_histograms
from ...model_card import ModelCard
from ...tiling import (DEFAULT_MULTIPLE, DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE, check_threshold,
                      dihedral_tta, segment_tiled)
from .engines import make_segmenter, probe_side, report_to_stderr

__all__ = ["ModelSpec", "compare_models"]


@dataclass(frozen=True)
class ModelSpec:
    """A named Caffe deploy net, its weights and (optionally) its model card."""

    name: str
    deploy: Path
    weights: Path
    card: ModelCard | None = None


_SCORE_KEYS = ("dice", "iou", "object_f1", "precision", "recall")
_INSTANCE_KEYS = ("aji", "pq", "dq", "sq")
_INSTANCE_COLUMNS = (("instance_images", "images with instances"), ("aji", "AJI"), ("pq", "PQ"))


def _default_conditions(template_rgb):
    conditions = {"original": None}
    if template_rgb is not None:
        def matched(rgb):
            return match_histograms(np.asarray(rgb), template_rgb, ignore_white=True)

        conditions["matched"] = matched
    return conditions


def _safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def compare_models(models, images, out_dir, template_rgb=None, conditions=None, tile=DEFAULT_TILE,
                   overlap=DEFAULT_OVERLAP, threshold=DEFAULT_THRESHOLD, multiple=DEFAULT_MULTIPLE,
                   figures=True, progress=False, predictors=None, tta=False, batch_size=1, engine="auto",
                   engine_log=report_to_stderr, overwrite=False, inputs=(), instances=None, instance_labels=False):
    """Segment images with several models and conditions; score and write the comparison.

    Parameters
    ----------
    models : list of ModelSpec
        Model names must be unique.
    images : list of (str, (H, W, 3) uint8 array, (H, W) array or None)
        ``(name, rgb, truth)``; ``truth`` is a mask (bool, nucleus where true or > 0) or
        instance labels (an integer array, 0 background; e.g.
        :func:`caffe_layers.annotations.read_ground_truth`), which adds AJI and PQ; it may be
        ``None``: the image is then segmented and drawn but not scored.
    out_dir : path
    template_rgb : (h, w, 3) uint8 array, optional
        Adds the condition ``matched``: the input histogram-matched to this template with
        :func:`caffe_layers.stain.match_histograms` (``ignore_white=True``).
    conditions : dict of str -> callable or None, optional
        Replaces the default conditions: name -> function ``rgb -> rgb`` applied to each
        input before segmenting (``None`` = as is).
    tile, overlap, threshold, multiple, progress
        See :func:`caffe_layers.tiling.segment_tiled`.
    figures : bool
        Write one figure per image and condition.
    predictors : dict of str -> callable, optional
        Ready ``predict`` callables by model name, used instead of loading that model's
        deploy/weights (e.g. nets already in memory).
    tta : bool
        Average each model over the 8 rotations/flips of every tile.
    batch_size : int
        Tiles per forward pass.
    engine : {"auto", "caffe", "opencv"}
        Inference engine of the models loaded here (:func:`caffe_layers.net.inference.engines.make_segmenter`);
        each choice is recorded under ``engines`` in the summary.
    engine_log : callable or None
        Receives the one-line report of each engine choice (default: stderr; None: silent).
    overwrite : bool
        Replace the tables, summary and figures of an earlier comparison in ``out_dir``
        (refused before anything runs otherwise).
    inputs : sequence of path
        The files the images, masks and template were read from. No output may replace one of
        them, nor a model's deploy, weights or card file, even with ``overwrite``.
    instances : dict, optional
        Keyword arguments of :func:`~caffe_layers.instances.instances_from_probability`
        (default: its defaults), for the predicted instances.
    instance_labels : bool
        Also write the predicted instances of every image, condition and model.

    Returns
    -------
    dict
        The summary also written to ``summary.json``: ``results[model][condition]`` with
        pooled ``dice, iou, object_f1, precision, recall``, ``images`` (number scored),
        ``instance_images`` and the mean ``aji, pq, dq, sq`` over them (None without instances),
        ``images_segmented``, ``pixels`` and the pooled counts; ``per_image`` scores; and
        the paths written under ``files``.
    """
    threshold = check_threshold(threshold)
    names = [m.name for m in models]
    image_names = _check_names_and_masks(models, images)
    if conditions is None:
        conditions = _default_conditions(template_rgb)
    for image_name, rgb, truth in images:
        if truth is not None:
            _check_mask_shape(image_name, rgb, truth)
    out_dir = Path(out_dir)
    planned = _planned_outputs(out_dir, image_names, conditions, figures)
    if instance_labels:
        planned += [_instances_path(out_dir, image, condition, name) for image in image_names
                    for condition in conditions for name in names]
    _refuse_replacing(planned, models, inputs, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if instance_labels:
        (out_dir / "instances").mkdir(exist_ok=True)
    predictors, tiling, engines = _load_predictors(models, images, predictors, tile, overlap, multiple, tta,
                                                   batch_size, engine, engine_log)
    per_image, segmented, figure_paths = _segment_and_score(
        images, conditions, names, predictors, tiling, out_dir, tile=tile, threshold=threshold, figures=figures,
        progress=progress, batch_size=batch_size, instances=dict(instances or {}), instance_labels=instance_labels)
    results, rows = _pooled_results(names, conditions, per_image, segmented)
    with_instances = any("aji" in scores for scores in per_image)
    md_path, csv_path = write_table(rows, out_dir, columns=TABLE_COLUMNS + (_INSTANCE_COLUMNS if with_instances else ()))
    summary = dict(
        models=[dict(name=m.name, deploy=str(m.deploy), weights=str(m.weights),
                     card=None if m.card is None else m.card.source, **tiling[m.name]) for m in models],
        conditions=list(conditions),
        engines=engines,
        settings=dict(tile=tile, overlap=overlap, threshold=threshold, multiple=multiple, tta=tta,
                      pooling="sum of pixel/object counts over images; AJI and PQ: mean over images",
                      instances=_instance_settings(instances)),
        results=results,
        per_image=per_image,
        files=dict(table_md=md_path.name, table_csv=csv_path.name,
                   figures=[str(p.relative_to(out_dir)) for p in figure_paths]),
    )
    write_summary(summary, out_dir)
    return summary


def _check_names_and_masks(models, images):
    """Unique model and image names; returns the image names."""
    names = [m.name for m in models]
    if not models:
        raise ValueError("compare_models needs at least one model")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    image_names = [name for name, _, _ in images]
    if len(set(image_names)) != len(image_names):
        raise ValueError(f"image names must be unique, got {image_names}")
    return image_names


def _check_mask_shape(image_name, rgb, truth):
    if np.shape(truth) != tuple(rgb.shape[:2]):
        raise ValueError(f"image {image_name!r}: mask shape {np.shape(truth)} does not "
                         f"match image shape {tuple(rgb.shape[:2])}")


def _instance_settings(instances):
    """The instance step's parameters as run: the given ones over the library's defaults."""
    import inspect

    parameters = inspect.signature(instances_from_probability).parameters
    defaults = {name: value.default for name, value in parameters.items() if value.kind == value.KEYWORD_ONLY}
    return {**defaults, **dict(instances or {})}


def _instances_path(out_dir, image_name, condition, model_name):
    return out_dir / "instances" / f"{_safe_name(image_name)}_{_safe_name(condition)}_{_safe_name(model_name)}.png"


def _holds_instances(truth):
    """Integer ground truth is instance labels; a bool mask is not."""
    return truth is not None and np.issubdtype(np.asarray(truth).dtype, np.integer)


def _figure_path(out_dir, image_name, condition):
    return out_dir / "figures" / f"{_safe_name(image_name)}_{_safe_name(condition)}.png"


def _planned_outputs(out_dir, image_names, conditions, figures):
    outputs = [out_dir / name for name in ("table.md", "table.csv", "summary.json")]
    if figures:
        outputs += [_figure_path(out_dir, image, condition) for image in image_names for condition in conditions]
    return outputs


def _refuse_replacing(outputs, models, inputs, overwrite):
    """No output replaces an input or a model's file; an earlier comparison only with ``overwrite``."""
    protected = list(inputs)
    for model in models:
        protected += [model.deploy, model.weights]
        if model.card is not None and os.path.isfile(model.card.source):  # "defaults" etc.: no file
            protected.append(model.card.source)
    for path in outputs:
        for given in protected:
            if same_file(path, given):
                raise ValueError(f"{path}: the comparison would replace the input {given}; choose another --out")
    existing = [path for path in outputs if os.path.lexists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists, from an earlier comparison "
                              "(use --overwrite to replace it, or another --out)")


def _load_predictors(models, images, predictors, tile, overlap, multiple, tta, batch_size, engine, engine_log):
    """Each model's ``predict`` (given or loaded), its tiling and its engine choice.

    Each model tiles with its card's size multiple and at least twice the context it needs.
    """
    predictors = dict(predictors or {})
    probe = probe_side(tile, [max(rgb.shape[:2]) for _, rgb, _ in images])
    for model in models:
        if model.name not in predictors:
            predictors[model.name] = make_segmenter(
                model.deploy, model.weights, engine, tile=probe, batch=batch_size, log=engine_log,
                card=model.card, multiple=model.card.size_multiple if model.card else multiple)
    tiling = {}
    engines = {name: predict.engine_choice.as_dict() for name, predict in predictors.items()
               if getattr(predict, "engine_choice", None) is not None}
    for model in models:
        context = getattr(predictors[model.name], "context", None)
        tiling[model.name] = dict(multiple=model.card.size_multiple if model.card else multiple,
                                  overlap=max(overlap, 2 * context) if context else overlap)
        if tta:
            predictors[model.name] = dihedral_tta(predictors[model.name])
    return predictors, tiling, engines


def _segment_and_score(images, conditions, names, predictors, tiling, out_dir, *, tile, threshold, figures, progress,
                       batch_size, instances, instance_labels):
    """Every image under every condition by every model: per-image scores, counts and figures."""
    per_image = []
    figure_paths = []
    segmented = {(m, c): 0 for m in names for c in conditions}
    for image_name, rgb, truth in images:
        true_labels = np.asarray(truth) if _holds_instances(truth) else None
        if truth is not None:
            truth = np.asarray(truth) != 0
            _check_mask_shape(image_name, rgb, truth)
        for condition, transform in conditions.items():
            shown = rgb if transform is None else transform(rgb)
            panels = [(f"{image_name} ({condition})", shown),
                      ("ground truth", None if truth is None else truth)]
            for model_name in names:
                prob = segment_tiled(predictors[model_name], shown, tile=tile, progress=progress,
                                     batch_size=batch_size, **tiling[model_name])
                mask = prob > threshold
                segmented[model_name, condition] += 1
                label = model_name
                labels = None
                if true_labels is not None or instance_labels:
                    labels = instances_from_probability(prob, threshold, **instances)
                if instance_labels:
                    write_instance_image(_instances_path(out_dir, image_name, condition, model_name), labels,
                                         overwrite=True)  # replacing an earlier run was checked up front
                if truth is not None:
                    scores = metrics.segmentation_scores(mask, truth)
                    if true_labels is not None:
                        found = metrics.instance_scores(labels, true_labels)
                        scores.update({key: found[key] for key in _INSTANCE_KEYS})
                    per_image.append(dict(model=model_name, condition=condition,
                                          image=image_name, **scores))
                    label += f"\nDice {scores['dice']:.3f}  F1 {scores['object_f1']:.3f}"
                    if true_labels is not None:
                        label += f"\nAJI {scores['aji']:.3f}  PQ {scores['pq']:.3f}"
                panels.append((label, mask))
            if figures:
                figure_paths.append(save_comparison_figure(_figure_path(out_dir, image_name, condition), panels))
    return per_image, segmented, figure_paths


def _pooled_results(names, conditions, per_image, segmented):
    """``results[model][condition]`` pooled over the images, and the same as table rows."""
    results, rows = {}, []
    for model_name in names:
        results[model_name] = {}
        for condition in conditions:
            scored = [s for s in per_image
                      if s["model"] == model_name and s["condition"] == condition]
            pooled = metrics.pool_scores(scored)
            if not scored:  # nothing measured: no score, rather than the empty-mask 1.0
                for key in _SCORE_KEYS:
                    pooled[key] = None
            with_instances = [s for s in scored if "aji" in s]
            pooled["instance_images"] = len(with_instances)
            for key in _INSTANCE_KEYS:  # the mean over images, as the field reports AJI and PQ
                pooled[key] = float(np.mean([s[key] for s in with_instances])) if with_instances else None
            pooled["images_segmented"] = segmented[model_name, condition]
            results[model_name][condition] = pooled
            rows.append(dict(model=model_name, condition=condition, **pooled))
    return results, rows
