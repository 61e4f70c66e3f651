"""Training loop over pycaffe: progress bar, CSV log, validation, snapshots, safe weight loading.

:func:`train` steps a Caffe solver one iteration at a time so that it can show the loss in a
progress bar, log it to CSV and validate periodically. Every file Caffe would read is checked
first, because Caffe aborts the whole process (``LOG(FATAL)``) on a missing file or on a
``.caffemodel`` whose blob shapes do not fit the net; here those are Python exceptions that
name the file and the problem.

Command line (:mod:`caffe_layers.cli.train`)::

    caffe-stain-train --solver prototxt/solver_scratch.prototxt --log runs/scratch.csv
    caffe-stain-train --solver prototxt/solver_finetune.prototxt --weights model.caffemodel
    caffe-stain-train --solver prototxt/solver_scratch.prototxt --resume snapshots/unet_scratch_iter_500.solverstate

Paths inside the solver and net prototxts are relative to the working directory, as for the
``caffe`` tool.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import caffe
import numpy as np
from caffe.proto import caffe_pb2
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from ..metrics import confusion, dice_from_counts

__all__ = [
    "TrainResult",
    "check_solverstate_fits",
    "check_weights_fit",
    "read_solver_param",
    "snapshot_paths",
    "train",
    "validate_segmentation",
]

# Solvers whose history holds two blobs per parameter (Adam: m and v; AdaDelta: two running means).
_TWO_HISTORY_SOLVERS = ("Adam", "AdaDelta")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes
    ----------
    iterations : int
        The solver's iteration count at the end.
    losses : list of (int, float)
        ``(iteration, training loss)`` for every step taken; the iteration is the one the
        loss was computed at (before its update), so a run from scratch starts at 0.
    validation : list of dict
        One dict per validation: ``iter`` plus the metrics (e.g. ``val_loss``, ``val_dice``).
    caffemodel, solverstate : str or None
        The last snapshot written (None if there was none).
    log_csv : str or None
        The CSV log.
    """

    iterations: int
    losses: list
    validation: list
    caffemodel: str | None = None
    solverstate: str | None = None
    log_csv: str | None = None

    @property
    def first_loss(self):
        """Training loss of the first step taken."""
        return self.losses[0][1] if self.losses else None

    @property
    def last_loss(self):
        """Training loss of the last step taken."""
        return self.losses[-1][1] if self.losses else None


def read_solver_param(solver_path):
    """Parse a solver prototxt (pycaffe does not expose ``solver.param``).

    Parameters
    ----------
    solver_path : str or Path

    Returns
    -------
    caffe_pb2.SolverParameter

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If it is not a valid SolverParameter text.
    """
    solver_path = Path(solver_path)
    if not solver_path.is_file():
        raise FileNotFoundError(f"solver file not found: {solver_path}")
    param = caffe_pb2.SolverParameter()
    try:
        text_format.Merge(solver_path.read_text(), param)
    except text_format.ParseError as error:
        raise ValueError(f"solver file {solver_path} is not a valid solver prototxt: {error}") from error
    return param


def _check_solver_files(param, solver_path):
    nets = [("net", param.net), ("train_net", param.train_net)] + [("test_net", path) for path in param.test_net]
    for field, path in nets:
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{field} {path!r} named in solver {solver_path} not found "
                                    f"(paths are relative to the working directory {os.getcwd()!r})")
    if not (param.net or param.train_net or param.HasField("net_param") or param.HasField("train_net_param")):
        raise ValueError(f"solver {solver_path} names no net (set 'net')")


def _read_net_param(weights_path):
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"weights file not found: {weights_path}")
    if weights_path.suffix == ".h5":
        raise ValueError(f"weights file {weights_path}: only binary .caffemodel files are supported, not HDF5")
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(weights_path.read_bytes())
    except DecodeError as error:
        raise ValueError(f"weights file {weights_path} is not a binary .caffemodel (NetParameter): {error}") from error
    return param


