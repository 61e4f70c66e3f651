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
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import caffe
import numpy as np
from caffe.proto import caffe_pb2

from ...image_io import same_file
from ...metrics import confusion, dice_from_counts
from ..checks import check_net_param, check_solver_param, check_solverstate_fits, check_weights_fit, survives_caffe
from ..prototxt import layers_in_phase, read_net_prototxt, read_solver_prototxt

__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "TrainingDivergingWarning",
    "TrainingInterrupted",
    "check_solverstate_fits",
    "check_weights_fit",
    "read_solver_param",
    "snapshot_paths",
    "train",
    "validate_segmentation",
]

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
    """Parse a solver prototxt (pycaffe does not expose ``solver.param``); see :mod:`.checks`."""
    return read_solver_prototxt(solver_path)


def _check_solver_files(param, solver_path):
    """The solver and every net it names, checked the way Caffe would read them."""
    nets = [("net", param.net), ("train_net", param.train_net)] + [("test_net", path) for path in param.test_net]
    for field, path in nets:
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{field} {path!r} named in solver {solver_path} not found "
                                    f"(paths are relative to the working directory {os.getcwd()!r})")
    if not (param.net or param.train_net or param.HasField("net_param") or param.HasField("train_net_param")):
        raise ValueError(f"solver {solver_path} names no net (set 'net')")
    check_solver_param(param, str(solver_path))
    train_net = param.net or param.train_net
    if train_net:
        net_param = read_net_prototxt(train_net)
        check_net_param(net_param, train_net, caffe.TRAIN)
        if len(param.test_iter) and not param.test_net:
            check_net_param(net_param, train_net, caffe.TEST)
            if not layers_in_phase(net_param, caffe.TEST):
                raise ValueError(f"solver {solver_path} sets test_iter but {train_net} has no TEST-phase layers")
    for path in param.test_net:
        check_net_param(read_net_prototxt(path), path, caffe.TEST)
    if len(param.test_iter) not in (0, max(1, len(param.test_net))):
        raise ValueError(f"solver {solver_path}: {len(param.test_iter)} test_iter values for "
                         f"{max(1, len(param.test_net))} test net(s)")


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; nothing non-finite was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; ``snapshot`` is the ``(caffemodel, solverstate)`` saved, or None."""

    def __init__(self, snapshot, iteration):
        super().__init__(f"interrupted at iteration {iteration}")
        self.snapshot = snapshot
        self.iteration = iteration


def _weights_finite(net):
    return all(np.isfinite(blob.data).all() for blobs in net.params.values() for blob in blobs)


#: A weight beyond this size means a diverged run (trained weights stay within a few hundred).
EXPLODED_WEIGHT = 1e6


class TrainingDivergingWarning(UserWarning):
    """The weights grow without bound while the loss stays finite."""


def _largest_weight(net):
    """Largest absolute learned weight (BatchNorm's blobs are running sums, not weights)."""
    types = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    return max((float(np.abs(blob.data).max()) for name, blobs in net.params.items() if types.get(name) != "BatchNorm"
                for blob in blobs if blob.data.size), default=0.0)


def snapshot_paths(param, iteration):
    """``(caffemodel, solverstate)`` paths Caffe writes for a snapshot at ``iteration``."""
    stem = f"{param.snapshot_prefix}_iter_{iteration}"
    if param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        return stem + ".caffemodel.h5", stem + ".solverstate.h5"
    return stem + ".caffemodel", stem + ".solverstate"


def _loss_of(net):
    """Sum of the net's weighted loss blobs (the value the solver minimises).

    Every blob with a loss weight counts, not only the net's outputs: a loss layer without a
    ``top`` (common in V0/V1 nets) writes to an anonymous "(automatic)" blob that Caffe does not
    list among the outputs.
    """
    weights = net._blob_loss_weights
    blobs = net._blobs
    return sum(weight * float(np.sum(blobs[index].data)) for index, weight in enumerate(weights) if weight)


#: Loss layers whose bottoms are (class scores, labels): where validation finds the blobs to score.
_SCORE_LOSSES = ("SoftmaxWithLoss", "Accuracy")


def _score_and_label(net, score, label):
    """The (scores, labels) blob names to score: given, or the bottoms of the net's softmax loss."""
    if score is not None and label is not None:
        return score, label
    for index, layer in enumerate(net.layers):
        if layer.type in _SCORE_LOSSES:
            bottoms = net.bottom_names[net._layer_names[index]]
            if len(bottoms) >= 2:
                return score or bottoms[0], label or bottoms[1]
    if "score" in net.blobs and "label" in net.blobs:
        return score or "score", label or "label"
    return None


def validate_segmentation(solver, n_batches, score=None, label=None):
    """Loss, accuracy and pooled Dice of the solver's first test net over ``n_batches`` batches.

    Parameters
    ----------
    solver : caffe.Solver
        Must have a test net (``test_iter``/``test_interval`` or ``test_net`` in the solver).
    n_batches : int
        Forward passes (the solver's ``test_iter``).
    score, label : str, optional
        Blobs holding the N×C×H×W (or N×C, a patch classifier's) scores and the N×1×H×W (N)
        labels. Default: the two bottoms of the test net's first ``SoftmaxWithLoss`` (or
        ``Accuracy``) layer, whatever the net names them; else ``score`` and ``label``.

    Returns
    -------
    dict
        ``val_loss`` (mean over batches); the mean of each other output of the test net
        (``val_<blob>``, e.g. an ``Accuracy`` layer's); and, when the scores and labels are
        found, ``val_accuracy`` (pixel or patch accuracy) and ``val_dice`` (Dice of class 1, or
        every nonzero class, against the rest, all pixels pooled so small batches do not
        dominate). Labels outside the score's classes (an ``ignore_label`` such as 255) are
        not scored.
    """
    net = solver.test_nets[0]
    net.share_with(solver.net)  # Caffe shares weights only when it runs its own test
    blobs = _score_and_label(net, score, label)
    weights, names = net._blob_loss_weights, list(net._blob_names)
    others = [name for name in net.outputs if not weights[names.index(name)]]
    sums = dict.fromkeys(others, 0.0)
    tp = fp = fn = correct = total = 0
    loss = 0.0
    for _ in range(n_batches):
        net.forward()
        loss += _loss_of(net)
        for name in others:
            sums[name] += float(np.mean(net.blobs[name].data))
        if blobs is None:
            continue
        scores, truth = net.blobs[blobs[0]].data, net.blobs[blobs[1]].data
        predicted = scores.argmax(axis=1)
        truth = truth.reshape(predicted.shape)
        # A label outside [0, classes) can only be the loss's ignore_label (Caffe would have
        # stopped on any other): it is not scored, as the loss does not count it.
        scored = (truth >= 0) & (truth < scores.shape[1])
        predicted, truth = predicted[scored], truth[scored]
        batch_tp, batch_fp, batch_fn = confusion(predicted, truth)
        tp, fp, fn = tp + batch_tp, fp + batch_fp, fn + batch_fn
        correct += int(np.count_nonzero(predicted == truth))
        total += predicted.size
    metrics = {"val_loss": loss / n_batches}
    metrics.update({f"val_{name}": value / n_batches for name, value in sums.items()
                    if f"val_{name}" not in ("val_loss", "val_accuracy", "val_dice")})
    if blobs is not None:
        metrics.update({"val_accuracy": correct / total, "val_dice": dice_from_counts(tp, fp, fn)})
    return metrics


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


def _load_solver(param, seed, max_iter, where="solver"):
    """The pycaffe solver for ``param``, written to a temporary file with the overrides.

    Its nets are first built in a child process (:func:`.checks.survives_caffe`), so a layer
    Caffe CHECKs at setup (a missing kernel_size, labels that do not match the predictions)
    is a ValueError naming ``where``, not an abort of this process."""
    if seed is not None:
        param.random_seed = seed
    if max_iter is not None:
        param.max_iter = max_iter  # also what lr_policy "poly"/"inv" schedule against
    # Paths inside a solver are relative to the working directory, so the copy may live anywhere.
    with tempfile.NamedTemporaryFile("w", suffix=".solver.prototxt", delete=False) as handle:
        handle.write(str(param))
    try:
        survives_caffe(lambda: caffe.get_solver(handle.name) and None, str(where), "build the solver's nets")
        return caffe.get_solver(handle.name)
    finally:
        os.unlink(handle.name)


def _snapshot_iterations(param):
    """Snapshot files that already exist under the solver's ``snapshot_prefix``, by iteration."""
    prefix = Path(param.snapshot_prefix)
    folder = prefix.parent if str(prefix.parent) else Path(".")
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob(prefix.name + "_iter_*")):
        number = path.name[len(prefix.name) + len("_iter_"):].split(".", 1)[0]
        if number.isdigit() and path.name in {Path(p).name for p in snapshot_paths(param, int(number))}:
            found.setdefault(int(number), []).append(path)
    return found


