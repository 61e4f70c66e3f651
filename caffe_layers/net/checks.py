"""Check what Caffe will read before Caffe reads it.

Caffe reports most mistakes in a net, a solver or a weights file with a failed ``CHECK`` or a
``LOG(FATAL)``, which aborts the whole Python process (SIGABRT, sometimes SIGFPE) with no
exception to catch. Everything here raises a ``ValueError`` (``FileNotFoundError`` for a
missing file) whose message names the file, the layer or field and the value, so the tools can
refuse bad input before Caffe sees it. The checks cover the mistakes users make, not every
``CHECK`` in Caffe.
"""
from __future__ import annotations

import importlib
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from .prototxt import layers_in_phase
from .proto import caffe, caffe_pb2, require_pycaffe

__all__ = [
    "CaffeAborted",
    "available_memory",
    "build_test_net",
    "check_deploy_files",
    "check_net_param",
    "check_solver_param",
    "check_solverstate_fits",
    "check_weights_fit",
    "check_weights_fit_prototxt",
    "read_weights",
    "survives_caffe",
]

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
# lr_policy -> the SolverParameter fields Caffe's Solver::GetLearningRate reads for it.
LR_POLICIES = {"fixed": (), "step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
               "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize")}
# Legacy solver_type enum -> type string (Caffe upgrades it the same way).
_LEGACY_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def _layer_type(layer):
    if isinstance(layer, caffe_pb2.V1LayerParameter):
        return None  # an enum: Caffe upgrades it; the parser already refused unknown names
    return layer.type


def _check_python_layer(layer, where):
    module_name, class_name = layer.python_param.module, layer.python_param.layer
    if not module_name or not class_name:
        raise ValueError(f"{where}: Python layer {layer.name!r} needs python_param.module and .layer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{where}: Python layer {layer.name!r}: cannot import module {module_name!r} ({error}); "
                         "is its folder on PYTHONPATH?") from None
    if not isinstance(getattr(module, class_name, None), type):
        raise ValueError(f"{where}: Python layer {layer.name!r}: module {module_name!r} has no layer class "
                         f"{class_name!r}")


def _check_data_source(layer, where):
    """Files a data layer opens at setup (a missing one aborts Caffe)."""
    sources = []
    if layer.type == "Data":
        source, backend = layer.data_param.source, layer.data_param.backend
        marker = "data.mdb" if backend == caffe_pb2.DataParameter.LMDB else "CURRENT"
        if not os.path.isdir(source) or not os.path.exists(os.path.join(source, marker)):
            kind = "LMDB" if backend == caffe_pb2.DataParameter.LMDB else "LevelDB"
            other, other_marker = ("LevelDB", "CURRENT") if kind == "LMDB" else ("LMDB", "data.mdb")
            if os.path.exists(os.path.join(source, other_marker)):  # V0/V1 nets default to LevelDB
                raise ValueError(f"{where}: layer {layer.name!r} reads {source!r} as a {kind} database, but it is "
                                 f"an {other} (it has {other_marker}); set data_param {{ backend: "
                                 f"{other.upper()} }} in the net (caffe-stain-retrofit does it)")
            raise FileNotFoundError(f"{where}: layer {layer.name!r} reads the {kind} database {source!r}, "
                                    f"which does not exist (no {marker}; relative to {os.getcwd()!r})")
        if layer.data_param.batch_size < 1:
            raise ValueError(f"{where}: layer {layer.name!r}: data_param.batch_size must be >= 1")
    elif layer.type == "ImageData":
        sources.append(layer.image_data_param.source)
    elif layer.type == "HDF5Data":
        sources.append(layer.hdf5_data_param.source)
    for source in sources:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{where}: layer {layer.name!r} reads the list file {source!r}, which does "
                                    f"not exist (relative to {os.getcwd()!r})")
    if layer.HasField("transform_param") and layer.transform_param.mean_file:
        if not os.path.isfile(layer.transform_param.mean_file):
            raise FileNotFoundError(f"{where}: layer {layer.name!r}: mean_file "
                                    f"{layer.transform_param.mean_file!r} does not exist")