def _blob_proto_shape(blob):
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def _shapes_equal(target_shape, proto_shape, legacy):
    if legacy:
        # Caffe's Blob::ShapeEquals: a legacy 4-D proto matches the target padded with leading 1s.
        return len(target_shape) <= 4 and (1,) * (4 - len(target_shape)) + tuple(target_shape) == proto_shape
    return tuple(target_shape) == proto_shape


def check_weights_fit(net, weights_path):
    """Check that ``net.copy_from(weights_path)`` will not abort Caffe.

    Caffe copies the layers of the file whose names are in the net and aborts the process if
    such a layer's blobs differ in number or shape. This does the same matching in Python.

    Parameters
    ----------
    net : caffe.Net
    weights_path : str or Path
        Binary ``.caffemodel``.

    Returns
    -------
    list of str
        Names of the layers that will be copied.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If it is not a .caffemodel, shares no learnable layer with the net (nothing would be
        loaded) or a layer's blobs do not fit; the message lists every mismatch.
    """
    source = _read_net_param(weights_path)
    targets = {name: [tuple(blob.data.shape) for blob in blobs] for name, blobs in net.params.items()}
    copied, problems = [], []
    for layer in list(source.layer) + list(source.layers):  # .layers: V1-format models
        if not layer.blobs or layer.name not in targets:
            continue  # Caffe ignores layers the net does not have
        target_shapes = targets[layer.name]
        if len(layer.blobs) != len(target_shapes):
            problems.append(f"layer {layer.name!r} has {len(layer.blobs)} blobs in the file but "
                            f"{len(target_shapes)} in the net")
            continue
        for index, (blob, target_shape) in enumerate(zip(layer.blobs, target_shapes)):
            legacy = any(blob.HasField(field) for field in ("num", "channels", "height", "width"))
            if not _shapes_equal(target_shape, _blob_proto_shape(blob), legacy):
                problems.append(f"layer {layer.name!r} blob {index}: file has shape "
                                f"{_blob_proto_shape(blob)}, net has {target_shape}")
        copied.append(layer.name)
    if problems:
        raise ValueError(f"weights file {weights_path} does not fit the net: " + "; ".join(problems))
    if not copied:
        raise ValueError(f"weights file {weights_path} shares no learnable layer with the net "
                         f"(net layers: {', '.join(targets) or 'none'}); nothing would be loaded")
    return copied


