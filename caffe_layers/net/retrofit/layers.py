"""The layers a retrofit inserts or edits: the AugmentationLayer, the centring and scaling that move
out of a data layer's ``transform_param``, and the blob bookkeeping around them.
"""
from __future__ import annotations

from caffe.proto import caffe_pb2

from ..prototxt import is_repeated_field
from .augment_params import literal
from .inputs import PHASES, describe

AUGMENTATION_MODULE = "caffe_layers.augmentation"
AUGMENTATION_LAYER = "AugmentationLayer"
MEAN_SUBTRACT_MODULE = "caffe_layers.mean_subtract"
MEAN_SUBTRACT_LAYER = "MeanSubtractLayer"


def unique_name(wanted, taken):
    name, counter = wanted, 2
    while name in taken:
        name, counter = f"{wanted}_{counter}", counter + 1
    taken.add(name)
    return name


def python_layer(name, module, layer_name, param_str, blobs):
    layer = caffe_pb2.LayerParameter(name=name, type="Python")
    layer.bottom.extend(blobs)
    layer.top.extend(blobs)
    layer.python_param.module = module
    layer.python_param.layer = layer_name
    layer.python_param.param_str = param_str
    return layer


def op_layers(ops, blob, taken, phase=None):
    """Layers computing ``ops`` in place on ``blob`` (in ``phase`` only, or in every phase if None)."""
    suffix = "" if phase is None else "_" + PHASES[phase].lower()
    layers = []
    for op in ops:
        kind = op[0]
        if kind == "mean_file":
            params = {"mean_file": op[1], **({"crop_centre": True} if op[2] else {})}
            layer = python_layer(unique_name(f"{blob}_mean{suffix}", taken), MEAN_SUBTRACT_MODULE,
                                  MEAN_SUBTRACT_LAYER, literal(params), [blob])
        elif kind == "mean_value" and len(op[1]) == 1:
            layer = caffe_pb2.LayerParameter(name=unique_name(f"{blob}_mean{suffix}", taken), type="Power")
            layer.power_param.shift = -op[1][0]
        elif kind == "mean_value":
            layer = caffe_pb2.LayerParameter(name=unique_name(f"{blob}_mean{suffix}", taken), type="Bias")
            layer.param.add(lr_mult=0, decay_mult=0)
            layer.bias_param.axis = 1
            layer.bias_param.num_axes = 1
            bias = layer.blobs.add()
            bias.shape.dim.append(len(op[1]))
            bias.data.extend(-value for value in op[1])
        elif kind == "mvn":
            layer = caffe_pb2.LayerParameter(name=unique_name(f"{blob}_centre{suffix}", taken), type="MVN")
            layer.mvn_param.normalize_variance = False
            layer.mvn_param.across_channels = False
        elif kind == "scale":
            layer = caffe_pb2.LayerParameter(name=unique_name(f"{blob}_scale{suffix}", taken), type="Power")
            layer.power_param.scale = op[1]
        else:  # pragma: no cover - internal
            raise AssertionError(op)
        if kind != "mean_file":
            layer.bottom.append(blob)
            layer.top.append(blob)
        if phase is not None:
            layer.include.add(phase=phase)
        layers.append(layer)
    return layers


def describe_ops(ops):
    parts = []
    for op in ops:
        if op[0] == "mean_file":
            parts.append(f"subtract mean file {op[1]!r}" + (" (its centre crop on a cropped input)" if op[2] else "")
                         + " (MeanSubtractLayer)")
        elif op[0] == "mean_value" and len(op[1]) == 1:
            parts.append(f"subtract {op[1][0]:g} (Power shift)")
        elif op[0] == "mean_value":
            parts.append("subtract per-channel mean " + ", ".join(f"{v:g}" for v in op[1]) + " (Bias, fixed blobs)")
        elif op[0] == "mvn":
            parts.append("subtract each patch's per-channel mean (MVN, normalize_variance: false)")
        elif op[0] == "scale":
            parts.append(f"multiply by {op[1]:g} (Power scale)")
    return "; then ".join(parts)


def take_transform(layer, lines, state):
    """Remove mean_file/mean_value/scale from a data layer's transform_param; return the ops."""
    if not layer.HasField("transform_param"):
        return []
    param = layer.transform_param
    if param.HasField("mean_file") and param.mean_value:
        raise ValueError(f"{describe(layer)}: transform_param has both mean_file and mean_value; Caffe refuses "
                         "that too")
    ops = []
    if param.HasField("mean_file"):
        # after a crop the layer gets a smaller input: it subtracts the mean's centre crop, as Caffe does in TEST
        cropped = bool(param.crop_size or (param.crop_h and param.crop_w))
        ops.append(("mean_file", param.mean_file, cropped))
    elif param.mean_value:
        ops.append(("mean_value", tuple(param.mean_value)))
    if param.HasField("scale") and param.scale != 1.0:
        ops.append(("scale", param.scale))
    removed = [name for name in ("mean_file", "mean_value", "scale") if
               (param.HasField(name) if name != "mean_value" else param.mean_value)]
    for name in removed:
        param.ClearField(name)
    kept = [f"{descriptor.name}: {str(value).lower() if isinstance(value, bool) else value}"
            for descriptor, value in param.ListFields()
            if descriptor.message_type is None and not is_repeated_field(descriptor)]
    if not param.ListFields():
        layer.ClearField("transform_param")
    if removed:
        lines.append(f"  {describe(layer, state)}: removed {', '.join(removed)} from transform_param"
                     + (f" (kept {', '.join(kept)})" if kept else ""))
    if "mean_file" in removed and param.mirror and not param.crop_size:
        # Caffe's DataTransformer subtracts mean[x] from the pixel it moves to W-1-x.
        lines.append(f"  note: {describe(layer, state)} mirrors after subtracting its mean file; after the "
                     "retrofit the mean is subtracted after mirroring, so a mirrored TRAIN sample is centred "
                     "on the left-right mirror of the mean it had (a difference of the mean image's asymmetry; "
                     "TEST is unchanged)")
    return ops


def check_flow(layers, state, phase):
    """The first (layer, blob) whose bottom is not produced by an earlier layer in ``phase``, or None."""
    available = set()
    for layer in layers:
        if not state.active(layer, phase):
            continue
        for blob in layer.bottom:
            if blob not in available:
                return layer.name, blob
        available.update(layer.top)
    return None


def rename_after(layers, start, old, new):
    """Consumers of blob ``old`` from ``start`` on read ``new`` instead (until ``old`` is produced anew)."""
    for layer in layers[start:]:
        bottoms_had = old in layer.bottom
        for i, blob in enumerate(layer.bottom):
            if blob == old:
                layer.bottom[i] = new
        redefined = False
        for i, blob in enumerate(layer.top):
            if blob == old:
                if bottoms_had:
                    layer.top[i] = new  # in place on the renamed blob
                else:
                    redefined = True
        if redefined:
            return
