"""Training and exporting the experiments' U-Nets: shared by every benchmark of the package.

Each training runs single-threaded in a fresh (spawned) worker process, so a model does not
depend on how many train at once; a model starts once the one it continues from is done.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

from ..model_card import write_model_card
from ..net.inference.caffe_engine import use_cpu
from ..net.training import TrainResult, train
from ..net.training.templates import net_to_text, solver, solver_to_text, unet_deploy, unet_train_val

__all__ = ["ProgressLog", "export_model", "finished_training", "one_blas_thread", "relative_to", "train_all", "train_model"]


class ProgressLog:
    """Progress lines on stderr, timed from the start of one run."""

    def __init__(self, name="experiment"):
        self.name = name
        self.start = time.perf_counter()

    def __call__(self, message):
        print(f"[{self.name} {time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def relative_to(path, folder):
    """``path`` relative to ``folder`` when it is inside it, else absolute (as the summary records)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(folder).resolve()))
    except ValueError:
        return str(path)


def _model_files(name, centring, augment_param_str, lists, mean_file, settings, folder, *, iters, lr):
    """The train/val net and solver of one model: {path: text}, and the solver's path."""
    folder = Path(folder)
    net = unet_train_val(str(lists["train"]), str(lists["val"]), centring=centring,
                         mean_file=str(mean_file) if centring == "meanfile" else None,
                         augment_param_str=augment_param_str, batch_size=settings.batch_size,
                         patch_size=settings.patch_size, depth=settings.depth,
                         base_width=settings.base_width, seed=settings.seed)
    solver_param = solver(str(folder / "train_val.prototxt"), base_lr=lr, max_iter=iters,
                          snapshot_prefix=str(folder / "snapshot"), snapshot=0,
                          test_iter=settings.val_batches, test_interval=settings.validate_every,
                          random_seed=settings.seed, display=0)
    solver_path = folder / f"{folder.name}_solver.prototxt"
    return {folder / "train_val.prototxt": net_to_text(net), solver_path: solver_to_text(solver_param)}, solver_path


def train_model(name, centring, augment_param_str, lists, mean_file, settings, folder, *, iters, lr,
                weights=None):
    """Write a train/val net and solver for one model and train it; return (weights path, TrainResult)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    files, solver_path = _model_files(name, centring, augment_param_str, lists, mean_file, settings, folder,
                                      iters=iters, lr=lr)
    for path, text in files.items():
        path.write_text(text)
    result = train(solver_path, weights=weights, log_csv=Path(folder) / "log.csv", progress=False,
                   seed=settings.seed, overwrite_log=True, overwrite_snapshots=True)  # the experiment's own folder
    return Path(result.caffemodel), result


def finished_training(task):
    """(weights path, TrainResult) of a training this task already completed, else None.

    Completed means: the same net and solver files (so the same data, settings and seed), the
    final snapshot, and a log with every iteration. A run stopped after its trainings (a session
    that ends, a failure while scoring) then resumes without training again. The TrainResult
    holds the logged losses and validations.
    """
    task = dict(task)
    task.pop("weights", None)
    files, _ = _model_files(**task)
    folder = Path(task["folder"])
    weights, log_csv = folder / f"snapshot_iter_{task['iters']}.caffemodel", folder / "log.csv"
    if not (weights.is_file() and log_csv.is_file()):
        return None
    if any(not path.is_file() or path.read_text() != text for path, text in files.items()):
        return None
    with open(log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != task["iters"]:
        return None
    validation = [dict(iter=int(row["iter"]), **{k: float(v) for k, v in row.items() if k.startswith("val_") and v})
                  for row in rows if any(row[k] for k in row if k.startswith("val_"))]
    return weights, TrainResult(iterations=task["iters"], losses=[(int(r["iter"]), float(r["loss"])) for r in rows],
                                validation=validation, caffemodel=str(weights), log_csv=str(log_csv))


def _train_task(task):
    """One training in a worker process (top level: the pool pickles it by name)."""
    use_cpu()
    return train_model(**task)


@contextlib.contextmanager
def one_blas_thread():
    """Worker processes started inside inherit one BLAS / OpenMP thread (the parent keeps its own)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_all(log, specs, jobs, reuse=False):
    """Train every model of ``specs`` on ``jobs`` worker processes, each model once its base is done.

    ``specs``: key -> dict(task=<train_model keywords>, base=<key of the model to start from> or
    None). Returns key -> (weights path, TrainResult). Each training runs single-threaded in a
    fresh process, so its result does not depend on ``jobs``. With ``reuse``, a training already
    completed with the same files (:func:`finished_training`) is taken as it is.
    """
    done, pending = {}, dict(specs)
    context = multiprocessing.get_context("spawn")  # Caffe and OpenBLAS do not survive fork safely
    with one_blas_thread(), concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running = {}

        def ready_task(key):
            spec = pending.pop(key)
            task = dict(spec["task"])
            if spec["base"] is not None:
                task["weights"] = str(done[spec["base"]][0])
            return spec, task

        def take_finished():
            # Completed trainings make their continuations ready: repeat until none is left.
            while True:
                ready = [k for k, spec in pending.items() if spec["base"] is None or spec["base"] in done]
                found = [(k, finished_training(pending[k]["task"])) for k in ready]
                found = [(k, result) for k, result in found if result is not None]
                if not found:
                    return
                for key, result in found:
                    pending.pop(key)
                    done[key] = result
                    log(f"reusing the completed training of {_label(key)}: {result[0]}")

        def submit_ready():
            if reuse:
                take_finished()
            # No more than one training per worker at a time, so "training ..." means it started.
            ready = [k for k, spec in pending.items() if spec["base"] is None or spec["base"] in done]
            for key in ready[:max(0, jobs - len(running))]:
                spec, task = ready_task(key)
                log(f"training {_label(key)}: {task['iters']} iterations"
                    + (f" from {_label(spec['base'])}" if spec["base"] is not None else ""))
                running[pool.submit(_train_task, task)] = key

        submit_ready()
        while running:
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                done[key] = future.result()
                result = done[key][1]
                last = result.validation[-1] if result.validation else {}
                log(f"trained {_label(key)}: loss {result.first_loss:.3f} -> {result.last_loss:.3f}, "
                    f"val Dice {last.get('val_dice', float('nan')):.3f}")
            submit_ready()
    return done


def _label(key):
    seed, name = key
    return f"{name} (seed {seed})"


def export_model(name, centring, weights, mean_file, settings, out_dir, mpp=None):
    """A self-contained model folder ``out_dir/models/<name>``: deploy prototxt, weights, model
    card (and mean file, named relative to the folder: the tools resolve it from there)."""
    folder = out_dir / "models" / name.replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    deployed_mean = None
    if centring == "meanfile":
        deployed_mean = folder / "mean.binaryproto"
        shutil.copyfile(mean_file, deployed_mean)
    side = settings.tile
    deploy = unet_deploy(centring=centring, depth=settings.depth, base_width=settings.base_width,
                         mean_file="mean.binaryproto" if deployed_mean else None, input_shape=(1, 3, side, side))
    (folder / "deploy.prototxt").write_text(net_to_text(deploy))
    shutil.copyfile(weights, folder / "weights.caffemodel")
    card = folder / "model_card.yaml"
    fields = dict(size_multiple=2 ** settings.depth)
    if mpp is not None:
        fields["mpp"] = float(mpp)
    write_model_card(card, fields, overwrite=True,
                     comment=f"{name}: RGB 0-255 in, softmax 'prob' out, nucleus = channel 1 (the defaults)")
    return folder / "deploy.prototxt", folder / "weights.caffemodel", deployed_mean, card