def check_net_param(param, where, phase=caffe_pb2.TEST):
    """Refuse a net Caffe would abort on: unknown layer types, unknown bottoms, bad Python layers.

    Parameters
    ----------
    param : caffe_pb2.NetParameter
    where : str
        The net's file name, for messages.
    phase : caffe_pb2.TRAIN or caffe_pb2.TEST
        The phase the net will be built in.

    Without pycaffe the layer types are not checked against Caffe's registry (the engine that
    reads the net, OpenCV, names a type it does not know itself).

    Raises
    ------
    ValueError, FileNotFoundError
    """
    registered = None if caffe is None else set(caffe.layer_type_list())
    blobs = set(param.input)
    for shape in param.input_shape:
        if any(dim < 1 for dim in shape.dim):
            raise ValueError(f"{where}: input shape {list(shape.dim)} has a dimension below 1")
    layers = layers_in_phase(param, phase)
    if not layers and not param.input:
        raise ValueError(f"{where}: the net has no layers in the {'TRAIN' if phase == caffe_pb2.TRAIN else 'TEST'} phase")
    for layer in layers:
        kind = _layer_type(layer)
        if kind is not None and registered is not None and kind not in registered:
            raise ValueError(f"{where}: layer {layer.name!r} has unknown type {kind!r} (this Caffe knows "
                             f"{len(registered)} types, e.g. Convolution, Pooling, InnerProduct, Python)")
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise ValueError(f"{where}: layer {layer.name!r} reads bottom {bottom!r}, which no earlier layer "
                                 "produces in this phase")
        if kind == "Python":
            _check_python_layer(layer, where)
        if kind == "Input":
            for shape in layer.input_param.shape:
                if any(dim < 1 for dim in shape.dim):
                    raise ValueError(f"{where}: Input layer {layer.name!r} has shape {list(shape.dim)} with a "
                                     "dimension below 1")
        if kind in ("Data", "ImageData", "HDF5Data"):
            _check_data_source(layer, where)
        if kind in ("Convolution", "Deconvolution") and layer.convolution_param.num_output < 1:
            raise ValueError(f"{where}: layer {layer.name!r}: convolution_param.num_output must be >= 1")
        if kind == "InnerProduct" and layer.inner_product_param.num_output < 1:
            raise ValueError(f"{where}: layer {layer.name!r}: inner_product_param.num_output must be >= 1")
        blobs.update(layer.top)


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_solver_param(param, where):
    """Refuse a solver Caffe would abort on (type, lr_policy and its fields, mode, counts).

    Parameters
    ----------
    param : caffe_pb2.SolverParameter
    where : str
        The solver's file name, for messages.
    """
    solver_type = param.type if param.HasField("type") else _LEGACY_SOLVER_TYPES.get(param.solver_type, "SGD")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{where}: unknown solver type {solver_type!r}; expected one of {', '.join(SOLVER_TYPES)}")
    if not param.lr_policy:
        # Caffe has no default: an unset policy aborts at the first iteration.
        raise ValueError(f'{where}: no lr_policy; set one, e.g. lr_policy: "fixed"')
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        raise ValueError(f"{where}: unknown lr_policy {policy!r}; expected one of {', '.join(LR_POLICIES)}")
    for field in LR_POLICIES[policy]:
        if field == "stepvalue":
            if not param.stepvalue:
                raise ValueError(f"{where}: lr_policy \"multistep\" needs stepvalue entries")
        elif not param.HasField(field):
            raise ValueError(f"{where}: lr_policy {policy!r} needs {field}")
    if policy in ("step", "sigmoid") and param.stepsize < 1:
        raise ValueError(f"{where}: stepsize must be >= 1 for lr_policy {policy!r}, got {param.stepsize}")
    # Caffe's default is GPU: only an explicit request is refused (the project always runs on the CPU).
    if param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        raise ValueError(f"{where}: solver_mode GPU, but this Caffe is built CPU-only; use solver_mode: CPU")
    for field in ("base_lr", "momentum", "weight_decay", "gamma", "power", "delta", "momentum2", "rms_decay"):
        if param.HasField(field) and not _finite(getattr(param, field)):
            raise ValueError(f"{where}: {field} must be a finite number, got {getattr(param, field)}")
    if param.HasField("base_lr") and param.base_lr < 0:
        raise ValueError(f"{where}: base_lr must be >= 0, got {param.base_lr}")
    if param.max_iter < 0:
        raise ValueError(f"{where}: max_iter must be >= 0, got {param.max_iter}")
    for field in ("display", "snapshot", "test_interval"):
        if getattr(param, field) < 0:
            raise ValueError(f"{where}: {field} must be >= 0, got {getattr(param, field)}")
    if param.iter_size < 1 or param.average_loss < 1:
        raise ValueError(f"{where}: iter_size and average_loss must be >= 1")
    if any(n < 0 for n in param.test_iter):
        raise ValueError(f"{where}: test_iter must be >= 0")
    return solver_type


