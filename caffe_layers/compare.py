"""Compare nuclei segmenters on the same images, as they are and stain-normalised.

:func:`compare_models` segments every image with every model under each input condition
(``original``, and ``matched`` = histogram-matched to a template when one is given), scores
the masks against ground truth where it exists and writes into ``out_dir``:

* ``table.md`` and ``table.csv``: pooled Dice, IoU and object F1 per model × condition;
* ``figures/<image>_<condition>.png``: input, ground truth and each model's mask side by side;
* ``summary.json``: the same scores with the number of images and pixels measured, plus the
  per-image scores.

Scores are pooled over images (:func:`caffe_layers.metrics.pool_scores`): a condition's
Dice is that of all its pixels together, not a mean of per-image Dice.

The writers (:func:`write_table`, :func:`save_comparison_figure`, :func:`write_summary`)
are reusable with other models and conditions. Command line (``compare_main``)::

    caffe-stain-compare --model NAME DEPLOY WEIGHTS [--model ...] \\
        --image IMG [--mask MASK] [--image ...] [--template T.png] --out DIR
"""
import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .imageio import read_mask, read_rgb
from .segment import CaffeSegmenter, segment_tiled

__all__ = [
    "ModelSpec",
    "TABLE_COLUMNS",
    "compare_models",
    "write_table",
    "write_summary",
    "save_comparison_figure",
    "compare_main",
]


@dataclass(frozen=True)
class ModelSpec:
    """A named Caffe deploy net and its weights."""

    name: str
    deploy: Path
    weights: Path


# (key in a row dict, column header); rows may hold more keys, only these are tabulated.
TABLE_COLUMNS = (
    ("model", "model"),
    ("condition", "condition"),
    ("images", "images"),
    ("pixels", "pixels"),
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("object_f1", "object F1"),
    ("precision", "precision"),
    ("recall", "recall"),
)
_SCORE_KEYS = ("dice", "iou", "object_f1", "precision", "recall")


def _cell(value, markdown):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a" if markdown else ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_table(rows, out_dir, stem="table", columns=TABLE_COLUMNS):
    """Write rows of scores as ``<stem>.md`` (Markdown) and ``<stem>.csv``.

    Parameters
    ----------
    rows : list of dict
        One per table row; missing keys and ``None`` print as ``n/a`` (empty in the CSV).
    out_dir : path
        Created if missing.
    stem : str
    columns : sequence of (key, header)

    Returns
    -------
    md_path, csv_path : Path
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = [header for _, header in columns]
    md_lines = ["| " + " | ".join(headers) + " |",
                "|" + "|".join("---" if key in ("model", "condition") else "---:"
                               for key, _ in columns) + "|"]
    for row in rows:
        md_lines.append("| " + " | ".join(_cell(row.get(key), True) for key, _ in columns) + " |")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(md_lines) + "\n", encoding="utf-8")
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _ in columns])
        for row in rows:
            writer.writerow([_cell(row.get(key), False) for key, _ in columns])
    return md_path, csv_path


def write_summary(summary, out_dir, name="summary.json"):
    """Write a JSON-serialisable summary (numpy scalars and paths allowed); return its path."""
    def default(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(summary, indent=2, default=default, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


def _thumbnail(array, max_side):
    # Plain striding: big slides must not be resampled in full just for a figure.
    step = max(1, math.ceil(max(array.shape[:2]) / max_side))
    return np.asarray(array[::step, ::step])


def save_comparison_figure(path, panels, title=None, max_side=1024, panel_size=4.0):
    """Save images side by side in one row (matplotlib, Agg backend).

    Parameters
    ----------
    path : path
        Output PNG; parent directories are created.
    panels : list of (str, array)
        ``(title, image)``; images are ``(H, W, 3)`` uint8 RGB or ``(H, W)`` masks / maps
        (shown in grey, 0 black). ``None`` as image draws an empty "n/a" panel.
    title : str, optional
        Figure title.
    max_side : int
        Images larger than this are subsampled for display.
    panel_size : float
        Width of one panel, in inches.

    Returns
    -------
    Path
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    if not panels:
        raise ValueError("save_comparison_figure needs at least one panel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Room for two-line panel titles (name + score) and the optional figure title.
    figure = Figure(figsize=(panel_size * len(panels), panel_size + (1.0 if title else 0.7)))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, image) in zip(axes, panels):
        ax.set_title(panel_title, fontsize=9)
        ax.set_axis_off()
        if image is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            continue
        image = _thumbnail(image, max_side)
        if image.ndim == 2:
            image = image.astype(np.float32)
            ax.imshow(image, cmap="gray", vmin=0, vmax=max(1.0, float(image.max())),
                      interpolation="nearest")
        else:
            ax.imshow(image[..., :3], interpolation="nearest")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _default_conditions(template_rgb):
    conditions = {"original": None}
    if template_rgb is not None:
        from .stain import match_histograms

        def matched(rgb):
            return match_histograms(np.asarray(rgb), template_rgb, ignore_white=True)

        conditions["matched"] = matched
    return conditions


