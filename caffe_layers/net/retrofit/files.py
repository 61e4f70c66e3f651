"""Retrofit prototxt files: read the nets, rewrite them, write the results atomically, never over an input."""
from __future__ import annotations

import os
from pathlib import Path

from caffe.proto import caffe_pb2

from ...image_io import same_file, write_atomic
from ...transforms.schema import AUGMENT_SCHEMA
from ..prototxt import net_to_text, parse_net, read_text_file
from .augment_params import read_param_str_source
from .inputs import tokens
from .data_range import describe_source, measure_range, needs_measuring, range_verdict
from .rewrite import ASSUMED_RANGE, retrofit


def retrofit_files(source, out, param_str=None, *, centring="keep", input_range=None, label="auto",
                   image_top=None, label_top=None, deploy=None, deploy_out=None, overwrite=False,
                   drop_unknown_keys=False, input_normalisation=None):
    """Read ``source``, :func:`retrofit` it, write ``out`` (and ``deploy_out``) atomically.

    ``param_str`` may be the text itself or ``@file`` (see :func:`read_param_str_source`).
    Nothing is written if anything fails; no input file is ever replaced, and existing outputs
    only with ``overwrite``.

    When the prototxt cannot tell the range of the image data (a Python data layer of the
    user's, HDF5 files), the TRAIN data layers are run once and their range measured
    (:mod:`~caffe_layers.net.retrofit.data_range`): ``input_range=None`` becomes 1 for 0-1
    data (else 255); data that a layer already normalises is refused unless
    ``input_normalisation`` (mean, scale) says how, and then checked against it.

    Returns
    -------
    RetrofitResult
    """
    if (deploy is None) != (deploy_out is None):
        raise ValueError("a deploy net needs both the deploy prototxt and the deploy output path")
    inputs = [("the input net", source)] + ([("the deploy net", deploy)] if deploy is not None else [])
    outputs = [("the output", out)] + ([("the deploy output", deploy_out)] if deploy_out is not None else [])
    for out_what, out_path in outputs:
        for in_what, in_path in inputs:
            if same_file(out_path, in_path):
                raise ValueError(f"{out_path}: {out_what} would replace {in_what}; write it elsewhere")
    if len(outputs) == 2 and same_file(out, deploy_out):
        raise ValueError(f"{out}: the output and the deploy output are the same file")
    for _, out_path in outputs:
        out_path = Path(out_path)
        if out_path.is_dir():
            raise IsADirectoryError(f"{out_path}: is a folder, cannot write a file there")
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path}: already exists (use --overwrite to replace it)")
        folder = out_path.parent if str(out_path.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(f"{out_path}: output folder {folder} does not exist")
    given = None
    if param_str is not None:
        given, given_where = read_param_str_source(param_str)
        AUGMENT_SCHEMA.validate(given, given_where)  # named for the option, before anything else
    raw_net = parse_net(read_text_file(source, "net prototxt"), str(source))
    raw_deploy = parse_net(read_text_file(deploy, "deploy prototxt"), str(deploy)) if deploy is not None else None
    def rewrite(stated_range):
        return retrofit(raw_net, given, centring=centring, input_range=stated_range or 255, label=label,
                        image_top=image_top, label_top=label_top, deploy=raw_deploy, deploy_where=str(deploy),
                        drop_unknown_keys=drop_unknown_keys, input_normalisation=input_normalisation,
                        where=str(source))

    result = rewrite(input_range)
    if _range_is_one(result, source, input_range, input_normalisation):
        result = rewrite(1)
        result.lines.append("  the TRAIN data is 0-1 (measured on one batch): input range 1 (the param_str's "
                            "intensities divided by 255)")
    _set_database_backends(result)
    header = [f"Retrofitted by caffe-stain-retrofit from {Path(source).name}: AugmentationLayer after the data "
              f"layers (TRAIN), centring {centring}."]
    texts = [(out, net_to_text(result.net, header))]
    if deploy_out is not None:
        texts.append((deploy_out, net_to_text(result.deploy, [f"Deploy twin of {Path(out).name}, from "
                                                             f"{Path(deploy).name} (centring {centring})."])))
    for path, text in texts:
        write_atomic(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)
    return result


def _range_is_one(result, source, input_range, normalisation):
    """Measure the TRAIN image data when the prototxt cannot tell its range; True when it is 0-1
    data and no range was stated. Refuses data that the AugmentationLayer would clip."""
    image_top = result.image_top
    producer = result.image_layer
    if not needs_measuring(producer):
        if normalisation is not None:
            raise ValueError(f"{source}: an input mean/scale was given, but {describe_source(result.net, image_top)} "
                             "delivers raw data (its own mean and scale are moved after the augmentation)")
        return False
    measured = measure_range(result.net, image_top, str(source), Path(source).resolve().parent)
    what = f"{source}: the data of {describe_source(result.net, image_top)}"
    if isinstance(measured, str):
        if normalisation is None and input_range is None and "mean" in tokens(producer.python_param.param_str):
            raise ValueError(f"{what} could not be measured ({measured}), and its param_str has a 'mean': if "
                             "it subtracts one, the AugmentationLayer would clip the centred data; say how it "
                             "normalises (--input-mean M[,M,M] [--input-scale S]) or that it does not "
                             "(--input-range 255)")
        if normalisation is None and input_range is None:
            result.lines.append(f"  note: could not run the TRAIN data layers to measure the range of the data "
                                f"({measured}); the AugmentationLayer assumes 0-255 (clip 0-255): check it")
        return False
    low, high = measured
    result.lines[:] = [line for line in result.lines if ASSUMED_RANGE not in line]  # measured instead
    verdict, why = range_verdict(low, high, input_range, normalisation)
    if verdict == "refuse":
        raise ValueError(f"{what}, [{low:.6g}, {high:.6g}] on one TRAIN batch, {why}; say how it was normalised "
                         "(--input-mean M[,M,M] --input-scale S: the layer delivers (raw - M) * S, raw in 0-255), "
                         "or --input-range 1 for 0-1 data")
    result.lines.append(f"  the TRAIN data of {describe_source(result.net, image_top)} is in [{low:.6g}, {high:.6g}] "
                        "(measured on one batch)")
    return verdict == "one"


_BACKEND_MARKERS = {caffe_pb2.DataParameter.LMDB: ("LMDB", "data.mdb"),
                    caffe_pb2.DataParameter.LEVELDB: ("LEVELDB", "CURRENT")}


def _set_database_backends(result):
    """A Data layer whose database folder (relative to the working directory, as for Caffe) is
    of the other kind gets the right ``backend``: V0/V1 nets default to LevelDB, while
    caffe-stain-lmdb and most tools today write LMDB."""
    for layer in result.net.layer:
        if layer.type != "Data" or not os.path.isdir(layer.data_param.source):
            continue
        param = layer.data_param
        found = [backend for backend, (_, marker) in _BACKEND_MARKERS.items()
                 if os.path.exists(os.path.join(param.source, marker))]
        if len(found) == 1 and found[0] != param.backend:
            was = _BACKEND_MARKERS[param.backend][0] + ("" if param.HasField("backend") else ", by default")
            param.backend = found[0]
            result.lines.append(f"  layer {layer.name!r}: backend {_BACKEND_MARKERS[found[0]][0]} (its source "
                                f"{param.source!r} is one; the net said {was})")