def check_deploy_files(deploy_prototxt, weights):
    """Both files of a deploy net exist and the weights are not empty; returns them as Paths."""
    deploy_prototxt, weights = Path(deploy_prototxt), Path(weights)
    for what, path in (("deploy prototxt", deploy_prototxt), ("weights", weights)):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    if weights.stat().st_size == 0:
        raise ValueError(f"weights file is empty: {weights}")
    return deploy_prototxt, weights


def read_weights(path):
    """Parse a binary ``.caffemodel`` into a ``NetParameter`` (FileNotFoundError / ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".h5":
        raise ValueError(f"weights file {path}: only binary .caffemodel files are supported, not HDF5")
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeWarning) as error:
        raise ValueError(f"weights file {path} is not a binary .caffemodel (NetParameter): {error}") from None
    if not any(layer.blobs for layer in list(param.layer) + list(param.layers)):
        raise ValueError(f"weights file {path} holds no learned layer (is it a .caffemodel?)")
    return param


def _blob_proto_shape(blob):
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def _shapes_equal(target_shape, proto_shape, legacy):
    """Caffe's ``Blob::ShapeEquals``; a None in ``target_shape`` matches any size."""
    if legacy:
        # A legacy 4-D proto matches the target padded with leading 1s.
        if len(target_shape) > 4:
            return False
        target_shape = (1,) * (4 - len(target_shape)) + tuple(target_shape)
    return len(target_shape) == len(proto_shape) and all(
        want is None or want == got for want, got in zip(target_shape, proto_shape))


def _blob_values(blob):
    return np.asarray(blob.data if len(blob.data) else blob.double_data)


def check_weights_fit(net, weights_path):
    """Check that ``net.copy_from(weights_path)`` will not abort Caffe nor load nothing.

    Caffe copies the layers of the file whose names are in the net and aborts the process if
    such a layer's blobs differ in number or shape. This does the same matching in Python,
    and also refuses a file that shares no learnable layer with the net (Caffe would silently
    keep the random initial weights) or holds non-finite values.

    Parameters
    ----------
    net : caffe.Net
    weights_path : str or Path
        Binary ``.caffemodel``.

    Returns
    -------
    list of str
        Names of the layers that will be copied.
    """
    targets = {name: [tuple(blob.data.shape) for blob in blobs] for name, blobs in net.params.items()}
    return _check_blobs_fit(read_weights(weights_path), targets, weights_path)


#: Layer types without learned blobs (a weights file that gives them blobs makes Caffe abort).
PARAMETER_FREE_TYPES = ("Input", "ReLU", "Sigmoid", "TanH", "Pooling", "Softmax", "Concat", "Crop", "Dropout", "MVN",
                        "Power", "Eltwise", "Split", "Flatten", "Reshape", "LRN", "Silence", "ArgMax")


