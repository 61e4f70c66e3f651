"""The values a train_val net's TRAIN data layers really deliver: measured by running them once.

The AugmentationLayer's clip and colour shift assume raw intensities (0-255, or 0-1 with
``input_range=1``). A Python data layer or an HDF5 file may deliver data that is already
normalised (a mean subtracted, ``x / 255 - 0.5``): clipping that to 0-255 corrupts it without a
word. So the image top of such layers is measured on one TRAIN batch (in a forked process, see
:func:`~caffe_layers.net.checks.survives_caffe`) and the range is either adapted to or refused.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from ..checks import CaffeAborted, survives_caffe
from .inputs import PATCH_DATA_MODULE, TRANSFORMING_TYPES, NetState, describe, is_source

#: Slack (in the data's own units) when a measured range is compared with an expected one.
TOLERANCE = 1e-3
#: Least fraction of the stated range a batch of images must span for the statement to be believed.
MIN_SPAN = 0.1


def needs_measuring(layer):
    """Whether the prototxt cannot tell the range of ``layer``'s data.

    Caffe's Data/ImageData/WindowData deliver 0-255 bytes (their mean and scale are moved after
    the augmentation), Input/DummyData are filled by the caller, and the PatchDataLayer delivers
    0-255; any other Python layer, and HDF5 files, may deliver anything.
    """
    if layer.type in TRANSFORMING_TYPES + ("Input", "DummyData"):
        return False
    return not (layer.type == "Python" and layer.python_param.module == PATCH_DATA_MODULE)


def train_data_net(net):
    """The TRAIN-phase source layers of ``net`` alone, as a net of their own (phase TRAIN)."""
    state = NetState(net)
    out = caffe_pb2.NetParameter(name="data_range")
    out.state.phase = caffe_pb2.TRAIN
    for layer in net.layer:
        if is_source(layer) and state.active(layer, caffe_pb2.TRAIN):
            copy = out.layer.add()
            copy.CopyFrom(layer)
            copy.ClearField("include")
            copy.ClearField("exclude")
    return out


def _forward_once(path, top, folder):
    """(min, max) of ``top`` after one forward of the net at ``path``, or ('error', message)."""
    try:
        if folder not in sys.path:  # a Python data layer's module often sits beside the prototxt
            sys.path.insert(0, folder)
        caffe.set_mode_cpu()
        net = caffe.Net(str(path), caffe.TRAIN)
        net.forward()
        data = net.blobs[top].data
        return float(data.min()), float(data.max())
    except Exception as error:  # noqa: BLE001 - passed back as the reason the range is unknown
        return "error", f"{type(error).__name__}: {error}"


def measure_range(net, image_top, where, folder):
    """(low, high) of ``image_top`` over one TRAIN batch of ``net``'s data layers, or a str saying
    why they could not be run.

    Parameters
    ----------
    net : caffe_pb2.NetParameter
        The (rewritten) train_val net; only its TRAIN source layers are built.
    image_top : str
    where : str
        The net's file, for messages.
    folder : str
        Put on ``sys.path`` (in the forked child only) so a Python data layer beside the net imports.
    """
    fd, path = tempfile.mkstemp(suffix=".prototxt", prefix="data_range_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text_format.MessageToString(train_data_net(net)))
        try:
            result = survives_caffe(lambda: _forward_once(path, image_top, str(folder)), where,
                                    "run the TRAIN data layers")
        except CaffeAborted as error:  # a missing source, say: the range stays unknown, the caller says so
            return str(error)
    finally:
        Path(path).unlink(missing_ok=True)
    if result is None:
        return "the data layers did not finish"
    if result[0] == "error":
        return result[1]
    return result


def range_verdict(low, high, input_range, normalisation):
    """What the measured range [low, high] says: ('ok', None), ('one', None) for 0-1 data given as
    0-255, or ('refuse', why)."""
    if normalisation is not None:
        mean, scale = normalisation
        ends = [(0.0 - m) * scale for m in mean] + [(255.0 - m) * scale for m in mean]
        expected = (min(ends), max(ends))
        where = (f"[{expected[0]:.6g}, {expected[1]:.6g}], where 0-255 data lands after subtracting the given input "
                 "mean and multiplying by the input scale")
        if low < expected[0] - TOLERANCE or high > expected[1] + TOLERANCE:
            return "refuse", f"lies outside {where}"
        if high - low < MIN_SPAN * (expected[1] - expected[0]):
            # an image batch spans much of 0-255; a tenth of it means another mean or scale
            return "refuse", f"covers less than a tenth of {where} (another scale?)"
        return "ok", None
    if low < -TOLERANCE or high > 255 + TOLERANCE:
        return "refuse", ("is not raw 0-255 or 0-1 data: the data layer already normalises it (a mean subtracted, "
                          "a scale), and the AugmentationLayer would clip it to its 0-255 range")
    if high <= 1 + TOLERANCE and input_range != 1:
        return ("one", None) if input_range is None else ("refuse", "looks like 0-1 data, not 0-255 (input range 255)")
    if high > 1 + TOLERANCE and input_range == 1:
        return "refuse", "goes beyond 1, so it is not 0-1 data (input range 1)"
    return "ok", None


def describe_source(net, image_top):
    """The TRAIN layer producing ``image_top``, described."""
    state = NetState(net)
    for layer in net.layer:
        if is_source(layer) and state.active(layer, caffe_pb2.TRAIN) and image_top in layer.top:
            return describe(layer)
    return f"top {image_top!r}"
