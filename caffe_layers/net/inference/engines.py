"""The inference engine of a deploy net: Caffe (the reference), OpenCV's DNN module, or ``auto``.

:func:`make_segmenter` returns a ``predict`` callable for :func:`caffe_layers.tiling.segment_tiled`
run by the chosen engine:

* ``"caffe"``: :class:`~caffe_layers.net.inference.caffe_engine.CaffeSegmenter`, pycaffe itself;
* ``"opencv"``: :class:`~caffe_layers.net.inference.opencv_engine.OpenCVSegmenter`, the same net through
  ``cv2.dnn.readNetFromCaffe`` (several times faster on the CPU), with the layers OpenCV
  cannot run done by the engine (see :mod:`caffe_layers.net.inference.opencv_engine`);
* ``"onnxruntime"``: :class:`~caffe_layers.net.inference.onnx_engine.OnnxSegmenter`, the net
  converted to ONNX by the project's converter and run by ONNX Runtime (the optional extra
  ``[onnx]``); with ``onnx_model`` a model ``caffe-stain-export`` wrote (e.g. int8);
* ``"auto"`` (the default): the fastest of OpenCV and ONNX Runtime among those that can run
  the net *and* give Caffe's result on a probe tile -- every engine forwards the same tile
  (:func:`probe_tile`, the size the caller will tile with), an engine qualifies only if the
  largest difference of the probabilities is at most :data:`PROBE_TOLERANCE`, and the
  qualified ones are timed on the probe (best of two forwards after the first) -- and Caffe
  otherwise. An int8 model is never chosen by ``auto``: it is run only when asked for. The check runs once per model and
  process (keyed by the files' paths, sizes and modification times, the probe's shape and the
  tolerance). Without pycaffe, ``auto`` is OpenCV, unchecked, and says so.

Every choice is described by an :class:`EngineChoice` (``segmenter.engine_choice``): reported
in one line through ``log`` (stderr by default) and recorded as a dict by the tools that write
a ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ...model_card import ModelCard
from ...tiling import DEFAULT_MULTIPLE, DEFAULT_TILE
from .opencv_engine import OpenCVSegmenter, OpenCVUnsupported
from .caffe_engine import CaffeSegmenter
from .onnx_engine import OnnxSegmenter, OnnxUnsupported, onnxruntime_version
from .receptive_field import net_receptive_radius
from ..proto import PYCAFFE_IMPORT_ERROR

__all__ = ["DEFAULT_ENGINE", "ENGINES", "PROBE_TOLERANCE", "EngineChoice", "check_engine", "make_segmenter",
           "probe_side", "probe_tile", "report_to_stderr"]

ENGINES = ("auto", "caffe", "opencv", "onnxruntime")
DEFAULT_ENGINE = "auto"
PROBE_TOLERANCE = 1e-4
"""Largest |Δp| between OpenCV's and Caffe's probabilities on the probe for ``auto`` to pick OpenCV."""

_CHECKED = {}  # model key -> EngineChoice of a passed or failed auto check


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """Which engine runs a model, and why (``as_dict()`` is what ``summary.json`` records)."""

    requested: str
    engine: str
    reason: str
    deploy: str
    opencv_version: str = cv2.__version__
    onnxruntime_version: str | None = dataclasses.field(default_factory=onnxruntime_version)
    max_abs_diff: float | None = None  # |Δp| between the engines on the probe (auto only)
    tolerance: float | None = None
    probe_shape: tuple | None = None
    notes: tuple = ()  # what the OpenCV engine does besides OpenCV (pre-steps, registered layers)
    elapsed_s: float | None = None  # building the engines and the probe forward passes
    candidates: tuple = ()  # auto: each engine tried, its |Δp|, probe seconds and verdict

    def as_dict(self):
        record = dataclasses.asdict(self)
        record["probe_shape"] = None if self.probe_shape is None else list(self.probe_shape)
        record["notes"] = list(self.notes)
        record["candidates"] = [dict(candidate) for candidate in self.candidates]
        return record

    def message(self):
        """The one-line report."""
        name = {"caffe": "Caffe", "opencv": f"OpenCV {self.opencv_version}",
                "onnxruntime": f"ONNX Runtime {self.onnxruntime_version}"}[self.engine]
        return f"engine {self.requested}: {name} for {self.deploy} ({self.reason})"


def check_engine(engine):
    """Return ``engine`` if it is one of :data:`ENGINES`, else raise ValueError."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    return engine


