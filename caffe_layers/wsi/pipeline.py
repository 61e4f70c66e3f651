"""Segment whole slides block by block: plan, tissue skipping, resumable progress, assembly.

The work of a slide is a grid of square *blocks* (``SlideSettings.block`` pixels of the level
segmented). A block is segmented from the slide region around it -- the block plus a margin
of ``overlap // 2`` pixels (rounded up to the net's size multiple) clipped to the slide -- by
:func:`caffe_layers.tiling.segment_tiled`, and only the block is kept, so a block's result is
a function of its position alone: the same in one process or on any worker of a cluster, in
any order. Inside a block, net tiles whose output part has no tissue (from a tissue mask made
at ``tissue_downsample`` × lower resolution with :func:`caffe_layers.stain.tissue.tissue_mask`)
are written as background without running the net; blocks without tissue are not read at all.
Blocks are planned on the tissue mask dilated by one cell (a block next to tissue is read); net
tiles are run only where the part they write holds a cell of the mask itself: a tile of dilated
fringe alone is glass. The last batch of a block is padded to the full batch, so the engine
sees one input shape (see :func:`caffe_layers.tiling.segment_tiled`).
Blocks are planned on the tissue mask dilated by one cell (a block next to tissue is read), net
tiles are run only where the part they write holds a tissue cell of the mask itself: a tile of
dilated fringe alone is glass, and running it cost 1.2× the net pixels per tissue pixel of
whole images. The last batch of a block is padded to the full batch (one input shape for the
engine; see :func:`caffe_layers.tiling.segment_tiled`).

Progress is kept beside the outputs in ``.<name>.slide-progress/``: ``record.json`` (the slide,
level, settings and model it was started with), the mask (and probability) of the level as
uint8 memory maps, and ``done.npy`` (one flag per block, saved only after the blocks' pixels
are flushed). Running the same command again after an interrupt computes only the blocks not
yet done; a record made with other inputs or settings is refused (``restart=True`` discards
it). Once every block is done the outputs are assembled strip by strip from the memory maps,
written under temporary names and renamed together; then the progress folder is removed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ..image_io import image_stem
from ..stain.tissue import tissue_mask
from ..tiling import DEFAULT_MULTIPLE, DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE, check_threshold, \
    segment_tiled
from .outputs import iter_nuclei, write_geojson, write_pyramid
from .reader import SLIDE_SUFFIXES, choose_level, is_slide, open_slide

__all__ = ["DEFAULT_BLOCK", "BlockSpec", "DaskExecutor", "LocalExecutor", "SlideJob", "SlideSettings",
           "compute_block", "find_slides", "plan_slide", "slide_name", "run_slides", "slide_outputs", "tissue_thumbnail"]

DEFAULT_BLOCK = 1024
"""Default block side (pixels of the level segmented): the unit of work, of retries and of resuming;
moved to the nearest side that tiles without waste (:attr:`SlideSettings.block_side`)."""
RECORD_FORMAT = 2  # 2: tiles skipped on the undilated tissue mask


@dataclasses.dataclass(frozen=True)
class SlideSettings:
    """How slides are segmented; everything that changes a result is part of the progress record."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    multiple: int = DEFAULT_MULTIPLE
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = 1
    block: int = DEFAULT_BLOCK
    mpp: float | None = None  # resolution the net wants; None: level 0
    white_threshold: float = 200.0  # tissue: mean of R, G, B at or below this
    tissue_downsample: int = 16  # tissue mask resolution, relative to the level segmented
    prob: bool = False  # also write the probability as a uint8 pyramidal TIFF

    def __post_init__(self):
        check_threshold(self.threshold)
        for name in ("tile", "multiple", "batch_size", "block", "tissue_downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile); got {self.overlap} with tile {self.tile}")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp must be a positive number of micrometres per pixel; got {self.mpp!r}")

    @property
    def margin(self):
        return -(-(self.overlap // 2) // self.multiple) * self.multiple

    @property
    def block_side(self):
        """``block`` moved to the nearest side whose region (block + margins) is tiled without a short last tile.

        A region of ``tile + k * stride`` pixels is covered by net tiles that overlap by exactly
        ``overlap``, so an inner block costs no more net work per pixel than one pass of
        :func:`~caffe_layers.tiling.segment_tiled` over the whole image (e.g. 960 for the
        default 1024 with 256-pixel tiles, overlap 64, multiple 4).
        """
        multiple = self.multiple
        tile = -(-self.tile // multiple) * multiple
        stride = max(multiple, (tile - min(self.overlap, tile - 1)) // multiple * multiple)
        base = tile - 2 * self.margin
        if base <= 0:
            return -(-self.block // multiple) * multiple
        steps = max(0, round((self.block - base) / stride))
        return base + steps * stride


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Everything a worker needs to segment one block (small and picklable)."""

    path: str
    level: int
    box: tuple  # (y0, x0, y1, x1) of the block in the level
    region: tuple  # (y0, x0, y1, x1) read from the slide: the block and its margin
    tissue: np.ndarray  # tissue mask (not dilated) over the region, at 1/tissue_downsample: which tiles run
    tissue_origin: tuple  # (row, col) of tissue[0, 0] in the tissue mask of the level
    settings: SlideSettings


_SLIDES = {}


def _cached_slide(path):
    """One open slide per file and process (a worker opens each slide once)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    slide = _SLIDES.get(key)
    if slide is None:
        while len(_SLIDES) >= 4:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        slide = _SLIDES[key] = open_slide(path)
    return slide


def compute_block(spec, predict, slide=None):
    """Segment one block: ``{"mask": bool (h, w), "prob": uint8 (h, w) or None, "tiles", "skipped_pixels"}``."""
    settings = spec.settings
    slide = slide if slide is not None else _cached_slide(spec.path)
    by0, bx0, by1, bx1 = spec.box
    ry0, rx0, ry1, rx1 = spec.region
    rgb = slide.read_region(spec.level, ry0, rx0, ry1 - ry0, rx1 - rx0)
    factor = settings.tissue_downsample
    ty0, tx0 = spec.tissue_origin
    spared = [0]

    def skip(y0, y1, x0, x1):
        # The part of the block this tile writes; the margin is thrown away anyway.
        y0, y1 = max(y0 + ry0, by0), min(y1 + ry0, by1)
        x0, x1 = max(x0 + rx0, bx0), min(x1 + rx0, bx1)
        if y0 >= y1 or x0 >= x1:
            return True
        tissue = spec.tissue[y0 // factor - ty0:-(-y1 // factor) - ty0, x0 // factor - tx0:-(-x1 // factor) - tx0]
        if tissue.any():
            return False
        spared[0] += (y1 - y0) * (x1 - x0)
        return True

    stats = {}
    prob = segment_tiled(predict, rgb, tile=settings.tile, overlap=settings.overlap, multiple=settings.multiple,
                         batch_size=settings.batch_size, skip=skip, stats=stats, pad_batches=True)
    core = prob[by0 - ry0:by1 - ry0, bx0 - rx0:bx1 - rx0]
    result = {"mask": core > settings.threshold, "prob": None, "tiles": stats["tiles"] - stats["skipped"],
              "skipped_pixels": spared[0], "net_pixels": stats["net_pixels"]}
    if settings.prob:
        result["prob"] = np.round(np.clip(core, 0, 1) * 255).astype(np.uint8)
    return result


def tissue_thumbnail(slide, level, factor, white_threshold=200.0, rows=16):
    """Tissue mask of ``level`` at ``1/factor`` of its resolution, read from the coarsest fitting level.

    Pixel ``(i, j)`` stands for the level's pixels ``[i*factor, (i+1)*factor)`` (rows) by the
    same for columns. The slide is read ``rows`` mask rows at a time.
    """
    height, width = slide.levels[level]
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    relative = [d / slide.downsamples[level] for d in slide.downsamples]
    source = max((i for i, r in enumerate(relative) if r <= factor * 1.01), key=lambda i: relative[i])
    src_h, src_w = slide.levels[source]
    scale_y = src_h / height * factor  # source rows per mask row
    mask = np.zeros((out_h, out_w), bool)
    for t0 in range(0, out_h, rows):
        t1 = min(out_h, t0 + rows)
        s0 = min(src_h - 1, int(t0 * scale_y))
        s1 = min(src_h, max(s0 + 1, math.ceil(t1 * scale_y)))
        strip = slide.read_region(source, s0, 0, s1 - s0, src_w)
        small = cv2.resize(strip, (out_w, t1 - t0), interpolation=cv2.INTER_AREA)
        mask[t0:t1] = tissue_mask(np.ascontiguousarray(small), white_threshold)
    return mask


def find_slides(entries):
    """The slide files among ``entries`` (files or folders; a folder gives its slides, sorted)."""
    found = []
    for entry in entries:
        entry = Path(entry)
        if entry.is_dir():
            found += sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                            and is_slide(p))
        elif is_slide(entry):
            found.append(entry)
    return found


def slide_name(path):
    """The name a slide's outputs start with (``a.svs``, ``a.tif``, ``a.ome.tif`` -> ``a``)."""
    path = Path(path)
    return image_stem(path) if path.suffix.lower() in (".tif", ".tiff") else path.stem


def slide_outputs(out_dir, name, prob=False):
    """Output paths of a slide: ``mask``, ``geojson``, ``summary`` and (``prob=True``) ``prob``."""
    out_dir = Path(out_dir)
    outputs = {"mask": out_dir / f"{name}_pred.tif", "geojson": out_dir / f"{name}_nuclei.geojson",
               "summary": out_dir / f"{name}_slide.json"}
    if prob:
        outputs["prob"] = out_dir / f"{name}_prob.tif"
    return outputs


@dataclasses.dataclass
class SlideJob:
    """The plan of one slide (made by :func:`plan_slide`)."""

    path: Path
    name: str
    level: int
    level_sentence: str
    shape: tuple
    downsample: tuple  # level-0 pixels per pixel of the level (rows, cols)
    mpp: float | None  # of the level segmented
    backend: str
    tissue: np.ndarray  # dilated tissue mask at 1/tissue_downsample: which blocks run
    tissue_fraction: float
    blocks: list  # (y0, x0, y1, x1)
    todo_mask: np.ndarray  # blocks with tissue
    outputs: dict
    scratch: Path
    record: dict
    settings: SlideSettings
    overwrite: bool = False
    started: float = 0.0  # when planning ended
    plan_seconds: float = 0.0
    raw_tissue: np.ndarray | None = None  # the tissue mask itself: which net tiles run

    def spec(self, index):
        settings = self.settings
        height, width = self.shape
        y0, x0, y1, x1 = self.blocks[index]
        margin = settings.margin
        region = (max(0, y0 - margin), max(0, x0 - margin), min(height, y1 + margin), min(width, x1 + margin))
        factor = settings.tissue_downsample
        origin = (region[0] // factor, region[1] // factor)
        cells = self.tissue if self.raw_tissue is None else self.raw_tissue
        tissue = cells[origin[0]:-(-region[2] // factor), origin[1]:-(-region[3] // factor)]
        return BlockSpec(str(self.path), self.level, (y0, x0, y1, x1), region, np.ascontiguousarray(tissue),
                         origin, settings)


def _fingerprint(path):
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _normalised(value):
    return json.loads(json.dumps(value))


def _first_difference(old, new, where=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if old == new else f"{where}: {old!r} then, {new!r} now"


def plan_slide(path, out_dir, settings, *, model=None, overwrite=False, restart=False, log=None):
    """Check a slide and its outputs and plan its blocks; nothing is segmented yet.

    Parameters
    ----------
    path : path
        The slide (see :func:`caffe_layers.wsi.reader.open_slide`).
    out_dir : path
        Where the outputs and the progress folder go (created if missing).
    settings : SlideSettings
    model : dict, optional
        What identifies the net (files' checksums, engine, card): part of the progress record.
    overwrite : bool
        Replace outputs that exist (default: refuse, before anything is computed).
    restart : bool
        Discard a progress record left by an interrupted run instead of resuming it.
    log : callable, optional
        Receives one line on the level chosen.

    Raises
    ------
    ValueError
        A corrupt or truncated slide, a progress record made with other settings, an output
        that would replace the slide.
    FileExistsError
        An output exists and ``overwrite`` is False.
    """
    started = time.perf_counter()
    path = Path(path)
    name = slide_name(path)
    out_dir = Path(out_dir)
    outputs = slide_outputs(out_dir, name, settings.prob)
    for output in outputs.values():
        if output.resolve() == path.resolve():
            raise ValueError(f"output {output} would replace the slide")
        if not overwrite and output.exists():
            raise FileExistsError(f"{output}: already exists (use --overwrite to replace it)")
    slide = open_slide(path)
    try:
        level, sentence = choose_level(slide, settings.mpp)
        shape = slide.levels[level]
        height0, width0 = slide.levels[0]
        downsample = (height0 / shape[0], width0 / shape[1])
        level_mpp = None if slide.mpp is None else slide.mpp * slide.downsamples[level]
        raw = tissue_thumbnail(slide, level, settings.tissue_downsample, settings.white_threshold)
        backend = slide.backend
    finally:
        slide.close()
    tissue = ndimage.binary_dilation(raw, structure=np.ones((3, 3), bool)) if raw.any() else raw
    side, factor = settings.block_side, settings.tissue_downsample
    blocks = [(y, x, min(y + side, shape[0]), min(x + side, shape[1]))
              for y in range(0, shape[0], side) for x in range(0, shape[1], side)]
    todo = np.array([tissue[y0 // factor:-(-y1 // factor), x0 // factor:-(-x1 // factor)].any()
                     for y0, x0, y1, x1 in blocks], bool)
    record = _normalised({"format": RECORD_FORMAT, "slide": _fingerprint(path), "level": level, "shape": shape,
                          "settings": dataclasses.asdict(settings), "model": model or {}})
    scratch = out_dir / f".{name}.slide-progress"
    if (scratch / "record.json").is_file():
        old = json.loads((scratch / "record.json").read_text(encoding="utf-8"))
        if old != record:
            if not restart:
                difference = _first_difference(old, record) or "the record differs"
                raise ValueError(f"{scratch}: progress of an interrupted run of {path} with other inputs or settings "
                                 f"({difference}); run it again as it was to resume, or use --restart to discard it")
            shutil.rmtree(scratch)
        elif restart:
            shutil.rmtree(scratch)
    if log is not None:
        log(f"{name}: {sentence}; {shape[1]}×{shape[0]} pixels, tissue {raw.mean():.1%} of the slide")
    return SlideJob(path, name, level, sentence, tuple(shape), downsample, level_mpp, backend, tissue,
                    float(raw.mean()), blocks, todo, outputs, scratch, record, settings, overwrite,
                    time.perf_counter(), time.perf_counter() - started, raw)


class _SlideRun:
    """The client-side state of one slide: its memory maps, done flags and progress bar."""

    CHECKPOINT_SECONDS = 5.0

    def __init__(self, job, progress, position):
        self.job, self.finished, self.progress, self.position = job, False, progress, position
        scratch = job.scratch
        fresh = not (scratch / "record.json").is_file()
        if fresh and scratch.exists():
            shutil.rmtree(scratch)  # an earlier run stopped before its record was written: nothing done
        scratch.mkdir(parents=True, exist_ok=True)
        self.map_names = ["mask"] + (["prob"] if job.settings.prob else [])
        self.fresh, self.maps = fresh, {}
        try:
            self.done = np.zeros(len(job.blocks), bool) if fresh else np.load(scratch / "done.npy")
            self.stats = {"tiles": 0, "skipped_pixels": 0} if fresh else \
                json.loads((scratch / "stats.json").read_text(encoding="utf-8"))
            if not fresh:
                for name in self.map_names:
                    if (scratch / f"{name}.u8").stat().st_size != job.shape[0] * job.shape[1]:
                        raise ValueError(f"{name}.u8 has the wrong size")
        except (OSError, ValueError) as error:
            raise ValueError(f"{scratch}: unreadable progress record ({error}); use --restart to discard it") from None
        if self.done.shape != (len(job.blocks),):
            raise ValueError(f"{scratch}: progress record has {self.done.size} blocks, the plan {len(job.blocks)}; "
                             "use --restart to discard it")
        if fresh:
            for name in self.map_names:  # sparse files: glass costs no disk
                with open(scratch / f"{name}.u8", "wb") as handle:
                    handle.truncate(job.shape[0] * job.shape[1])
            self._save_flags()
            _write_json(scratch / "record.json", job.record)
        self.resumed = int(self.done[job.todo_mask].sum())
        self.todo = [int(i) for i in np.flatnonzero(job.todo_mask & ~self.done)]
        self.remaining = len(self.todo)
        self.pending, self.last_checkpoint = [], time.monotonic()
        self.bar, self.first_block = None, None

    def _open(self):
        """Memory maps and progress bar, opened when the slide's first block comes in (a folder of
        slides keeps neither open for the slides still waiting)."""
        if not self.maps:
            self.maps = {name: np.memmap(self.job.scratch / f"{name}.u8", mode="r+", dtype=np.uint8,
                                         shape=tuple(self.job.shape)) for name in self.map_names}
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=int(self.job.todo_mask.sum()), initial=self.resumed, unit="block",
                            desc=self.job.name, position=self.position, leave=True, dynamic_ncols=True)

    def _save_flags(self):
        scratch = self.job.scratch
        np.save(scratch / "done.partial.npy", self.done)
        os.replace(scratch / "done.partial.npy", scratch / "done.npy")
        _write_json(scratch / "stats.json", self.stats)

    def store(self, index, result):
        self._open()
        y0, x0, y1, x1 = self.job.blocks[index]
        self.maps["mask"][y0:y1, x0:x1] = result["mask"].astype(np.uint8) * 255
        if "prob" in self.maps:
            self.maps["prob"][y0:y1, x0:x1] = result["prob"]
        self.stats["tiles"] += int(result["tiles"])
        self.stats["skipped_pixels"] += int(result["skipped_pixels"])
        self.stats["net_pixels"] = self.stats.get("net_pixels", 0) + int(result.get("net_pixels", 0))
        self.pending.append(index)
        self.remaining -= 1
        if self.bar is not None:
            self.bar.update(1)
        if time.monotonic() - self.last_checkpoint > self.CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self):
        if not self.pending:
            return
        for array in self.maps.values():
            array.flush()  # pixels on disk before their blocks are marked done
        self.done[self.pending] = True
        self.pending = []
        self._save_flags()
        self.last_checkpoint = time.monotonic()

    def close(self):
        self.checkpoint()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.maps = {}

    def finish(self, log):
        """Assemble the outputs from the memory maps, rename them into place, drop the progress folder."""
        self._open()
        self.checkpoint()
        job = self.job
        scratch, outputs = job.scratch, job.outputs
        temporary = {key: scratch / f"out-{uuid.uuid4().hex[:8]}{path.suffix}" for key, path in outputs.items()}
        scale = job.downsample
        count = write_geojson(temporary["geojson"], iter_nuclei(self.maps["mask"]), scale=scale,
                              properties={"slide": job.path.name, "level": job.level,
                                          "coordinates": "level-0 pixels of the slide"})
        write_pyramid(temporary["mask"], self.maps["mask"], scratch, mode="max", mpp=job.mpp)
        if "prob" in temporary:
            write_pyramid(temporary["prob"], self.maps["prob"], scratch, mode="mean", mpp=job.mpp)
        # Planning, then from the slide's first block to now (a folder's later slides do not count
        # the time they waited for the earlier ones).
        seconds = job.plan_seconds + time.perf_counter() - (self.first_block or job.started)
        height, width = job.shape
        total = height * width
        glass_blocks = sum((y1 - y0) * (x1 - x0) for (y0, x0, y1, x1), run in zip(job.blocks, job.todo_mask)
                           if not run)
        tissue_mp = job.tissue_fraction * total / 1e6
        summary = {
            "slide": str(job.path), "reader": job.backend, "level": job.level, "level_choice": job.level_sentence,
            "level_shape": [height, width], "level_mpp": job.mpp, "downsample": list(job.downsample),
            "tissue_fraction": round(job.tissue_fraction, 4),
            "glass_skipped_fraction": round((glass_blocks + self.stats["skipped_pixels"]) / total, 4),
            "blocks": len(job.blocks), "tissue_blocks": int(job.todo_mask.sum()), "blocks_resumed": self.resumed,
            "net_tiles_run": self.stats["tiles"],
            "net_pixels_per_tissue_pixel": round(self.stats.get("net_pixels", 0) / (tissue_mp * 1e6), 3)
            if tissue_mp > 0 else None,
            "nuclei": count, "seconds": round(seconds, 2),
            "s_per_tissue_mp": round(seconds / tissue_mp, 3) if tissue_mp > 0 else None,
            "outputs": {key: str(path) for key, path in outputs.items()},
            "settings": job.record["settings"], "model": job.record["model"],
        }
        _write_json(temporary["summary"], summary)
        if not job.overwrite:
            for output in outputs.values():
                if output.exists():
                    raise FileExistsError(f"{output}: appeared while the slide was segmented "
                                          "(use --overwrite to replace it)")
        for key, path in outputs.items():
            os.replace(temporary[key], path)
        self.close()
        shutil.rmtree(scratch, ignore_errors=True)
        self.finished = True
        if log is not None:
            per_mp = "n/a" if summary["s_per_tissue_mp"] is None else f"{summary['s_per_tissue_mp']:.2f}"
            log(f"{job.name}: level {job.level}, tissue {job.tissue_fraction:.1%}, glass skipped "
                f"{summary['glass_skipped_fraction']:.1%}, {count} nuclei, {seconds:.1f} s, {per_mp} s per tissue "
                f"megapixel -> {outputs['mask']}")
        return summary


def _write_json(path, value):
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


class LocalExecutor:
    """Blocks segmented one after the other in this process by ``predict``."""

    def __init__(self, predict):
        self.predict = predict

    def map(self, items):
        for key, spec in items:
            yield key, compute_block(spec, self.predict)


class DaskExecutor:
    """Blocks segmented on a dask.distributed cluster: ``task(model, spec)`` on the workers.

    At most ``window`` blocks are queued at once (default: 3 per worker thread), so the client's
    memory is bounded whatever the number of slides; a failed task is retried ``retries`` times
    (on any worker) before its error is raised here.
    """

    def __init__(self, client, task, model, retries=2, window=None):
        self.client, self.task, self.model, self.retries = client, task, model, retries
        self.window = window

    def map(self, items):
        from dask.distributed import as_completed

        window = self.window or max(2, 3 * sum(self.client.nthreads().values()))
        items = iter(items)
        token = uuid.uuid4().hex[:8]
        queued, completed = {}, as_completed()

        def submit():
            for key, spec in items:
                future = self.client.submit(self.task, self.model, spec, pure=False, retries=self.retries,
                                            key=f"slide-block-{token}-{key[0]}-{key[1]}")
                queued[future] = key
                completed.add(future)
                return True
            return False

        for _ in range(window):
            if not submit():
                break
        try:
            for future in completed:
                key = queued.pop(future)
                result = future.result()
                future.release()
                yield key, result
                submit()
        finally:
            if queued:
                self.client.cancel(list(queued))


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def run_slides(jobs, executor, *, progress=True, log=_stderr):
    """Segment planned slides with ``executor``; returns one summary dict per slide (in order).

    Blocks of every slide are queued in slide order; a slide's outputs are assembled as soon
    as its last block is in. On an interrupt or error the progress of every slide is saved.
    """
    runs = []
    try:
        for position, job in enumerate(jobs):
            runs.append(_SlideRun(job, progress, position))
        summaries = [None] * len(runs)
        for index, run in enumerate(runs):
            if run.remaining == 0:
                summaries[index] = run.finish(log)
        def specs():
            for index, run in enumerate(runs):
                for block in run.todo:
                    if run.first_block is None:
                        run.first_block = time.perf_counter()
                    yield (index, block), run.job.spec(block)

        for (index, block), result in executor.map(specs()):
            run = runs[index]
            run.store(block, result)
            if run.remaining == 0:
                summaries[index] = run.finish(log)
        return summaries
    finally:
        for run in runs:
            if not run.finished:
                run.close()