def _learnable_shapes(layer):
    """The blob shapes Caffe will give a deploy layer, as far as its own parameters say:
    None for an unknown dimension (one set by the layer's input), or None for the whole list
    (a layer type whose blobs are not worked out here)."""
    if layer.type in PARAMETER_FREE_TYPES:
        return []
    if layer.type in ("Convolution", "Deconvolution"):
        conv = layer.convolution_param
        kernel = list(conv.kernel_size) or [conv.kernel_h, conv.kernel_w]
        kernel = kernel * 2 if len(kernel) == 1 else kernel
        group = conv.group or 1
        outputs = (conv.num_output, None) if layer.type == "Convolution" else (None, conv.num_output // group)
        return [outputs + tuple(kernel)] + ([(conv.num_output,)] if conv.bias_term else [])
    if layer.type == "InnerProduct":
        product = layer.inner_product_param
        weights = (None, product.num_output) if product.transpose else (product.num_output, None)
        return [weights] + ([(product.num_output,)] if product.bias_term else [])
    return None


def check_weights_fit_prototxt(param, weights_path, phase=caffe_pb2.TEST):
    """:func:`check_weights_fit` without pycaffe: the net's blob shapes as its prototxt gives them.

    The number of blobs and the shapes of ``Convolution``, ``Deconvolution`` and
    ``InnerProduct`` layers are checked (the input-channel dimension, which only shape
    inference through the net knows, is left out); other learnable layers are matched by name;
    values must be finite.

    Parameters
    ----------
    param : caffe_pb2.NetParameter
        The deploy net.
    weights_path : str or Path
        Binary ``.caffemodel``.

    Returns
    -------
    list of str
        Names of the layers that will be copied.
    """
    targets = {layer.name: _learnable_shapes(layer) for layer in layers_in_phase(param, phase)}
    return _check_blobs_fit(read_weights(weights_path), targets, weights_path)


def _check_blobs_fit(source, targets, weights_path):
    """Match the layers of a parsed ``.caffemodel`` to ``targets`` (layer name -> blob shapes,
    None for a shape not known), as ``Net::CopyTrainedLayersFrom`` does; names of the layers copied."""
    copied, problems = [], []
    for layer in list(source.layer) + list(source.layers):  # .layers: V1-format models
        if not layer.blobs or layer.name not in targets:
            continue  # Caffe ignores layers the net does not have
        target_shapes = targets[layer.name]
        if target_shapes is None:
            target_shapes = [None] * len(layer.blobs)
        if len(layer.blobs) != len(target_shapes):
            problems.append(f"layer {layer.name!r} has {len(layer.blobs)} blobs in the file but "
                            f"{len(target_shapes)} in the net")
            continue
        for index, (blob, target_shape) in enumerate(zip(layer.blobs, target_shapes)):
            legacy = any(blob.HasField(field) for field in ("num", "channels", "height", "width"))
            if target_shape is not None and not _shapes_equal(target_shape, _blob_proto_shape(blob), legacy):
                shown = "(" + ", ".join("?" if dim is None else str(dim) for dim in target_shape) \
                    + ("," if len(target_shape) == 1 else "") + ")"
                problems.append(f"layer {layer.name!r} blob {index}: file has shape "
                                f"{_blob_proto_shape(blob)}, net has {shown}")
            elif not np.isfinite(_blob_values(blob)).all():
                problems.append(f"layer {layer.name!r} blob {index} holds NaN or infinite values")
        copied.append(layer.name)
    if problems:
        raise ValueError(f"weights file {weights_path} does not fit the net: " + "; ".join(problems))
    if not copied:
        learnable = [name for name, shapes in targets.items() if shapes != []]
        raise ValueError(f"weights file {weights_path} shares no learnable layer with the net "
                         f"(net layers: {', '.join(learnable) or 'none'}); nothing would be loaded")
    return copied


# Solvers whose history holds two blobs per parameter (Adam: m and v; AdaDelta: two running means).
_TWO_HISTORY_SOLVERS = ("Adam", "AdaDelta")


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


class CaffeAborted(ValueError):
    """Caffe aborted (a failed ``CHECK``, ``LOG(FATAL)``, a fatal signal) on what a user gave it."""


_GLOG_FATAL = re.compile(r"^F\d+ [\d:.]+\s+\d+ (\S+)\] (.*)$")


def _fatal_message(text, number):
    """Caffe's own reason from a child's captured output (glog's ``F...`` line), else the signal."""
    for line in text.splitlines():
        match = _GLOG_FATAL.match(line.strip())
        if match:
            return f"{match.group(2).strip()} ({match.group(1)})"
    for line in text.splitlines():
        if "Check failed" in line or "Error" in line:
            return line.strip()
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"the process was killed by {name}"


#: Seconds :func:`survives_caffe` waits for its child before giving up on the trial (and returning None).
SURVIVAL_TIMEOUT = 600.0


def _wait(pid, timeout):
    """``os.waitpid`` status of child ``pid``, or None if it has not ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def survives_caffe(action, where, what="build the net"):
    """Run ``action()`` in a forked copy of this process first; return its (picklable) result.

    A failed ``CHECK`` or ``LOG(FATAL)`` in Caffe aborts the whole process, and no list of
    Python-side checks can cover every one of them. So whatever may abort Caffe -- building a
    net or a solver from a user's prototxt, reshaping a net to a new input size -- is tried in
    a child first: if Caffe kills the child, this raises :class:`CaffeAborted` (a ValueError)
    with Caffe's own message and ``where``, and the caller's process never reaches Caffe's
    abort. The child's output is captured (not shown); a Python exception in the child is not
    reported here (the caller then meets it itself, with its usual message), and None is
    returned, as it is when the child has not ended after :data:`SURVIVAL_TIMEOUT` seconds
    (it is killed: a child of a multi-threaded process can wait forever on a lock).

    Parameters
    ----------
    action : callable
        What Caffe may abort on; its return value is passed back (None if it cannot be pickled).
    where : str
        The file the message names first.
    what : str
        What was tried, for the message (``"build the net"``).

    Raises
    ------
    CaffeAborted
        If the child died of a signal (SIGABRT from a failed CHECK, SIGFPE, SIGSEGV, ...).
    KeyboardInterrupt
        Ctrl-C while the child runs (the child is killed first).
    """
    if not hasattr(os, "fork"):  # not on POSIX: run it in this process
        return action()
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as result:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a multi-threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                import faulthandler
                faulthandler.disable()  # Caffe's abort is expected here: no traceback dump
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                value = action()
                try:
                    result.write(pickle.dumps(value))
                except Exception:  # noqa: BLE001 - an unpicklable result is only not passed back
                    pass
                result.flush()
                code = 0
            except BaseException:  # noqa: BLE001 - the caller sees a Python error itself
                code = 1
            finally:
                os._exit(code)
        try:
            status = _wait(pid, SURVIVAL_TIMEOUT)
            if status is None:  # the child hangs (a lock another thread held at the fork): not Caffe's abort
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            raise
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            output.seek(0)
            text = output.read().decode("utf-8", errors="replace")
            if number == signal.SIGKILL and "Check failed" not in text:
                raise CaffeAborted(f"{where}: Caffe could not {what}: the process was killed (out of memory?)")
            raise CaffeAborted(f"{where}: Caffe cannot {what}: {_fatal_message(text, number)}")
        if os.WEXITSTATUS(status) != 0:
            return None
        result.seek(0)
        data = result.read()
        try:
            return pickle.loads(data) if data else None
        except Exception:  # noqa: BLE001
            return None


def build_test_net(prototxt, where):
    """``caffe.Net(prototxt, caffe.TEST)``, first built in a child (:func:`survives_caffe`): a layer
    whose parameters Caffe CHECKs at setup (a missing kernel_size, a kernel larger than its
    input, ...) is a :class:`CaffeAborted` naming ``where``, not an abort of this process."""
    require_pycaffe(f"building the net {where}")
    survives_caffe(lambda: caffe.Net(str(prototxt), caffe.TEST) and None, str(where))
    return caffe.Net(str(prototxt), caffe.TEST)


def available_memory():
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
