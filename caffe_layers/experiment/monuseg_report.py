"""The MoNuSeg benchmark's report: one table, CSV, summary and figures from every seed run so far.

Each seed's run writes ``seeds/seed_<seed>.json`` (per test tile scores of every row, the
validation choices, timings); :func:`write_report` reads all of them, so seeds run in separate
sessions combine into one table of mean ± sd over seeds.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from ..image_io import write_atomic
from ..reports import mean_sd_text, overlay, save_comparison_figure, write_summary
from .monuseg_data import resample_labels

__all__ = ["SCORE_KEYS", "read_seed_records", "seed_file", "write_report"]

SCORE_KEYS = ("dice", "aji", "pq", "dq", "sq", "f1")
_HEADLINE = ("dice", "aji", "pq")
#: Rows drawn in the per-tile figure (the others are in the table).
_FIGURE_ROWS = ("meanfile", "meanfile+aug", "patchmean", "patchmean+aug", "patchmean+aug-p5-95",
                "patchmean+stainstats", "patchmean+macenko", "patchmean+stainstats+macenko")


def seed_file(out_dir, seed):
    return Path(out_dir) / "seeds" / f"seed_{seed}.json"


def read_seed_records(out_dir):
    """Every seed record under ``out_dir/seeds``, by seed order."""
    paths = sorted(Path(out_dir, "seeds").glob("seed_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return [json.loads(p.read_text()) for p in paths]


def _write_text(path, text):
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True)


def _tile_means(record, row, key, tiles=None):
    values = [s[key] for name, s in record["test"][row].items() if tiles is None or name in tiles]
    return float(np.mean(values)) if values else float("nan")


def _cell(records, row, key, tiles=None):
    return mean_sd_text([_tile_means(r, row, key, tiles) for r in records])


def _organs(record):
    organs = {}
    for name, info in record["tiles"]["test"].items():
        organs.setdefault(info["organ"], []).append(name)
    return dict(sorted(organs.items()))


def _main_table(records):
    rows = list(records[0]["test"])
    lines = ["| row | test Dice | test AJI | test PQ | validation Dice | validation AJI |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        model = row if row in records[0]["validation"] else None
        val = [mean_sd_text([r["validation"][model][k] for r in records]) if model else "" for k in ("dice", "aji")]
        lines.append(f"| {row} | " + " | ".join(_cell(records, row, k) for k in _HEADLINE) + f" | {val[0]} | {val[1]} |")
    return "\n".join(lines) + "\n"


def _organ_table(records, key):
    organs = _organs(records[0])
    lines = ["| row | " + " | ".join(f"{o} ({len(t)})" for o, t in organs.items()) + " |",
             "|---|" + "---:|" * len(organs)]
    for row in records[0]["test"]:
        lines.append(f"| {row} | " + " | ".join(_cell(records, row, key, set(t)) for t in organs.values()) + " |")
    return "\n".join(lines) + "\n"


def _table_text(records):
    first = records[0]
    seeds = [r["seed"] for r in records]
    organs = _organs(first)
    brain = organs.get("brain", [])
    parts = [
        f"# MoNuSeg benchmark ({len(first['tiles']['test'])} test tiles, seed(s) {', '.join(map(str, seeds))})\n",
        f"Training at {first['settings']['mpp']} µm/px on {len(first['tiles']['train'])} tiles; validation: "
        f"{len(first['tiles']['val'])} tiles of the held-out sites {', '.join(first['settings']['val_sites'])}. "
        "Cells: mean over test tiles" + (", mean ± sd over seeds" if len(records) > 1 else "") + ".\n\n",
        _main_table(records),
        "\n## AJI per organ (test tiles per organ in brackets)\n\n",
        _organ_table(records, "aji"),
        "\n## Dice per organ\n\n",
        _organ_table(records, "dice"),
    ]
    if brain:
        parts += ["\n## Brain (the organ absent from training) on its own\n\n",
                  "| row | Dice | AJI | PQ |\n|---|---:|---:|---:|\n" + "".join(
                      f"| {row} | " + " | ".join(_cell(records, row, k, set(brain)) for k in _HEADLINE) + " |\n"
                      for row in first["test"])]
    parts.append("\n## Augmentation recipes (AugmentationLayer keys, before the seed)\n\n")
    parts += [f"- {key}: `{json.dumps(keys)}`\n" for key, keys in first["recipes"].items()]
    parts += [f"- {name} has the keys of {same}: one model, scored as both\n"
              for name, same in first.get("aliases", {}).items()]
    parts.append("\n## Time (seconds, per seed run)\n\n")
    parts += [f"- seed {r['seed']}: " + ", ".join(f"{k[:-2]} {v}" for k, v in r["timings"].items())
              + f"; total {r['elapsed_s']}" + _reused_note(r) + "\n" for r in records]
    return "".join(parts)


def _reused_note(record):
    reused = record.get("reused_trainings", 0)
    if not reused:
        return ""
    seconds = ", ".join(f"{name} {t['seconds']:.0f}" for name, t in record["training"].items()
                        if t.get("seconds") is not None)
    return (f" ({reused} trainings were reused from an earlier run of this seed, stopped after them; each "
            f"training's own time, from its log: {seconds})")


def _metrics_csv(records):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["seed", "row", "tile", "organ", "site", *SCORE_KEYS])
    for r in records:
        for row, tiles in r["test"].items():
            for name, scores in tiles.items():
                info = r["tiles"]["test"][name]
                writer.writerow([r["seed"], row, name, info["organ"], info["site"],
                                 *(f"{scores[k]:.4f}" for k in SCORE_KEYS)])
    return buffer.getvalue()


def _save_tile_bars(path, records):
    """Per-tile Dice and AJI of the main rows (mean over seeds), one panel per metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in _FIGURE_ROWS if row in records[0]["test"]]
    tiles = sorted(records[0]["test"][rows[0]], key=lambda n: records[0]["tiles"]["test"][n]["organ"])
    figure = Figure(figsize=(16, 8))
    FigureCanvasAgg(figure)
    width = 0.8 / len(rows)
    for ax, key in zip(figure.subplots(2, 1), ("dice", "aji")):
        for i, row in enumerate(rows):
            values = np.array([[r["test"][row][t][key] for t in tiles] for r in records])
            xs = np.arange(len(tiles)) + (i - (len(rows) - 1) / 2) * width
            ax.bar(xs, values.mean(axis=0), width, yerr=values.std(axis=0, ddof=1) if len(records) > 1 else None,
                   label=row, capsize=1)
        labels = [f"{t[5:12]}\n{records[0]['tiles']['test'][t]['organ']}" for t in tiles]
        ax.set_xticks(np.arange(len(tiles)), labels, fontsize=9)
        ax.set_ylabel({"dice": "Dice", "aji": "AJI"}[key], fontsize=11)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    figure.axes[0].legend(fontsize=9, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80), overwrite=True)