def _safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def compare_models(models, images, out_dir, template_rgb=None, conditions=None, tile=256,
                   overlap=64, threshold=0.5, multiple=4, figures=True, progress=False,
                   predictors=None):
    """Segment images with several models and conditions; score and write the comparison.

    Parameters
    ----------
    models : list of ModelSpec
        Model names must be unique.
    images : list of (str, (H, W, 3) uint8 array, (H, W) array or None)
        ``(name, rgb, truth)``; ``truth`` (nucleus > 0) may be ``None``: the image is then
        segmented and drawn but not scored.
    out_dir : path
    template_rgb : (h, w, 3) uint8 array, optional
        Adds the condition ``matched``: the input histogram-matched to this template with
        :func:`caffe_layers.stain.match_histograms` (``ignore_white=True``).
    conditions : dict of str -> callable or None, optional
        Replaces the default conditions: name -> function ``rgb -> rgb`` applied to each
        input before segmenting (``None`` = as is).
    tile, overlap, threshold, multiple, progress
        See :func:`caffe_layers.segment.segment_image`.
    figures : bool
        Write one figure per image and condition.
    predictors : dict of str -> callable, optional
        Ready ``predict`` callables by model name, used instead of loading that model's
        deploy/weights (e.g. nets already in memory).

    Returns
    -------
    dict
        The summary also written to ``summary.json``: ``results[model][condition]`` with
        pooled ``dice, iou, object_f1, precision, recall``, ``images`` (number scored),
        ``images_segmented``, ``pixels`` and the pooled counts; ``per_image`` scores; and
        the paths written under ``files``.
    """
    names = [m.name for m in models]
    if not models:
        raise ValueError("compare_models needs at least one model")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    image_names = [name for name, _, _ in images]
    if len(set(image_names)) != len(image_names):
        raise ValueError(f"image names must be unique, got {image_names}")
    if conditions is None:
        conditions = _default_conditions(template_rgb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictors = dict(predictors or {})
    for model in models:
        if model.name not in predictors:
            predictors[model.name] = CaffeSegmenter(model.deploy, model.weights)

    per_image = []
    figure_paths = []
    segmented = {(m, c): 0 for m in names for c in conditions}
    for image_name, rgb, truth in images:
        if truth is not None:
            truth = np.asarray(truth) != 0
            if truth.shape != tuple(rgb.shape[:2]):
                raise ValueError(f"image {image_name!r}: mask shape {truth.shape} does not "
                                 f"match image shape {tuple(rgb.shape[:2])}")
        for condition, transform in conditions.items():
            shown = rgb if transform is None else transform(rgb)
            panels = [(f"{image_name} ({condition})", shown),
                      ("ground truth", None if truth is None else truth)]
            for model_name in names:
                prob = segment_tiled(predictors[model_name], shown, tile=tile, overlap=overlap,
                                     multiple=multiple, progress=progress)
                mask = prob > threshold
                segmented[model_name, condition] += 1
                label = model_name
                if truth is not None:
                    scores = metrics.segmentation_scores(mask, truth)
                    per_image.append(dict(model=model_name, condition=condition,
                                          image=image_name, **scores))
                    label += f"\nDice {scores['dice']:.3f}  F1 {scores['object_f1']:.3f}"
                panels.append((label, mask))
            if figures:
                path = out_dir / "figures" / f"{_safe_name(image_name)}_{_safe_name(condition)}.png"
                figure_paths.append(save_comparison_figure(path, panels))

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
            pooled["images_segmented"] = segmented[model_name, condition]
            results[model_name][condition] = pooled
            rows.append(dict(model=model_name, condition=condition, **pooled))

    md_path, csv_path = write_table(rows, out_dir)
    summary = dict(
        models=[dict(name=m.name, deploy=str(m.deploy), weights=str(m.weights)) for m in models],
        conditions=list(conditions),
        settings=dict(tile=tile, overlap=overlap, threshold=threshold, multiple=multiple,
                      pooling="sum of pixel/object counts over images"),
        results=results,
        per_image=per_image,
        files=dict(table_md=md_path.name, table_csv=csv_path.name,
                   figures=[str(p.relative_to(out_dir)) for p in figure_paths]),
    )
    write_summary(summary, out_dir)
    return summary


class _ImageAction(argparse.Action):
    """``--image`` starts an entry; a following ``--mask`` attaches to it."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = getattr(namespace, "entries", None) or []
        if self.dest == "image":
            entries.append([value, None])
        else:
            if not entries:
                parser.error("--mask must follow the --image it belongs to")
            if entries[-1][1] is not None:
                parser.error(f"two masks for image {entries[-1][0]}")
            entries[-1][1] = value
        namespace.entries = entries


def compare_main(argv=None):
    """``caffe-stain-compare``: compare segmenters on images, as is and stain-matched."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-compare",
        description="Segment images with several Caffe nets, optionally after histogram "
                    "matching to a template, and write pooled scores, tables and figures.")
    parser.add_argument("--model", nargs=3, action="append", required=True,
                        metavar=("NAME", "DEPLOY", "WEIGHTS"))
    parser.add_argument("--image", action=_ImageAction, required=True, help="RGB image")
    parser.add_argument("--mask", action=_ImageAction,
                        help="ground truth of the preceding --image (nucleus > 0)")
    parser.add_argument("--template", help="RGB template for histogram matching")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--multiple", type=int, default=4)
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)

    try:
        models = [ModelSpec(name, Path(deploy), Path(weights)) for name, deploy, weights in args.model]
        images = []
        for image_path, mask_path in args.entries:
            rgb = read_rgb(image_path, memmap=True)  # large uncompressed TIFFs stay on disk
            truth = None if mask_path is None else read_mask(mask_path, rgb.shape[:2])
            images.append((Path(image_path).stem, rgb, truth))
        template = None if args.template is None else read_rgb(args.template)
        summary = compare_models(models, images, args.out, template_rgb=template,
                                 tile=args.tile, overlap=args.overlap, threshold=args.threshold,
                                 multiple=args.multiple, figures=not args.no_figures)
    except (OSError, ValueError) as error:
        print(f"caffe-stain-compare: error: {error}", file=sys.stderr)
        return 1
    print((Path(args.out) / summary["files"]["table_md"]).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