def _check_snapshots(param, solver_path, start, weights, resume, overwrite):
    """This run snapshots at iterations in (start, max_iter] (Ctrl-C: wherever it is): refuse
    writing over the weights or state it starts from, and over an earlier run's snapshots."""
    if not param.snapshot_prefix:
        return
    later = {n: paths for n, paths in _snapshot_iterations(param).items() if start < n <= max(start, param.max_iter)}
    for number, paths in sorted(later.items()):
        for what, given in (("the weights", weights), ("the solver state", resume)):
            if given is not None and any(same_file(path, given) for path in paths):
                raise ValueError(f"{given}: this run would snapshot iteration {number} over {what} it starts "
                                 f"from; copy it elsewhere first or change snapshot_prefix in {solver_path}")
    if later and not overwrite:
        first = sorted(later)[0]
        raise FileExistsError(f"{later[first][0]}: a snapshot of an earlier run at an iteration this run would write "
                              f"(use --overwrite-snapshots to replace it, or change snapshot_prefix in {solver_path})")


def train(solver_path, *, weights=None, resume=None, max_iter=None, log_csv=None, validate_every=None,
          validate_fn=None, progress=True, seed=None, overwrite_log=False, overwrite_snapshots=False):
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
        metrics on the rows where validation ran. Never one of the files training reads (the
        solver, its nets, ``weights``, ``resume``); an existing file only with ``overwrite_log``.
    validate_every : int, optional
        Validate every this many iterations and at the end (default: the solver's
        ``test_interval`` if it has a test net, else never; 0 disables). An interval longer
        than ``max_iter`` (``test_interval: 999999999``, FCN's way of saying "never") never
        validates, not even at the end.
    validate_fn : callable, optional
        ``validate_fn(solver) -> dict`` of metrics; default :func:`validate_segmentation`
        over the solver's ``test_iter`` batches.
    progress : bool
        Show a tqdm progress bar with the loss.
    seed : int, optional
        Overrides the solver's ``random_seed`` (weight initialisation). Data layers are
        seeded by their own ``param_str``.
    overwrite_log : bool
        Replace an existing ``log_csv``.
    overwrite_snapshots : bool
        Replace snapshots of an earlier run at the iterations this run may snapshot (default:
        refuse before training). Never the ``weights`` or ``resume`` file training starts from.

    Returns
    -------
    TrainResult

    Raises
    ------
    FileNotFoundError
        For a missing solver, net, weights or solver-state file.
    ValueError
        For an invalid solver file or net (checked before Caffe reads them), weights that do
        not fit the net, or both ``weights`` and ``resume``.
    TrainingDiverged
        At the first non-finite loss (or non-finite weights before a snapshot or validation);
        no non-finite weights are written.
    TrainingInterrupted
        On Ctrl-C, after a snapshot of the iteration reached (its paths in ``snapshot``).
    """
    param = _checked_solver(solver_path, weights, resume, log_csv, overwrite_log)
    if validate_every is None:
        validate_every = param.test_interval if len(param.test_iter) > 0 else 0
    snapshot_every = _take_over_tests_and_snapshots(param)
    solver = _start_solver(param, solver_path, seed, max_iter, weights, resume, overwrite_snapshots)
    if validate_every and validate_fn is None:
        validate_fn = _default_validation(solver, param, solver_path)
    run = _Run(solver, param, solver_path, weights, resume)
    log = _CsvLog(log_csv) if log_csv is not None else None
    bar = _progress_bar(param.max_iter, solver.iter, solver_path) if progress else None
    try:
        run.steps(snapshot_every, validate_every, validate_fn, log, bar)
    except KeyboardInterrupt:
        run.snapshot_on_interrupt()
        raise TrainingInterrupted(run.last_snapshot, solver.iter) from None
    finally:
        if bar is not None:
            bar.close()
    if run.last_snapshot is None or run.last_snapshot != snapshot_paths(param, solver.iter):
        run.snapshot()
    caffemodel, solverstate = run.last_snapshot if run.last_snapshot else (None, None)
    return TrainResult(iterations=solver.iter, losses=run.losses, validation=run.validation, caffemodel=caffemodel,
                       solverstate=solverstate, log_csv=None if log_csv is None else str(log_csv))


def _checked_solver(solver_path, weights, resume, log_csv, overwrite_log):
    """The solver's parameters, once every file training reads or writes is checked."""
    if weights is not None and resume is not None:
        raise ValueError("give either weights (start from a .caffemodel) or resume (a .solverstate), not both")
    param = read_solver_param(solver_path)
    _check_solver_files(param, solver_path)
    for path, what in ((weights, "weights file"), (resume, "solver state file")):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    if log_csv is not None:
        inputs = [solver_path, param.net, param.train_net, *param.test_net, weights, resume]
        if any(same_file(log_csv, path) for path in inputs if path):
            raise ValueError(f"log {log_csv}: is one of the files training reads; name another CSV")
        if os.path.lexists(log_csv) and not overwrite_log:
            raise FileExistsError(f"log {log_csv}: already exists (use --overwrite-log to replace it)")
    if param.snapshot_prefix:
        # Caffe aborts when it cannot write a snapshot.
        Path(param.snapshot_prefix).parent.mkdir(parents=True, exist_ok=True)
    return param


def _take_over_tests_and_snapshots(param):
    """Switch off Caffe's own test pass and snapshots in ``param``; return the snapshot interval.

    This loop validates and snapshots itself, after checking that the weights are finite (a test
    pass over NaN scores corrupts the heap in Caffe's Accuracy layer, and a NaN snapshot is useless).
    """
    snapshot_every = param.snapshot
    param.test_interval = 2 ** 31 - 1
    param.snapshot = 0
    return snapshot_every


def _start_solver(param, solver_path, seed, max_iter, weights, resume, overwrite_snapshots):
    """The solver, with ``weights`` or ``resume`` loaded once checked against its net."""
    caffe.set_mode_cpu()  # check_solver_param refused GPU: this Caffe is CPU-only
    solver = _load_solver(param, seed, max_iter, solver_path)
    if weights is not None:
        check_weights_fit(solver.net, weights)
        solver.net.copy_from(str(weights))
    if resume is not None:
        check_solverstate_fits(solver.net, resume, check_solver_param(param, str(solver_path)))
        solver.restore(str(resume))
    _check_snapshots(param, solver_path, solver.iter, weights, resume, overwrite_snapshots)
    return solver


def _default_validation(solver, param, solver_path):
    """:func:`validate_segmentation` over the solver's ``test_iter`` batches."""
    if len(solver.test_nets) == 0:
        raise ValueError(f"validation requested but solver {solver_path} has no test net "
                         "(set test_iter and test_interval)")
    n_batches = param.test_iter[0] if param.test_iter else 1

    def validate_fn(solver):
        return validate_segmentation(solver, n_batches)

    return validate_fn


def _progress_bar(target, initial, solver_path):
    from tqdm import tqdm

    return tqdm(total=target, initial=initial, unit="it", desc=Path(solver_path).stem, file=sys.stderr)


class _Run:
    """One training run: the steps taken, their losses and validations, and the last snapshot."""

    def __init__(self, solver, param, solver_path, weights, resume):
        self.solver, self.param, self.solver_path = solver, param, solver_path
        self.weights, self.resume = weights, resume
        self.losses, self.validation = [], []
        self.last_snapshot = None
        self.exploded = False

    def snapshot(self):
        solver, param = self.solver, self.param
        if not param.snapshot_prefix:
            return
        paths = snapshot_paths(param, solver.iter)
        if any(given is not None and same_file(path, given) for path in paths for given in (self.weights, self.resume)):
            self.last_snapshot = paths  # nothing trained since the file it started from was saved: that is it
            return
        if not _weights_finite(solver.net):
            raise TrainingDiverged(f"the weights are NaN or infinite at iteration {solver.iter}; "
                                   f"no snapshot written (last one: {self.last_snapshot and self.last_snapshot[0]})")
        solver.snapshot()
        self.last_snapshot = snapshot_paths(param, solver.iter)

    def snapshot_on_interrupt(self):
        """Keep the work done so far; resume from this snapshot with resume=."""
        if self.last_snapshot != snapshot_paths(self.param, self.solver.iter) and self.solver.iter > 0:
            try:
                self.snapshot()
            except TrainingDiverged:
                pass

    def steps(self, snapshot_every, validate_every, validate_fn, log, bar):
        """Step to the solver's ``max_iter``: loss, snapshots, validation, log row and progress per step."""
        solver, target = self.solver, self.param.max_iter
        start = time.perf_counter()
        while solver.iter < target:
            iteration = solver.iter
            solver.step(1)
            loss = self._finite_loss(iteration)
            self._warn_once_weights_explode(iteration)
            self.losses.append((iteration, loss))
            row = {"iter": iteration, "loss": loss, "elapsed_s": round(time.perf_counter() - start, 3)}
            if snapshot_every and solver.iter % snapshot_every == 0:
                self.snapshot()
            if validate_every and (solver.iter % validate_every == 0
                                   or (solver.iter == target and validate_every <= target)):
                row.update(self._validate(validate_fn))
            if log is not None:
                log.add(row)
            if bar is not None:
                self._show(bar, loss)

    def _finite_loss(self, iteration):
        loss = _loss_of(self.solver.net)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: the loss is {loss} at iteration {iteration} of {self.solver_path}; "
                f"stopped without saving the non-finite weights (last snapshot: "
                f"{self.last_snapshot[0] if self.last_snapshot else 'none'}); lower base_lr or check the data")
        return loss

    def _warn_once_weights_explode(self, iteration):
        """A diverging run need not reach NaN (a saturated softmax keeps the loss finite while the
        weights grow without bound): warn, once, naming the iteration."""
        if self.exploded:
            return
        largest = _largest_weight(self.solver.net)
        if largest > EXPLODED_WEIGHT:
            self.exploded = True
            warnings.warn(f"training is diverging: a weight reached {largest:.3g} at iteration {iteration} of "
                          f"{self.solver_path} (the loss is {self.losses[-1][1] if self.losses else 'finite'} but "
                          "meaningless); lower base_lr", TrainingDivergingWarning, stacklevel=2)

    def _validate(self, validate_fn):
        if not _weights_finite(self.solver.net):
            raise TrainingDiverged(f"the weights are NaN or infinite at iteration {self.solver.iter}; "
                                   "stopped before validating on them")
        metrics = dict(validate_fn(self.solver))
        self.validation.append({"iter": self.solver.iter, **metrics})
        return metrics

    def _show(self, bar, loss):
        postfix = {"loss": f"{loss:.4f}"}
        if self.validation:
            postfix.update({key: f"{value:.3f}" for key, value in self.validation[-1].items()
                            if key != "iter" and isinstance(value, float)})
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
