"""What a train_val net feeds: its data layers, their image and label tops, and whether a label is a map.

Everything is decided from the prototxt (databases are never opened): tops are told apart by
their names, by their layer's name and source, and by which blobs a loss reads; a label top's
kind (a per-pixel map or a class label) is guessed from the layers that read it.
"""
from __future__ import annotations

import dataclasses
import math
import re

from caffe.proto import caffe_pb2

from ..prototxt import layer_in_phase

PATCH_DATA_MODULE = "caffe_layers.data"

#: What a label top may be: guessed, a per-pixel map (augmented with the image), a class label.
LABEL_KINDS = ("auto", "spatial", "scalar")

#: Data layer types whose ``transform_param`` Caffe applies (and whose images are BGR 0-255).
TRANSFORMING_TYPES = ("Data", "ImageData", "WindowData")
#: Source layers understood as data layers (plus any Python layer without bottoms).
DATA_TYPES = TRANSFORMING_TYPES + ("HDF5Data", "Input", "DummyData")
#: Source layers that cannot be retrofitted, with the reason.
_UNSUPPORTED_SOURCES = {
    "MemoryData": "its arrays are set from Python/C++ and it applies transform_param only to Datums",
    "AnnotatedData": "detection data with boxes (SSD); box-aware augmentation is not supported",
    "VideoData": "video frames are read by OpenCV with their own transform",
}

_LABEL_WORDS = {"label", "labels", "mask", "masks", "gt", "groundtruth", "target", "targets", "seg",
                "segmentation", "annotation", "annotations", "truth"}
_IMAGE_WORDS = {"data", "image", "images", "img", "imgs", "input", "rgb", "features", "feature", "pixels"}


PHASES = {caffe_pb2.TRAIN: "TRAIN", caffe_pb2.TEST: "TEST"}


class NetState:
    """The net state Caffe would use for each phase (level and stages of the net's ``state``)."""

    def __init__(self, net):
        self.level = net.state.level if net.HasField("state") else 0
        self.stages = tuple(net.state.stage) if net.HasField("state") else ()

    def active(self, layer, phase):
        return layer_in_phase(layer, phase, self.level, self.stages)


def tokens(text):
    return set(re.split(r"[^a-z0-9]+", str(text).lower())) - {""}


def _type_label(layer):
    if layer.type == "Python":
        return f"Python {layer.python_param.module}.{layer.python_param.layer}"
    return layer.type


def _phases_text(layer, state):
    phases = [name for phase, name in PHASES.items() if state.active(layer, phase)]
    return " and ".join(phases) if phases else "no phase"


def describe(layer, state=None):
    phases = "" if state is None else ", " + _phases_text(layer, state)
    return f"layer {layer.name!r} ({_type_label(layer)}{phases})"


def is_source(layer):
    return not layer.bottom and (layer.type in DATA_TYPES or layer.type == "Python"
                                 or layer.type in _UNSUPPORTED_SOURCES)


def is_augmentation(layer):
    return layer.type == "Python" and "augment" in layer.python_param.layer.lower()


def _data_source(layer):
    for field in ("data_param", "image_data_param", "window_data_param", "hdf5_data_param"):
        if layer.HasField(field) and getattr(layer, field).HasField("source"):
            return getattr(layer, field).source
    return ""


@dataclasses.dataclass
class Inputs:
    """The image and label tops of one phase and the layers producing them."""

    image: str
    image_layer: int
    label: str | None
    label_layer: int | None
    others: list  # (top, layer index) left alone


def _is_loss(layer):
    return layer.type.endswith("Loss") or layer.type == "Accuracy"


def blobs_read_by_losses(layers, state, phase):
    """Blobs that a loss (or Accuracy) layer of ``phase`` reads: labels, or predictions."""
    return {blob for layer in layers if state.active(layer, phase) and _is_loss(layer) for blob in layer.bottom}


def _top_role(top, layer, loss_fed):
    """'label', 'image' or None (unknown) for a data layer's top: from names, else from use."""
    words = tokens(top)
    if words & _LABEL_WORDS:
        return "label"
    if words & _IMAGE_WORDS:
        return "image"
    if len(layer.top) == 1:  # one top per layer (DIGITS segmentation): look at the layer and its source
        context = tokens(layer.name) | tokens(_data_source(layer))
        if context & _LABEL_WORDS:
            return "label"
        if context & _IMAGE_WORDS:
            return "image"
    if top in loss_fed:  # a data top read by a loss is a label (e.g. SIFT Flow's "sem" and "geo")
        return "label"
    return None