def _overlay_tiles(record):
    """Three test tiles of different organs (the first tile of each of the first three organs)."""
    return [tiles[0] for tiles in list(_organs(record).values())[:3]]


def _save_overlays(figures, data, masks, record):
    rows = [r for r in ("patchmean", "patchmean+stainstats", "patchmean+macenko") if r in record["test"]]
    for name in _overlay_tiles(record):
        tile = data.test[name]
        shape = tile.rgb.shape[:2]
        side = min(320, *shape)
        crop = (slice(0, side), slice(0, side))
        truth = resample_labels(tile.truth, shape)[crop]
        panels = [(f"{name[:12]} ({tile.organ})", tile.rgb[crop]), ("truth", overlay(tile.rgb[crop], truth))]
        panels += [(f"{row}\nAJI {record['test'][row][name]['aji']:.3f}",
                    overlay(tile.rgb[crop], resample_labels(masks[row, name], shape)[crop])) for row in rows]
        save_comparison_figure(figures / f"overlay_{tile.organ}_{name[:12]}.png", panels, panel_size=3.2)


def _copy_models(out_dir, exported):
    """The first seed's models as ``out_dir/models/<name>/`` (deploy, weights, card, mean file)."""
    for name, paths in exported.items():
        source = Path(paths[0]).parent
        target = Path(out_dir) / "models" / source.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)


def write_report(out_dir, data=None, masks=None, exported=None, log=None):
    """(Re)write ``table.md``, ``metrics.csv``, ``summary.json`` and figures from every seed file.

    ``masks``/``exported`` of the lowest seed (when it was just run) add the overlay figures
    and ``models/``. Returns the summary.
    """
    out_dir = Path(out_dir)
    records = read_seed_records(out_dir)
    if not records:
        raise ValueError(f"no seed results under {out_dir / 'seeds'}")
    first = records[0]
    figures = out_dir / "figures"
    _save_tile_bars(figures / "per_tile_dice_aji.png", records)
    if masks is not None and data is not None and exported is not None and _is_first_seed(records, exported, out_dir):
        _save_overlays(figures, data, masks, first)
        _copy_models(out_dir, exported)
    _write_text(out_dir / "table.md", _table_text(records))
    _write_text(out_dir / "metrics.csv", _metrics_csv(records))
    summary = dict(
        description="MoNuSeg 2018 test tiles: Dice, AJI and PQ per row (model + optional test-time normaliser)",
        seeds=[r["seed"] for r in records],
        settings=first["settings"],
        recipes=first["recipes"],
        aliases=first.get("aliases", {}),
        tiles=first["tiles"],
        results={row: {k: dict(mean=float(np.mean([_tile_means(r, row, k) for r in records])),
                               by_seed=[_tile_means(r, row, k) for r in records]) for k in SCORE_KEYS}
                 for row in first["test"]},
        validation={model: {k: [r["validation"][model][k] for r in records] for k in ("dice", "aji", "pq")}
                    for model in first["validation"]},
        post_processing={str(r["seed"]): {m: dict(threshold=v["threshold"], min_distance=v["min_distance"])
                                          for m, v in r["validation"].items()} for r in records},
        engines=first["engines"],
        timings={str(r["seed"]): dict(r["timings"], total_s=r["elapsed_s"]) for r in records},
        models={name: dict(deploy=f"models/{Path(p[0]).parent.name}/deploy.prototxt") for name, p in
                first["exported"].items()},
        files=dict(table="table.md", metrics="metrics.csv",
                   figures=sorted(str(p.relative_to(out_dir)) for p in figures.glob("*.png"))),
    )
    write_summary(summary, out_dir)
    if log:
        log(f"report of seed(s) {summary['seeds']}: {out_dir / 'table.md'}")
    return summary


def _is_first_seed(records, exported, out_dir):
    """Whether ``exported`` are the models of the lowest seed on record."""
    lowest = (Path(out_dir) / "work" / f"seed_{records[0]['seed']}").resolve()
    return all(lowest in Path(paths[0]).resolve().parents for paths in exported.values())