def probe_tile(height, width, batch=1, seed=0):
    """A deterministic H&E-like float32 ``batch×3×height×width`` tile in 0–255 (RGB).

    Smooth pink-purple patches (a stain field varying over ~16 pixels) plus pixel noise, so
    that both flat regions and edges reach the net; the same for every call.
    """
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(batch):
        coarse = rng.uniform(0, 1, (3, max(2, height // 16), max(2, width // 16)))
        smooth = np.stack([cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR) for plane in coarse])
        base = np.array([205.0, 130.0, 190.0])[:, None, None]
        tile = base * (0.35 + 0.65 * smooth) + rng.normal(0, 12, (3, height, width))
        tiles.append(np.clip(tile, 0, 255).round())
    return np.stack(tiles).astype(np.float32)


def _model_key(deploy, weights, shape, tolerance):
    parts = []
    for path in (deploy, weights):
        stat = os.stat(path)
        parts.append((os.path.realpath(path), stat.st_size, stat.st_mtime_ns))
    # A mean file's path is relative to the working directory.
    return tuple(parts) + (tuple(shape), float(tolerance), os.getcwd(), cv2.__version__)


def report_to_stderr(message):
    """The default ``log`` of :func:`make_segmenter`: the line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _probe_shape(tile, multiple, batch):
    tile_h, tile_w = (tile, tile) if np.ndim(tile) == 0 else tuple(tile)
    multiple = max(1, int(multiple))
    tile_h, tile_w = (-(-int(t) // multiple) * multiple for t in (tile_h, tile_w))
    return (int(batch), 3, tile_h, tile_w)


def probe_side(tile, sides):
    """Side of the engine's probe tiles: ``tile``, but no larger than the largest of ``sides``
    (the images' or a slide block's): a tile is cut to its image, so a larger probe would test,
    and allocate for, more than the work itself."""
    return max(1, min(tile, max(sides))) if sides else tile


def make_segmenter(deploy_prototxt, weights, engine=DEFAULT_ENGINE, *, tile=DEFAULT_TILE,
                   multiple=DEFAULT_MULTIPLE, batch=1, tolerance=PROBE_TOLERANCE, threads=None, log=report_to_stderr,
                   card=None, onnx_model=None):
    """A ``predict`` callable for a deploy net, run by the chosen engine.

    Parameters
    ----------
    deploy_prototxt, weights : path
        As for :class:`~caffe_layers.net.inference.caffe_engine.CaffeSegmenter`.
    engine : {"auto", "caffe", "opencv"}
        See the module docstring. ``"opencv"`` runs no check against Caffe and raises
        :class:`~caffe_layers.net.inference.opencv_engine.OpenCVUnsupported` (a ValueError) for a net
        OpenCV cannot run; ``"auto"`` then uses Caffe.
    tile, multiple, batch
        Shape of the probe for ``auto``: ``batch`` tiles of ``tile`` pixels rounded up to a
        multiple of ``multiple``, as :func:`~caffe_layers.tiling.segment_tiled` will feed them.
    tolerance : float
        Largest |Δp| on the probe for ``auto`` to use OpenCV.
    threads : int, optional
        OpenCV threads (see OpenCVSegmenter).
    log : callable or None
        Receives the one-line report of the choice (default: stderr); None is silent.
    card : ModelCard, optional
        The net's conventions. The OpenCV and ONNX Runtime engines run the project's own
        convention only; a card that says otherwise (apart from ``size_multiple`` and ``mpp``)
        is run by Caffe.
    onnx_model : path, optional
        With ``engine="onnxruntime"``: run this model (``caffe-stain-export``'s, e.g. int8)
        instead of converting the net; not checked against Caffe.

    Returns
    -------
    callable
        ``predict(batch) -> prob`` with an ``engine_choice`` attribute (:class:`EngineChoice`).
    """
    check_engine(engine)
    deploy_name = str(Path(deploy_prototxt))  # as given: the report names the file the user named
    # size_multiple and mpp say how to tile, not how to feed the net.
    own_convention = card is None or card.as_dict() == dataclasses.replace(
        ModelCard(), size_multiple=card.size_multiple, mpp=card.mpp).as_dict()
    if not own_convention:
        if engine in ("opencv", "onnxruntime"):
            raise ValueError(f"{deploy_name}: the {engine} engine runs nets in the project's own convention "
                             f"only, and {card.source} describes another; use --engine caffe or auto")
        segmenter = CaffeSegmenter(deploy_prototxt, weights, card)
        choice = EngineChoice(engine, "caffe", f"the conventions of {card.source} are run by Caffe", deploy_name)
    elif engine == "caffe":
        segmenter = CaffeSegmenter(deploy_prototxt, weights, card)  # its size_multiple sets the geometry probe
        choice = EngineChoice("caffe", "caffe", "requested", deploy_name)
    elif engine == "opencv":
        segmenter = OpenCVSegmenter(deploy_prototxt, weights, threads=threads)
        choice = EngineChoice("opencv", "opencv", "requested; not checked against Caffe", deploy_name,
                              notes=tuple(segmenter.notes))
    elif engine == "onnxruntime":
        segmenter = OnnxSegmenter(deploy_prototxt, weights, threads=threads, onnx_model=onnx_model)
        choice = EngineChoice("onnxruntime", "onnxruntime", "requested; not checked against Caffe", deploy_name,
                              notes=tuple(segmenter.notes))
    else:
        segmenter, choice = _auto(deploy_prototxt, weights, _probe_shape(tile, multiple, batch), tolerance,
                                  threads, deploy_name, card)
    segmenter.engine_choice = choice
    segmenter.receptive_radius = net_receptive_radius(deploy_prototxt, card)  # the tools' default overlap
    if log is not None:
        log(choice.message())
    return segmenter


def _auto(deploy, weights, shape, tolerance, threads, deploy_name, card=None):
    """The ``auto`` choice: (segmenter, EngineChoice)."""
    started = time.perf_counter()
    if PYCAFFE_IMPORT_ERROR is not None:  # nothing to check OpenCV against
        segmenter = OpenCVSegmenter(deploy, weights, threads=threads)
        return segmenter, EngineChoice("auto", "opencv", "pycaffe is not installed, so not checked against Caffe",
                                       deploy_name, notes=tuple(segmenter.notes),
                                       elapsed_s=round(time.perf_counter() - started, 3))
    key = _model_key(deploy, weights, shape, tolerance)
    known = _CHECKED.get(key)
    if known is not None and known.engine != "caffe":
        return _build(known.engine, deploy, weights, threads, check_weights=False), known
    caffe_segmenter = CaffeSegmenter(deploy, weights, card)  # the reference; refuses bad files first
    if known is not None:
        return caffe_segmenter, known
    # Refuses a probe whose blobs would not fit in memory, before the probe itself is made.
    caffe_segmenter.check_input_shape(shape)
    probe = probe_tile(shape[2], shape[3], batch=shape[0])
    expected = caffe_segmenter(probe)
    size = "×".join(map(str, shape))
    trials = [_trial(engine, deploy, weights, threads, probe, expected, tolerance, size) for engine in FAST_ENGINES]
    passed = [trial for trial in trials if trial["segmenter"] is not None]
    verdicts = "; ".join(trial["verdict"] for trial in trials)
    if not passed:
        choice = EngineChoice("auto", "caffe", f"no faster engine matches Caffe: {verdicts}", deploy_name,
                              tolerance=tolerance, probe_shape=shape, candidates=tuple(t["record"] for t in trials),
                              elapsed_s=round(time.perf_counter() - started, 3),
                              max_abs_diff=min((t["max_abs_diff"] for t in trials
                                                if t["max_abs_diff"] is not None), default=None))
        _CHECKED[key] = choice
        return caffe_segmenter, choice
    # The first that matches in FAST_ENGINES' order, not the one timed fastest on this probe: a
    # choice that follows a timing race would change a run's masks from one run to the next.
    best = passed[0]
    notes = tuple(best["segmenter"].notes)
    reason = (f"preferred of the engines that match Caffe on a {size} probe tile (|Δp| ≤ {tolerance:.0e}; "
              f"preference: {', '.join(_ENGINE_NAMES[e] for e in FAST_ENGINES)}): {verdicts}")
    if notes:
        reason += "; " + "; ".join(notes)
    choice = EngineChoice("auto", best["engine"], reason, deploy_name, max_abs_diff=best["max_abs_diff"],
                          tolerance=tolerance, probe_shape=shape, notes=notes,
                          candidates=tuple(t["record"] for t in trials),
                          elapsed_s=round(time.perf_counter() - started, 3))
    _CHECKED[key] = choice
    return best["segmenter"], choice


FAST_ENGINES = ("onnxruntime", "opencv")
"""The engines ``auto`` tries against Caffe, in order of preference: it takes the first that
matches (never int8). ONNX Runtime first: 1.1-2.3× OpenCV on the templates (docs/speed.md)."""
_ENGINE_NAMES = {"caffe": "Caffe", "opencv": "OpenCV", "onnxruntime": "ONNX Runtime"}
_UNSUPPORTED = (OpenCVUnsupported, OnnxUnsupported)


def _build(engine, deploy, weights, threads, check_weights=True, onnx_model=None):
    if engine == "opencv":
        return OpenCVSegmenter(deploy, weights, threads=threads, check_weights=check_weights)
    if engine == "onnxruntime":
        return OnnxSegmenter(deploy, weights, threads=threads, onnx_model=onnx_model)
    return CaffeSegmenter(deploy, weights)


def _probe_seconds(segmenter, probe, repeats=2):
    """Best of ``repeats`` timed forwards of the probe, after the one that allocated its buffers."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter(probe)
        best = min(best, time.perf_counter() - start)
    return best


def _trial(engine, deploy, weights, threads, probe, expected, tolerance, size):
    """One engine against Caffe's probe output: the segmenter if it matches, its |Δp|, time and verdict."""
    name = _ENGINE_NAMES[engine]
    result = dict(engine=engine, segmenter=None, max_abs_diff=None, seconds=None)
    try:
        segmenter = _build(engine, deploy, weights, threads, check_weights=False)
        got = segmenter(probe)
    except _UNSUPPORTED as error:
        result["verdict"] = f"{name} cannot run it: {str(error).replace(f'{deploy}: ', '')}"
    except Exception as error:  # noqa: BLE001 - a fast engine that fails is not chosen; Caffe stays the answer
        result["verdict"] = f"{name} failed on it: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
    else:
        if got.shape != expected.shape:
            result["verdict"] = f"{name}'s output has shape {got.shape}, Caffe's {expected.shape}"
        else:
            difference = np.abs(got.astype(np.float64) - expected)
            max_diff = float(difference.max()) if np.isfinite(difference).all() else float("inf")
            result["max_abs_diff"] = max_diff
            if max_diff <= tolerance:
                result.update(segmenter=segmenter, seconds=_probe_seconds(segmenter, probe))
                result["verdict"] = f"{name} |Δp| {max_diff:.1e}, {result['seconds'] * 1e3:.0f} ms per probe"
            else:
                result["verdict"] = f"{name} differs: |Δp| {max_diff:.1e} > {tolerance:.0e}"
    result["record"] = {"engine": engine, "max_abs_diff": result["max_abs_diff"],
                        "probe_seconds": None if result["seconds"] is None else round(result["seconds"], 4),
                        "verdict": result["verdict"]}
    return result