def find_inputs(layers, state, phase, where, image_top=None, label_top=None):
    """The image/label tops of the data layers active in ``phase`` (None if there are none)."""
    produced = {}
    for index, layer in enumerate(layers):
        if state.active(layer, phase) and is_source(layer):
            for top in layer.top:
                produced.setdefault(top, index)
    if not produced:
        return None
    phase_name = PHASES[phase]
    loss_fed = blobs_read_by_losses(layers, state, phase)
    roles = {top: _top_role(top, layers[index], loss_fed) for top, index in produced.items()}

    def where_top(top):
        return f"top {top!r} of {describe(layers[produced[top]], state)}"

    if image_top is not None:
        if image_top not in produced:
            raise ValueError(f"{where}: no {phase_name}-phase data layer has a top {image_top!r} (the image top "
                             f"asked for); data tops: {', '.join(map(repr, produced))}")
        image = image_top
    else:
        candidates = [top for top in produced if roles[top] != "label"]
        if len(candidates) > 1:
            named = [top for top in candidates if roles[top] == "image"]
            if len(named) == 1:
                candidates = named
            elif "data" in candidates:
                candidates = ["data"]
        if not candidates:
            raise ValueError(f"{where}: the {phase_name}-phase data layers have no image top: every top looks like "
                             f"a label ({', '.join(where_top(t) for t in produced)}); name the image top")
        if len(candidates) > 1:
            raise ValueError(f"{where}: two candidate image tops in the {phase_name} phase: "
                             + " and ".join(where_top(t) for t in candidates)
                             + "; name the one to augment (image_top / --image-top)")
        image = candidates[0]
    if label_top is not None:
        if label_top == "":
            label = None
        elif label_top not in produced:
            raise ValueError(f"{where}: no {phase_name}-phase data layer has a top {label_top!r} (the label top "
                             f"asked for); data tops: {', '.join(map(repr, produced))}")
        else:
            label = label_top
    else:
        labels = [top for top in produced if roles[top] == "label" and top != image]
        if len(labels) > 1 and "label" in labels:
            labels = ["label"]
        if len(labels) > 1:
            raise ValueError(f"{where}: ambiguous label tops in the {phase_name} phase: "
                             + " and ".join(where_top(t) for t in labels)
                             + "; name the one that goes with the image (label_top / --label-top)")
        label = labels[0] if labels else None
    if label == image:
        raise ValueError(f"{where}: the image top and the label top are both {image!r}")
    unsupported = layers[produced[image]].type
    if unsupported in _UNSUPPORTED_SOURCES:
        raise ValueError(f"{where}: image {where_top(image)}: {unsupported} layers are not supported "
                         f"({_UNSUPPORTED_SOURCES[unsupported]})")
    others = [(top, index) for top, index in produced.items() if top not in (image, label)]
    return Inputs(image, produced[image], label, produced[label] if label else None, others)


def _shapes_of(layer):
    """Declared top shapes of an Input/DummyData layer: {top: tuple} (missing when unknown)."""
    shapes = []
    if layer.type == "Input":
        shapes = [tuple(shape.dim) for shape in layer.input_param.shape]
    elif layer.type == "DummyData":
        param = layer.dummy_data_param
        shapes = [tuple(shape.dim) for shape in param.shape]
        if not shapes and param.num:
            shapes = [(n, c, h, w) for n, c, h, w in zip(param.num, param.channels, param.height, param.width)]
    if len(shapes) == 1:
        return {top: shapes[0] for top in layer.top}
    return dict(zip(layer.top, shapes)) if len(shapes) == len(layer.top) else {}


_ELEMENTWISE = {"ReLU", "Sigmoid", "TanH", "Softmax", "Dropout", "BatchNorm", "Scale", "Bias", "Power", "PReLU",
                "ELU", "AbsVal", "BNLL", "Exp", "Log", "Threshold", "Split", "Eltwise", "MVN", "LRN", "Concat",
                "ReLU6", "HardSigmoid", "BN"}
_SPATIAL_OUTPUT = {"Convolution", "Deconvolution", "Crop", "Upsample", "Interp", "Pad", "BilinearInterpolate",
                   "MaxUnPool", "PixelShuffle"}