def check_solverstate_fits(net, solverstate_path, solver_type="SGD"):
    """Check that ``solver.restore(solverstate_path)`` will not abort Caffe.

    Parameters
    ----------
    net : caffe.Net
        The solver's training net.
    solverstate_path : str or Path
        Binary ``.solverstate`` (HDF5 states are only checked for existence).
    solver_type : str
        The solver's ``type``; Adam and AdaDelta keep two history blobs per parameter.

    Raises
    ------
    FileNotFoundError
        If the state or the ``.caffemodel`` it refers to (``learned_net``, a path relative
        to the working directory) is missing.
    ValueError
        If the state is unreadable or its history or weights do not fit the net.
    """
    solverstate_path = Path(solverstate_path)
    if not solverstate_path.is_file():
        raise FileNotFoundError(f"solver state file not found: {solverstate_path}")
    if solverstate_path.suffix == ".h5":
        return
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(solverstate_path.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{solverstate_path} is not a binary .solverstate: {error}") from error
    if state.learned_net:
        if not os.path.isfile(state.learned_net):
            raise FileNotFoundError(f"solver state {solverstate_path} refers to weights {state.learned_net!r}, "
                                    f"which do not exist (relative to {os.getcwd()!r})")
        check_weights_fit(net, state.learned_net)
    param_shapes = [tuple(blob.data.shape) for blobs in net.params.values() for blob in blobs]
    per_param = 2 if solver_type in _TWO_HISTORY_SOLVERS else 1
    history_shapes = [_blob_proto_shape(blob) for blob in state.history]
    expected = param_shapes * per_param
    if len(history_shapes) != len(expected) or any(
            not _shapes_equal(target, shape, legacy=False) and not _shapes_equal(target, shape, legacy=True)
            for target, shape in zip(expected, history_shapes)):
        raise ValueError(f"solver state {solverstate_path} does not fit this {solver_type} solver's net: "
                         f"{len(history_shapes)} history blobs, expected {len(expected)} of the net's shapes")


def snapshot_paths(param, iteration):
    """``(caffemodel, solverstate)`` paths Caffe writes for a snapshot at ``iteration``."""
    stem = f"{param.snapshot_prefix}_iter_{iteration}"
    if param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        return stem + ".caffemodel.h5", stem + ".solverstate.h5"
    return stem + ".caffemodel", stem + ".solverstate"


def _loss_of(net):
    """Sum of the net's weighted loss outputs (the value the solver minimises)."""
    weights = net._blob_loss_weights
    names = list(net._blob_names)
    total = 0.0
    for name in net.outputs:
        weight = weights[names.index(name)]
        if weight:
            total += weight * float(np.sum(net.blobs[name].data))
    return total


def validate_segmentation(solver, n_batches, score="score", label="label"):
    """Loss, accuracy and pooled Dice of the solver's first test net over ``n_batches`` batches.

    Parameters
    ----------
    solver : caffe.Solver
        Must have a test net (``test_iter``/``test_interval`` or ``test_net`` in the solver).
    n_batches : int
        Forward passes (the solver's ``test_iter``).
    score, label : str
        Blobs holding the N×2×H×W scores and N×1×H×W {0, 1} labels.

    Returns
    -------
    dict
        ``val_loss`` (mean over batches), ``val_accuracy`` (pixel accuracy) and ``val_dice``
        (nucleus Dice of all pixels pooled, so small batches do not dominate).
    """
    net = solver.test_nets[0]
    net.share_with(solver.net)  # Caffe shares weights only when it runs its own test
    tp = fp = fn = correct = total = 0
    loss = 0.0
    for _ in range(n_batches):
        net.forward()
        loss += _loss_of(net)
        predicted = net.blobs[score].data.argmax(axis=1)
        truth = net.blobs[label].data.reshape(predicted.shape)
        batch_tp, batch_fp, batch_fn = confusion(predicted, truth)
        tp, fp, fn = tp + batch_tp, fp + batch_fp, fn + batch_fn
        correct += int(np.count_nonzero(predicted == (truth != 0)))
        total += predicted.size
    return {"val_loss": loss / n_batches, "val_accuracy": correct / total, "val_dice": dice_from_counts(tp, fp, fn)}


class _CsvLog:
    """CSV written row by row; rewritten whole when a row brings new columns."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = ["iter", "loss", "elapsed_s"]
        self.rows = []
        self._rewrite()

    def _rewrite(self):
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def add(self, row):
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)


def _load_solver(param, seed, max_iter):
    """The pycaffe solver for ``param``, written to a temporary file with the overrides."""
    if seed is not None:
        param.random_seed = seed
    if max_iter is not None:
        param.max_iter = max_iter  # also what lr_policy "poly"/"inv" schedule against
    # Paths inside a solver are relative to the working directory, so the copy may live anywhere.
    with tempfile.NamedTemporaryFile("w", suffix=".solver.prototxt", delete=False) as handle:
        handle.write(str(param))
    try:
        return caffe.get_solver(handle.name)
    finally:
        os.unlink(handle.name)


def train(solver_path, *, weights=None, resume=None, max_iter=None, log_csv=None, validate_every=None,
          validate_fn=None, progress=True, seed=None):
    """Train with a Caffe solver, one iteration at a time.

    Parameters
    ----------
    solver_path : str or Path
        Solver prototxt (its paths relative to the working directory).
    weights : str or Path, optional
        ``.caffemodel`` to start from (fine-tuning / retraining); checked against the net
        first. Layers the net does not have are ignored, as by Caffe.
    resume : str or Path, optional
        ``.solverstate`` to continue from (iteration count, optimiser history and weights).
    max_iter : int, optional
        Iteration to stop at (default: the solver's ``max_iter``). Counted from 0, so when
        resuming at iteration 500 with ``max_iter=600`` it trains 100 iterations.
    log_csv : str or Path, optional
        CSV with one row per iteration: ``iter``, ``loss``, ``elapsed_s`` and the validation
        metrics on the rows where validation ran.
    validate_every : int, optional
        Validate every this many iterations and at the end (default: the solver's
        ``test_interval`` if it has a test net, else never; 0 disables).
    validate_fn : callable, optional
        ``validate_fn(solver) -> dict`` of metrics; default :func:`validate_segmentation`
        over the solver's ``test_iter`` batches.
    progress : bool
        Show a tqdm progress bar with the loss.
    seed : int, optional
        Overrides the solver's ``random_seed`` (weight initialisation). Data layers are
        seeded by their own ``param_str``.

    Returns
    -------
    TrainResult

    Raises
    ------
    FileNotFoundError
        For a missing solver, net, weights or solver-state file.
    ValueError
        For an invalid solver file, weights that do not fit the net, or both ``weights``
        and ``resume``.
    """
    if weights is not None and resume is not None:
        raise ValueError("give either weights (start from a .caffemodel) or resume (a .solverstate), not both")
    param = read_solver_param(solver_path)
    _check_solver_files(param, solver_path)
    for path, what in ((weights, "weights file"), (resume, "solver state file")):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    if param.snapshot_prefix:
        # Caffe aborts when it cannot write a snapshot.
        Path(param.snapshot_prefix).parent.mkdir(parents=True, exist_ok=True)

    if validate_every is None:
        validate_every = param.test_interval if len(param.test_iter) > 0 else 0
    if validate_every:
        # Our validation replaces Caffe's own test pass, which would run as well (and only
        # print to the log).
        param.test_interval = 2 ** 31 - 1

    if param.solver_mode == param.CPU:
        caffe.set_mode_cpu()
    else:
        caffe.set_mode_gpu()
    solver = _load_solver(param, seed, max_iter)
    if weights is not None:
        check_weights_fit(solver.net, weights)
        solver.net.copy_from(str(weights))
    if resume is not None:
        check_solverstate_fits(solver.net, resume, param.type)
        solver.restore(str(resume))

    if validate_every and validate_fn is None:
        if len(solver.test_nets) == 0:
            raise ValueError(f"validation requested but solver {solver_path} has no test net "
                             "(set test_iter and test_interval)")
        n_batches = param.test_iter[0] if param.test_iter else 1

        def validate_fn(solver):
            return validate_segmentation(solver, n_batches)

    target = param.max_iter
    log = _CsvLog(log_csv) if log_csv is not None else None
    losses, validation = [], []
    last_snapshot = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target, initial=solver.iter, unit="it", desc=Path(solver_path).stem, file=sys.stderr)
    start = time.perf_counter()
    try:
        while solver.iter < target:
            iteration = solver.iter
            solver.step(1)
            loss = _loss_of(solver.net)
            losses.append((iteration, loss))
            row = {"iter": iteration, "loss": loss, "elapsed_s": round(time.perf_counter() - start, 3)}
            if param.snapshot and solver.iter % param.snapshot == 0:
                last_snapshot = snapshot_paths(param, solver.iter)  # written by Caffe inside step()
            if validate_every and (solver.iter % validate_every == 0 or solver.iter == target):
                metrics = dict(validate_fn(solver))
                validation.append({"iter": solver.iter, **metrics})
                row.update(metrics)
            if log is not None:
                log.add(row)
            if bar is not None:
                postfix = {"loss": f"{loss:.4f}"}
                if validation:
                    postfix.update({key: f"{value:.3f}" for key, value in validation[-1].items()
                                    if key != "iter" and isinstance(value, float)})
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        # Keep the work done so far; resume from this snapshot with resume=.
        if param.snapshot_prefix:
            solver.snapshot()
        raise
    finally:
        if bar is not None:
            bar.close()

    if param.snapshot_prefix and (last_snapshot is None or last_snapshot != snapshot_paths(param, solver.iter)):
        solver.snapshot()
        last_snapshot = snapshot_paths(param, solver.iter)
    caffemodel, solverstate = last_snapshot if last_snapshot else (None, None)
    return TrainResult(iterations=solver.iter, losses=losses, validation=validation, caffemodel=caffemodel,
                       solverstate=solverstate, log_csv=None if log_csv is None else str(log_csv))
