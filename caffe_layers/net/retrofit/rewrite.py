"""The rewrite itself: :func:`retrofit` as a sequence of named steps over a train_val net's layers."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping

from caffe.proto import caffe_pb2

from ...param_str import parse_param_str
from ...patches import PATCH_DATA_SCHEMA
from ...transforms.schema import AUGMENT_SCHEMA
from ..prototxt import upgrade_net
from .augment_params import GEOMETRY_KEYS, INTENSITY_KEYS, known_keys, literal
from .inputs import (LABEL_KINDS, PATCH_DATA_MODULE, PHASES, TRANSFORMING_TYPES, NetState, describe, find_inputs,
                     blobs_read_by_losses, is_augmentation, is_source, label_kind, tokens)
from .layers import (AUGMENTATION_LAYER, AUGMENTATION_MODULE, MEAN_SUBTRACT_MODULE, check_flow, describe_ops,
                     op_layers, python_layer, rename_after, take_transform, unique_name)

CENTRINGS = ("keep", "patchmean")
INPUT_RANGES = (255, 1)
#: Said of data whose range the prototxt cannot tell (retrofit_files drops it once the range is measured).
ASSUMED_RANGE = "is assumed to be in 0-255 (clip_max 255)"

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


@dataclasses.dataclass
class RetrofitResult:
    """What :func:`retrofit` made.

    Attributes
    ----------
    net : caffe_pb2.NetParameter
        The rewritten train_val net (V2).
    deploy : caffe_pb2.NetParameter or None
        The rewritten deploy net, when one was given.
    lines : list of str
        What changed, layer by layer (and notes), for printing.
    params : dict
        The augmentation parameters, validated (every key of AUGMENT_SCHEMA).
    param_str : str
        The AugmentationLayer's param_str as written.
    image_top : str
        The TRAIN image top the AugmentationLayer works on.
    image_layer : caffe_pb2.LayerParameter
        The TRAIN data layer producing it, as rewritten.
    """

    net: caffe_pb2.NetParameter
    deploy: caffe_pb2.NetParameter | None
    lines: list
    params: dict
    param_str: str
    image_top: str = ""
    image_layer: caffe_pb2.LayerParameter | None = None


@dataclasses.dataclass
class _Job:
    """What the steps of :func:`retrofit` share: the upgraded net's layers (edited in place, in
    order), the net state each phase is built with, and the report, line by line."""

    where: str
    state: NetState
    layers: list
    lines: list


def retrofit(net, param_str=None, *, centring="keep", input_range=255, label="auto", image_top=None,
             label_top=None, deploy=None, drop_unknown_keys=False, input_normalisation=None, where="net",
             deploy_where="deploy net"):
    """Rewrite a train_val net so that it trains with the AugmentationLayer.

    Parameters
    ----------
    net : caffe_pb2.NetParameter
        The train_val net, any format (upgraded with :func:`~caffe_layers.net.prototxt.upgrade_net`). Not modified.
    param_str : str, dict or None
        The augmentation parameters (JSON, YAML, a Python-literal dict or a dict). Keys given
        here override those of an existing augmentation layer; None takes that layer's alone.
    centring : {"keep", "patchmean"}
        ``keep``: the data layer's mean (file or values) is subtracted after the augmentation;
        ``patchmean``: each patch is centred on its own per-channel mean (``MVN``) instead,
        in the train net and the deploy net.
    input_range : {255, 1}
        White of the raw data blob. With 1, the param_str's ``color_b_*``, ``clip_*`` and
        ``max_value`` (given in 0-255 grey levels) are divided by 255.
    label : {"auto", "spatial", "scalar"}
        Whether the label is a per-pixel map (augmented with the image) or a class label; auto
        decides from the prototxt and refuses when it cannot.
    image_top, label_top : str, optional
        The data tops to use when their names do not tell (``label_top=""``: no label).
    deploy : caffe_pb2.NetParameter, optional
        The deploy net; with ``centring="patchmean"`` it gets the same centring after its input.
    drop_unknown_keys : bool
        Drop (and report) keys of a carried-over param_str that the AugmentationLayer does not
        know, instead of refusing.
    input_normalisation : (sequence of float, float), optional
        ``(mean, scale)`` when the data layer already delivers ``(raw - mean) * scale`` (raw in
        0-255; one mean value or one per channel): the AugmentationLayer is wrapped in layers
        that undo this and do it again, so it sees raw intensities and its clip corrupts nothing.
    where, deploy_where : str
        Names of the nets in messages.

    Returns
    -------
    RetrofitResult

    Raises
    ------
    ValueError
        (ParamError for parameters) for anything the rewrite cannot understand; nothing is
        returned half-done.
    """
    _check_options(centring, input_range, label)
    normalisation = _checked_normalisation(input_normalisation, input_range)
    net, upgrade_notes = upgrade_net(net, where)
    job = _Job(where, NetState(net), list(net.layer), [f"{where}: {note}" for note in upgrade_notes])
    broken_before = {phase: check_flow(job.layers, job.state, phase) for phase in PHASES}
    old = _remove_augmentation_layers(job)
    image_top, label_top = _tops_read_by(job, old, image_top, label_top)
    inputs = _train_inputs(job, image_top, label_top)
    kind = _report_inputs(job, inputs, old, label)
    raw, given, bases = _gather_params(job, inputs, old, param_str, drop_unknown_keys)
    image_layer = job.layers[inputs.image_layer]
    final_str, params = _written_param_str(job, image_layer, raw, given, bases, input_range)
    _refuse_misaligned_labels(job, inputs, kind, params)
    _note_data_layers(job)
    phase_inputs, ops_by_phase = _move_transforms(job, inputs, centring)
    _note_separate_label_layer(job, inputs, image_layer, kind)
    augment, chains = _new_layers(job, inputs, kind, final_str, params, ops_by_phase, phase_inputs)
    wrapped = _unnormalising_wrap(job, augment, inputs.image, normalisation, params)
    out, inserted, train_end = _insert_layers(job, net, inputs, phase_inputs, wrapped, chains)
    _report_insertions(job, wrapped, augment, chains, train_end)
    _check_rewritten_flow(job, out, inserted, augment.top, broken_before)
    _final_notes(job, broken_before, image_layer, inputs)
    deployed = None
    if deploy is not None:
        test_ops = ops_by_phase.get(TEST, ops_by_phase[TRAIN])[1]
        deployed = _retrofit_deploy(deploy, inputs.image, centring, test_ops, job.lines, deploy_where)
    return RetrofitResult(net=out, deploy=deployed, lines=job.lines, params=params, param_str=final_str,
                          image_top=inputs.image, image_layer=job.layers[inputs.image_layer])


def _check_options(centring, input_range, label):
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {', '.join(CENTRINGS)}; got {centring!r}")
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be 255 or 1; got {input_range!r}")
    if label not in LABEL_KINDS:
        raise ValueError(f"label must be one of {', '.join(LABEL_KINDS)}; got {label!r}")


def _checked_normalisation(normalisation, input_range):
    """``(mean tuple, scale)`` checked, or None."""
    if normalisation is None:
        return None
    mean, scale = normalisation
    mean = tuple(float(value) for value in mean)
    if len(mean) not in (1, 3) or not all(math.isfinite(value) for value in mean):
        raise ValueError(f"input mean must be 1 or 3 finite values (raw 0-255 grey levels); got {mean!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"input scale must be a finite number > 0; got {scale!r}")
    if input_range != 255:
        raise ValueError("an input mean/scale describes 0-255 raw data; it does not go with input range 1")
    return mean, float(scale)


def _unnormalising_wrap(job, augment, image, normalisation, params):
    """``[augment]``, or the layers taking ``(raw - mean) * scale`` back to raw, ``augment``, and
    the layers normalising again (in the augmentation's phases)."""
    if normalisation is None:
        return [augment]
    mean, scale = normalisation
    taken = {layer.name for layer in job.layers} | {augment.name}
    phase = None if params["test_augment"] else TRAIN
    undo = ([("scale", 1.0 / scale)] if scale != 1 else []) + [("mean_value", tuple(-m for m in mean))]
    redo = [("mean_value", mean)] + ([("scale", scale)] if scale != 1 else [])
    before = op_layers(undo, image, taken, phase)
    after = op_layers(redo, image, taken, phase)
    for layers, word in ((before, "raw"), (after, "renormalise")):
        for layer in layers:  # named for what they do, not for the mean they add or subtract
            layer.name = unique_name(f"{image}_{word}", taken)
    job.lines.append(f"  input normalised by the data layer ((raw - mean) * scale, mean "
                     f"{', '.join(f'{m:g}' for m in mean)}, scale {scale:g}): undone before the AugmentationLayer "
                     "and done again after it, so it sees 0-255 intensities")
    return before + [augment] + after


def _remove_augmentation_layers(job):
    """Take out the augmentation layers already there (their tops become their bottoms again);
    return a copy of the TRAIN-phase one, or None."""
    layers, state, where = job.layers, job.state, job.where
    old_augmentations = [i for i, layer in enumerate(layers) if is_augmentation(layer)]
    old_train = [i for i in old_augmentations if state.active(layers[i], TRAIN)]
    if len(old_train) > 1:
        raise ValueError(f"{where}: {len(old_train)} augmentation layers in the TRAIN phase ("
                         + ", ".join(repr(layers[i].name) for i in old_train) + "); expected at most one")
    old = copy.deepcopy(layers[old_train[0]]) if old_train else None
    for i in reversed(old_augmentations):
        layer = layers[i]
        if not 1 <= len(layer.bottom) <= 2 or len(layer.top) != len(layer.bottom):
            raise ValueError(f"{where}: augmentation {describe(layer)} has {len(layer.bottom)} bottoms and "
                             f"{len(layer.top)} tops; expected image[, label] in and out")
        for bottom, top in zip(layer.bottom, layer.top):
            if bottom != top:
                rename_after(layers, i + 1, top, bottom)
        del layers[i]
        job.lines.append(f"  - removed {describe(layer, state)}, bottoms "
                         f"{', '.join(map(repr, layer.bottom))}: replaced by the AugmentationLayer below")
    return old


def _tops_read_by(job, old, image_top, label_top):
    """The image and label tops to use: the ones given, else those the old augmentation layer read."""
    if old is None or image_top is not None:
        return image_top, label_top
    data_tops = {top for layer in job.layers if job.state.active(layer, TRAIN) and is_source(layer)
                 for top in layer.top}
    if data_tops and old.bottom[0] not in data_tops:
        raise ValueError(f"{job.where}: the existing augmentation {describe(old, job.state)} reads {old.bottom[0]!r}, "
                         f"not a top of the data layers ({', '.join(map(repr, sorted(data_tops)))}); put it "
                         "right after the data layer first, or remove it")
    image_top = old.bottom[0]
    if label_top is None and len(old.bottom) == 2:
        label_top = old.bottom[1]
    return image_top, label_top


def _train_inputs(job, image_top, label_top):
    """The TRAIN phase's image and label tops; a ValueError saying why when there is no data layer."""
    layers = job.layers
    inputs = find_inputs(layers, job.state, TRAIN, job.where, image_top, label_top)
    if inputs is not None:
        return inputs
    sources = [layer.name for layer in layers if is_source(layer)]
    staged = [layer.name for layer in layers if any(rule.stage for rule in layer.include)]
    hint = ""
    if staged:
        hint = (f"; layers {', '.join(map(repr, staged))} are included only in named stages (a DIGITS "
                "all-in-one net?), which a plain TRAIN phase does not select")
    elif sources:
        hint = f"; its source layers {', '.join(map(repr, sources))} are not in the TRAIN phase"
    raise ValueError(f"{job.where}: no data layer in the TRAIN phase (Data, ImageData, WindowData, HDF5Data, Input, "
                     f"DummyData or a Python layer without bottoms){hint}")


def _report_inputs(job, inputs, old, label):
    """Report the image and label tops; return the label's kind ('spatial', 'scalar', 'other'; None: no label)."""
    layers, state, lines = job.layers, job.state, job.lines
    kind, why = (None, None)
    if inputs.label is not None:
        kind, why = label_kind(layers, state, inputs, old, label, job.where)
    lines.append(f"  {describe(layers[inputs.image_layer], state)}: image top {inputs.image!r}")
    if inputs.label is not None:
        description = {"spatial": "per-pixel label map: augmented with the image",
                       "scalar": "class label: left alone", "other": "a map of another size: left alone"}[kind]
        lines.append(f"  {describe(layers[inputs.label_layer], state)}: label top {inputs.label!r}, {description} "
                     f"({why})")
    else:
        lines.append("  no label top found: the image is augmented alone")
    for top, index in inputs.others:
        lines.append(f"  note: top {top!r} of {describe(layers[index], state)} is left alone; if it is a "
                     "per-pixel map, the geometric augmentation will not be applied to it")
    return kind


def _is_patch_data(layer):
    return layer.type == "Python" and layer.python_param.module == PATCH_DATA_MODULE


def _gather_params(job, inputs, old, param_str, drop_unknown_keys):
    """The augmentation keys: carried over (old layer, PatchDataLayer ``augment``), then ``param_str``.

    Returns
    -------
    (raw, given, bases) : (dict, dict, list of (str, dict))
        The combined keys, those given, and where each carried-over set came from.
    """
    layers, lines = job.layers, job.lines
    image_layer = layers[inputs.image_layer]
    bases = []
    if old is not None:
        where_old = f"param_str of {describe(old)}"
        raw_old = parse_param_str(old.python_param.param_str, where_old)
        bases.append((where_old, known_keys(raw_old, where_old, drop_unknown_keys, lines)))
    if _is_patch_data(image_layer):
        where_patch = f"param_str of {describe(image_layer)}"
        raw_patch = parse_param_str(image_layer.python_param.param_str, where_patch)
        PATCH_DATA_SCHEMA.validate(raw_patch, where_patch)
        if raw_patch.get("augment") is not None:
            augment = raw_patch.pop("augment")
            bases.append((where_patch + " (augment)",
                          known_keys(augment, where_patch + " 'augment'", drop_unknown_keys, lines)))
            layers[inputs.image_layer] = image_layer = copy.deepcopy(image_layer)
            image_layer.python_param.param_str = literal(raw_patch)
            lines.append(f"  {describe(image_layer, job.state)}: moved its 'augment' entry into the AugmentationLayer "
                         "(the data layer no longer augments)")
    given = {}
    given_where = "param_str"
    if param_str is not None:
        if isinstance(param_str, Mapping):
            given = dict(param_str)
        else:
            given = parse_param_str(param_str, "param_str")
        AUGMENT_SCHEMA.validate(given, given_where)
    elif not bases:
        raise ValueError(f"{job.where}: no param_str given and no existing augmentation layer to take one from")
    raw = {}
    for source_where, values in bases:
        AUGMENT_SCHEMA.validate(values, source_where)
        raw.update(values)
    raw.update(given)
    return raw, given, bases


def _written_param_str(job, image_layer, raw, given, bases, input_range):
    """The AugmentationLayer's param_str: the keys with the channel order and input range applied.

    Returns
    -------
    (param_str, params) : (str, dict)
        The text written and its validated parameters.
    """
    lines = job.lines
    params = AUGMENT_SCHEMA.validate(raw, "the combined augmentation param_str")
    for source_where, values in bases:
        overridden = sorted(key for key in set(given) & set(values) if given[key] != values[key])
        lines.append(f"  carried over {len(values)} key(s) from {source_where}"
                     + (f"; the given param_str overrides {', '.join(overridden)}" if overridden else ""))
    written = dict(raw)
    bgr_source = image_layer.type in TRANSFORMING_TYPES
    if params["hed"]:
        _set_channel_order(lines, image_layer, raw, written, bgr_source)
    if input_range == 1:
        _scale_intensities_to_one(job, raw, params, written)
    elif not bgr_source and not any(key in raw for key in INTENSITY_KEYS) and not _is_patch_data(image_layer):
        lines.append(f"  note: the data of {describe(image_layer)} {ASSUMED_RANGE}; for 0-1 data use input range 1 "
                     "(--input-range 1)")
    ordered = {key: written[key] for key in AUGMENT_SCHEMA.keys if key in written}
    final_str = literal(ordered)
    params = AUGMENT_SCHEMA.validate(parse_param_str(final_str, "the written param_str"), "the written param_str")
    if not any(params[key] for key in GEOMETRY_KEYS + ("color", "hed", "stain_stats")):
        lines.append("  note: the param_str turns no augmentation on (rotate, flip, rotate_any, color, hed all off, "
                     "no stain_stats)")
    return final_str, params


def _set_channel_order(lines, image_layer, raw, written, bgr_source):
    """hed needs to know which channel is red: BGR for Caffe's own image layers unless given."""
    if "channel_order" not in raw and bgr_source:
        written["channel_order"] = "BGR"
        lines.append(f"  channel_order: BGR ({image_layer.type} layers deliver OpenCV/DIGITS BGR images; hed needs "
                     "to know which channel is red)")
    elif bgr_source and raw.get("channel_order") == "RGB":
        lines.append(f"  note: channel_order RGB was given, but {image_layer.type} layers normally deliver BGR")
    elif "channel_order" not in raw and not _is_patch_data(image_layer):
        lines.append(f"  note: the channel order of {image_layer.type} data cannot be read from the prototxt: hed "
                     "assumes RGB (set channel_order if it is BGR)")


def _scale_intensities_to_one(job, raw, params, written):
    """0-1 data: the intensity keys, given in 0-255 grey levels, divided by 255."""
    too_small = [key for key in ("clip_max", "max_value") if key in raw and params[key] <= 1]
    if too_small:
        raise ValueError(f"{job.where}: input_range 1 divides the param_str's intensity values by 255, but "
                         + ", ".join(f"{key}={params[key]!r}" for key in too_small)
                         + " already look like 0-1 values; give them in 0-255 grey levels (as "
                         "caffe-stain-estimate prints them)")
    for key in INTENSITY_KEYS:
        written[key] = params[key] / 255.0
    job.lines.append("  input range 0-1: " + ", ".join(f"{key} {params[key]:g} -> {written[key]:.6g}"
                                                       for key in INTENSITY_KEYS))


def _refuse_misaligned_labels(job, inputs, kind, params):
    """Geometric augmentation would misalign a label of another size, or a second label."""
    geometry = any(params[key] for key in GEOMETRY_KEYS)
    if kind == "other" and geometry:
        raise ValueError(f"{job.where}: label top {inputs.label!r} is not the image's size, so the geometric "
                         "augmentation (rotate/flip/rotate_any) would misalign it; turn those off or feed a full-size "
                         "label")
    read_by_losses = blobs_read_by_losses(job.layers, job.state, TRAIN)
    second_labels = [top for top, _ in inputs.others if top in read_by_losses]
    if second_labels and geometry:
        raise ValueError(f"{job.where}: data top(s) {', '.join(map(repr, second_labels))} also feed a loss, but the "
                         f"AugmentationLayer carries one label ({inputs.label!r}) with the image: "
                         "rotate/flip/rotate_any would misalign the other; turn the geometric augmentation off "
                         "(colour and hed only)")


def _note_data_layers(job):
    """Notes about the data layers as they are (a mean in a Python layer, an ignored transform_param)."""
    for phase in PHASES:
        for layer in job.layers:
            if not (job.state.active(layer, phase) and is_source(layer)):
                continue
            words = tokens(layer.python_param.param_str)
            if phase == TRAIN and layer.type == "Python" and any("mean" in word for word in words):
                job.lines.append(f"  note: {describe(layer, job.state)} has a 'mean' in its param_str; if it "
                                 "subtracts a mean, the augmentation sees centred data (move the centring after the "
                                 "augmentation by hand)")
            if layer.type not in TRANSFORMING_TYPES and layer.HasField("transform_param") and phase == TRAIN:
                job.lines.append(f"  note: {describe(layer, job.state)} has a transform_param, which Caffe's "
                                 f"{layer.type} layer ignores; left as is")


def _move_transforms(job, inputs, centring):
    """Per phase, take what the image producer's transform_param does after its mean out of it.

    Returns
    -------
    (phase_inputs, ops_by_phase) : (dict, dict)
        phase -> :class:`Inputs`; phase -> (image top, ops to apply after the augmentation).
    """
    layers, state = job.layers, job.state
    phase_inputs = {TRAIN: inputs}
    test_tops = {top for layer in layers if state.active(layer, TEST) and is_source(layer) for top in layer.top}
    if test_tops:
        phase_inputs[TEST] = find_inputs(
            layers, state, TEST, job.where, inputs.image if inputs.image in test_tops else None,
            inputs.label if inputs.label in test_tops else "")
    ops_by_phase = {}
    taken_ops = {}
    for phase, found in phase_inputs.items():
        index = found.image_layer
        ops = []
        if layers[index].type in TRANSFORMING_TYPES:
            if index not in taken_ops:
                taken_ops[index] = _take_transform_of(job, index, centring)
            ops = list(taken_ops[index])
        if centring == "patchmean":
            ops = [("mvn",)] + [op for op in ops if op[0] == "scale"]
        ops_by_phase[phase] = (found.image, ops)
    if centring == "patchmean":
        centred = [layer.name for layer in layers
                   if inputs.image in layer.bottom and (layer.type == "MVN" or (
                       layer.type == "Python" and layer.python_param.module == MEAN_SUBTRACT_MODULE))]
        if centred:
            raise ValueError(f"{job.where}: {inputs.image!r} is already centred by layer(s) "
                             f"{', '.join(map(repr, centred))}; remove them to switch to per-patch centring")
    return phase_inputs, ops_by_phase


def _take_transform_of(job, index, centring):
    """:func:`take_transform` on a copy of layer ``index`` (put in its place), with a note on a cropped mean file."""
    job.layers[index] = producer = copy.deepcopy(job.layers[index])
    param = producer.transform_param
    crop = (f"{param.crop_size}×{param.crop_size}" if param.crop_size else
            f"{param.crop_h}×{param.crop_w}" if param.crop_h and param.crop_w else None)
    had_mean_file = param.HasField("mean_file")
    ops = take_transform(producer, job.lines, job.state)
    if had_mean_file and crop and centring == "keep":
        job.lines.append(f"  note: {describe(producer, job.state)} crops to {crop} before its mean file is subtracted "
                         "now: MeanSubtractLayer subtracts the mean image's centre crop, which is exactly what Caffe "
                         "subtracts in TEST (centre crop: TEST output unchanged); a TRAIN crop at a random offset is "
                         "centred on the mean's centre crop instead of its own window (a difference of the mean "
                         "image's variation across the crop positions; none if the mean image is flat)")
    return ops


def _note_separate_label_layer(job, inputs, image_layer, kind):
    """Image and label from separate layers: Caffe draws their random crops and mirrors independently."""
    if kind != "spatial" or inputs.label_layer == inputs.image_layer:
        return
    label_layer = job.layers[inputs.label_layer]
    label_param = label_layer.transform_param
    image_param = image_layer.transform_param
    if (label_param.mirror or image_param.mirror or label_param.crop_size or image_param.crop_size) and \
            label_layer.type in TRANSFORMING_TYPES:
        job.lines.append(f"  note: image and label come from separate layers ({image_layer.name!r}, "
                         f"{label_layer.name!r}) with random mirror/crop in transform_param; Caffe "
                         "draws those independently for each layer, so image and label may not match (left as is; "
                         "the AugmentationLayer's own flips and rotations keep them aligned)")


def _new_layers(job, inputs, kind, final_str, params, ops_by_phase, phase_inputs):
    """The AugmentationLayer and the chains of layers that do the moved transform, per phase.

    Returns
    -------
    (augment, chains) : (LayerParameter, list of (phase or None, ops, list of LayerParameter))
    """
    taken = {layer.name for layer in job.layers}
    augment_blobs = [inputs.image] + ([inputs.label] if kind == "spatial" else [])
    augment = python_layer(unique_name("augment", taken), AUGMENTATION_MODULE, AUGMENTATION_LAYER, final_str,
                           augment_blobs)
    if not params["test_augment"]:
        augment.include.add(phase=TRAIN)
    # One chain for both phases when they need the same; else one per phase (include { phase }).
    if len(ops_by_phase) == 2 and ops_by_phase[TRAIN] == ops_by_phase[TEST]:
        blob, ops = ops_by_phase[TRAIN]
        chains = [(None, ops, op_layers(ops, blob, taken))]
    else:
        chains = [(phase, ops, op_layers(ops, blob, taken, phase)) for phase, (blob, ops) in ops_by_phase.items()]
    if params["test_augment"] and TEST in phase_inputs and kind == "spatial" and \
            phase_inputs[TEST].label != inputs.label:
        raise ValueError(f"{job.where}: test_augment is on, but the TEST phase has no label top {inputs.label!r}")
    return augment, chains


def _insert_layers(job, net, inputs, phase_inputs, wrapped, chains):
    """The output net: the augmentation after the TRAIN data layers, the chains after all of them.

    Returns
    -------
    (out, inserted, train_end) : (NetParameter, set of int, int)
        The net, the positions of the new layers in it, and the index of the last TRAIN data layer.
    """
    source_indices = [found.image_layer for found in phase_inputs.values()]
    source_indices += [found.label_layer for found in phase_inputs.values() if found.label_layer is not None]
    train_end = max(i for i in (inputs.image_layer, inputs.label_layer) if i is not None)
    all_end = max(source_indices)
    new_layers = []
    inserted = set()
    for index, layer in enumerate(job.layers):
        new_layers.append(layer)
        if index == train_end:
            inserted.update(range(len(new_layers), len(new_layers) + len(wrapped)))
            new_layers.extend(wrapped)
        if index == all_end:
            for _, _, chain in chains:
                inserted.update(range(len(new_layers), len(new_layers) + len(chain)))
                new_layers.extend(chain)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    out.layer.extend(new_layers)
    return out, inserted, train_end


def _report_insertions(job, wrapped, augment, chains, train_end):
    state = job.state
    for layer in wrapped:
        if layer is not augment:
            job.lines.append(f"  + {describe(layer, state)}, in place on {layer.bottom[0]!r}")
    job.lines.append(f"  + {describe(augment, state)}, in place on "
                     f"{' and '.join(map(repr, augment.bottom))}, after {describe(job.layers[train_end], state)}: "
                     f"param_str {augment.python_param.param_str}")
    for phase, ops, chain in chains:
        for layer in chain:
            job.lines.append(f"  + {describe(layer, state)}, in place on {layer.bottom[0]!r}")
        if ops:
            job.lines.append(f"    ({'both phases' if phase is None else PHASES[phase]}: {describe_ops(ops)}; "
                             "after the augmentation)")


def _check_rewritten_flow(job, out, inserted, augment_blobs, broken_before):
    """Every bottom is produced in each phase where the input net was whole, and every original
    consumer of the image/label reads them after the inserted layers."""
    for phase in PHASES:
        if broken_before[phase] is None:
            problem = check_flow(out.layer, job.state, phase)
            if problem is not None:
                raise ValueError(f"{job.where}: after the rewrite, layer {problem[0]!r} would read {problem[1]!r} "
                                 f"before any layer produces it in the {PHASES[phase]} phase; the net's layer order "
                                 "is not one this rewrite understands")
        active = [(i, layer) for i, layer in enumerate(out.layer) if job.state.active(layer, phase)]
        for blob in augment_blobs:
            last = max((i for i, layer in active if i in inserted and blob in layer.top), default=None)
            if last is None:
                continue
            early = [layer.name for i, layer in active if i < last and i not in inserted and blob in layer.bottom]
            if early:
                raise ValueError(f"{job.where}: layer(s) {', '.join(map(repr, early))} read {blob!r} before the "
                                 f"data layers of the {PHASES[phase]} phase are all done; move them after the data "
                                 "layers")


def _final_notes(job, broken_before, image_layer, inputs):
    if broken_before[TRAIN] is not None:
        job.lines.append(f"  note: the input net is not whole in the TRAIN phase (layer {broken_before[TRAIN][0]!r} "
                         f"reads {broken_before[TRAIN][1]!r}, which no earlier layer produces)")
    if image_layer.type in ("Input", "DummyData"):
        job.lines.append(f"  note: the new layers work in place on {inputs.image!r}: {image_layer.type} does not "
                         "refill it on every forward (Input: set it before each forward; a constant DummyData filler "
                         "would be changed anew by every pass)")


def _retrofit_deploy(deploy, image, centring, ops, lines, where):
    if not deploy.layer and not deploy.layers and not deploy.input:
        raise ValueError(f"{where}: the deploy net has no layers and no input (an empty file?)")
    deploy, notes = upgrade_net(deploy, "deploy net")
    lines.extend(f"deploy net: {note}" for note in notes)
    removed = _remove_deploy_augmentation(deploy, lines)
    if centring != "patchmean":
        lines.append(f"deploy net: {'otherwise ' if removed else ''}unchanged (upgraded to the V2 format if it was "
                     "older); the TEST-phase output of the train net is unchanged, so keep preparing the deploy "
                     "input as before")
        return deploy
    state = NetState(deploy)
    inputs = [(index, top) for index, layer in enumerate(deploy.layer) if layer.type == "Input"
              and state.active(layer, caffe_pb2.TEST) for top in layer.top]
    chosen = [(index, top) for index, top in inputs if top == image] or (inputs if len(inputs) == 1 else [])
    if not chosen:
        raise ValueError("deploy net: cannot find its image input: "
                         + (f"Input tops {', '.join(repr(t) for _, t in inputs)}, none named {image!r}" if inputs
                            else "it has no Input layer (nor input fields)"))
    index, top = chosen[0]
    centred = [layer.name for layer in deploy.layer if top in layer.bottom and layer.type == "MVN"]
    if centred:
        raise ValueError(f"deploy net: {top!r} is already centred by MVN layer(s) {', '.join(map(repr, centred))}")
    taken = {layer.name for layer in deploy.layer}
    chain = op_layers(ops, top, taken)
    layers = list(deploy.layer)
    layers[index + 1:index + 1] = chain
    deploy.ClearField("layer")
    deploy.layer.extend(layers)
    for layer in chain:
        lines.append(f"deploy net: + {describe(layer)}, in place on {top!r}, after {describe(layers[index])}")
    scale = [op[1] for op in ops if op[0] == "scale"]
    lines.append(f"deploy net: {describe_ops(ops)}. It now takes the raw image, as the train net's data layer "
                 "delivers it: do not subtract a mean before calling it"
                 + (f", and do not multiply by {scale[0]:g} either (the net does)" if scale else ""))
    return deploy


def _remove_deploy_augmentation(deploy, lines):
    """Take the augmentation layers out of a deploy net (inference must neither need their module nor
    rotate and recolour); their tops become their bottoms again. Returns how many were removed."""
    layers = list(deploy.layer)
    found = [i for i, layer in enumerate(layers) if is_augmentation(layer)]
    for i in reversed(found):
        layer = layers[i]
        if len(layer.top) != len(layer.bottom):
            raise ValueError(f"deploy net: augmentation {describe(layer)} has {len(layer.bottom)} bottoms and "
                             f"{len(layer.top)} tops; expected as many tops as bottoms")
        for bottom, top in zip(layer.bottom, layer.top):
            if bottom != top:
                rename_after(layers, i + 1, top, bottom)
        del layers[i]
        lines.append(f"deploy net: removed {describe(layer)}: augmentation has no place at inference")
    if found:
        deploy.ClearField("layer")
        deploy.layer.extend(layers)
    return len(found)