_FLAT_OUTPUT = {"InnerProduct", "Flatten", "ArgMax"}


def _guess_label_kind(layers, state, inputs):
    """('spatial'|'scalar', reason) from what the TRAIN-phase loss compares the label with, or None."""
    active = [layer for layer in layers if state.active(layer, caffe_pb2.TRAIN)]
    verdicts = set()
    reasons = []
    for position, layer in enumerate(active):
        if inputs.label not in layer.bottom or len(layer.bottom) != 2 or layer.top == layer.bottom:
            continue
        prediction = layer.bottom[0] if layer.bottom[1] == inputs.label else layer.bottom[1]
        blob, end = prediction, position
        verdict = None
        for _ in range(200):
            producer = next((i for i in range(end - 1, -1, -1) if blob in active[i].top), None)
            if producer is None:
                break
            source = active[producer]
            if source.type in _FLAT_OUTPUT or (source.type == "Pooling" and source.pooling_param.global_pooling):
                verdict = ("scalar", f"{describe(layer)} compares it with {prediction!r}, an output of "
                                     f"{describe(source)}")
                break
            if source.type in _SPATIAL_OUTPUT or source.type == "Pooling":
                verdict = ("spatial", f"{describe(layer)} compares it with {prediction!r}, a map from "
                                      f"{describe(source)}")
                break
            if source.type not in _ELEMENTWISE or not source.bottom:
                break
            blob, end = source.bottom[0], producer
        if verdict is None:
            return None
        verdicts.add(verdict[0])
        reasons.append(verdict[1])
    if len(verdicts) != 1:
        return None
    return verdicts.pop(), reasons[0]


def label_kind(layers, state, inputs, old_augmentation, requested, where):
    """('spatial'|'scalar', why) for the TRAIN label; refuse when it cannot be told."""
    label_layer = layers[inputs.label_layer]
    what = f"label top {inputs.label!r} of {describe(label_layer)}"
    known = None
    if old_augmentation is not None and len(old_augmentation.bottom) == 2 and \
            old_augmentation.bottom[1] == inputs.label:
        known = ("spatial", f"the existing augmentation layer {old_augmentation.name!r} transforms it with the image")
    elif label_layer.type in ("Data", "ImageData", "WindowData"):
        if len(label_layer.top) == 1 and inputs.label_layer != inputs.image_layer:
            known = ("spatial", "a Data layer of its own: the Datum's image is the label map (DIGITS segmentation)")
        else:
            known = ("scalar", f"the Datum's class label of a {label_layer.type} layer")
    elif label_layer.type in ("Input", "DummyData"):
        shapes = {}
        for index in {inputs.image_layer, inputs.label_layer}:
            shapes.update(_shapes_of(layers[index]))
        image_shape, label_shape = shapes.get(inputs.image), shapes.get(inputs.label)
        if image_shape and label_shape:
            size = "×".join(map(str, label_shape))
            if len(label_shape) >= 3 and len(image_shape) == 4 and label_shape[-2:] == image_shape[-2:]:
                known = ("spatial", f"declared {size}, the image's height and width")
            elif math.prod(label_shape[1:]) == 1:
                known = ("scalar", f"declared {size}, one value per sample")
            else:
                known = ("other", f"declared {size}, not the image's {'×'.join(map(str, image_shape))}")
    elif label_layer.type == "Python" and label_layer.python_param.module == PATCH_DATA_MODULE:
        known = ("spatial", "PatchDataLayer's N×1×P×P mask")
    if known is not None:
        if requested not in ("auto", known[0]) and known[0] != "other":
            raise ValueError(f"{where}: {what} is a {'per-pixel map' if known[0] == 'spatial' else 'class label'} "
                             f"({known[1]}); label={requested!r} contradicts that")
        if known[0] == "other" and requested == "spatial":
            raise ValueError(f"{where}: {what} is {known[1]}: the AugmentationLayer needs a label of the image's size")
        return known
    if requested != "auto":
        return requested, f"as asked (label={requested!r})"
    guess = _guess_label_kind(layers, state, inputs)
    if guess is None:
        raise ValueError(f"{where}: cannot tell whether {what} is a per-pixel map (segmentation: it must be augmented "
                         "with the image) or a class label (left alone); say which (label='spatial' or 'scalar', "
                         "--label spatial|scalar)")
    return guess[0], "guessed: " + guess[1]
