"""Segment whole slides with a deploy net, in this process or on a dask.distributed cluster.

The Caffe-free work (reading, tissue, blocks, resuming, outputs) is :mod:`caffe_layers.wsi`;
this module adds the net: :class:`SlideModel` names it (files, engine, card, tiling), and
:func:`block_task` -- what a worker runs -- builds its predictor once per process and model,
then segments one block. The engine is chosen once, by the caller (``auto`` runs its check
against Caffe there); workers get the engine it chose, so none of them repeats the check,
and each runs with one thread.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from ...model_card import ModelCard
from ...tiling import dihedral_tta
from ...wsi.pipeline import DaskExecutor, LocalExecutor, compute_block, plan_slide, run_slides
from .engines import make_segmenter
from .caffe_engine import use_cpu

__all__ = ["SlideModel", "block_task", "model_identity", "segment_slides"]


@dataclasses.dataclass(frozen=True)
class SlideModel:
    """A net as workers rebuild it: files, the engine already chosen, card, probe tiling, TTA."""

    deploy: str
    weights: str
    engine: str  # "caffe" or "opencv" (never "auto": the caller has chosen)
    card: ModelCard
    tile: int
    multiple: int
    batch: int
    tta: bool = False
    threads: int | None = 1


_PREDICTORS = {}


def _predictor(model):
    predict = _PREDICTORS.get(model)
    if predict is None:
        use_cpu()
        segmenter = make_segmenter(model.deploy, model.weights, model.engine, tile=model.tile,
                                   multiple=model.multiple, batch=model.batch, threads=model.threads, log=None,
                                   card=model.card)
        predict = dihedral_tta(segmenter) if model.tta else segmenter
        _PREDICTORS.clear()  # one net per worker process
        _PREDICTORS[model] = predict
    return predict


def block_task(model, spec):
    """Segment one block (a :class:`~caffe_layers.wsi.pipeline.BlockSpec`) on a worker."""
    return compute_block(spec, _predictor(model))


def _digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def model_identity(model):
    """What the progress record keeps of a model: checksums of its files, the engine, card and TTA."""
    card = model.card.as_dict()
    if card.get("mean_file"):
        card["mean_file_sha256"] = _digest(card["mean_file"])
    return {"deploy_sha256": _digest(model.deploy), "weights_sha256": _digest(model.weights),
            "engine": model.engine, "card": card, "tta": model.tta}


def segment_slides(segmenter, slides, out_dir, settings, *, deploy, weights, card, tta=False, workers=None,
                   scheduler=None, client=None, overwrite=False, restart=False, progress=True, log=None):
    """Plan every slide (all checks first), then segment them; returns one summary per slide.

    Parameters
    ----------
    segmenter : callable
        The predictor made by :func:`~caffe_layers.net.inference.engines.make_segmenter` for this model
        (its ``engine_choice`` is what workers use; it runs the blocks itself without a cluster).
    slides : list of path
    out_dir : path
    settings : caffe_layers.wsi.SlideSettings
    deploy, weights, card
        The model's files and card (workers rebuild the net from them).
    workers : int, optional
        Start a LocalCluster of this many single-threaded worker processes.
    scheduler : str, optional
        Address of a running dask scheduler to use instead (its workers must see the slide
        and model paths and have this package installed).
    client : distributed.Client, optional
        A client already connected to a cluster (left open).
    """
    from ...wsi.pipeline import _stderr

    log = _stderr if log is None else log
    names = [Path(p).name for p in slides]
    model = SlideModel(str(Path(deploy).resolve()), str(Path(weights).resolve()), segmenter.engine_choice.engine,
                       card, settings.tile, settings.multiple, settings.batch_size, tta)
    identity = model_identity(model)
    jobs = [plan_slide(path, out_dir, settings, model=identity, overwrite=overwrite, restart=restart, log=log)
            for path in slides]
    stems = [job.name for job in jobs]
    duplicates = sorted({n for n in stems if stems.count(n) > 1})
    if duplicates:
        raise ValueError(f"several slides share the name(s) {duplicates} ({', '.join(names)}); "
                         "their outputs would overwrite each other")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if client is not None:
        return run_slides(jobs, DaskExecutor(client, block_task, model), progress=progress, log=log)
    if workers is None and scheduler is None:
        predict = dihedral_tta(segmenter) if tta else segmenter
        return run_slides(jobs, LocalExecutor(predict), progress=progress, log=log)
    from ...wsi.cluster import slide_client

    with slide_client(workers=workers, scheduler=scheduler) as client:
        return run_slides(jobs, DaskExecutor(client, block_task, model), progress=progress, log=log)
