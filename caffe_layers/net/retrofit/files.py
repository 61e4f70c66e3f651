"""Retrofit prototxt files: read the nets, rewrite them, write the results atomically, never over an input."""
from __future__ import annotations

from pathlib import Path

from ...image_io import same_file, write_atomic
from ...transforms.schema import AUGMENT_SCHEMA
from ..prototxt import net_to_text, parse_net, read_text_file
from .augment_params import read_param_str_source
from .rewrite import retrofit


def retrofit_files(source, out, param_str=None, *, centring="keep", input_range=255, label="auto",
                   image_top=None, label_top=None, deploy=None, deploy_out=None, overwrite=False,
                   drop_unknown_keys=False):
    """Read ``source``, :func:`retrofit` it, write ``out`` (and ``deploy_out``) atomically.

    ``param_str`` may be the text itself or ``@file`` (see :func:`read_param_str_source`).
    Nothing is written if anything fails; no input file is ever replaced, and existing outputs
    only with ``overwrite``.

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
    result = retrofit(raw_net, given, centring=centring, input_range=input_range, label=label,
                      image_top=image_top, label_top=label_top, deploy=raw_deploy,
                      drop_unknown_keys=drop_unknown_keys, where=str(source))
    header = [f"Retrofitted by caffe-stain-retrofit from {Path(source).name}: AugmentationLayer after the data "
              f"layers (TRAIN), centring {centring}."]
    texts = [(out, net_to_text(result.net, header))]
    if deploy_out is not None:
        texts.append((deploy_out, net_to_text(result.deploy, [f"Deploy twin of {Path(out).name}, from "
                                                             f"{Path(deploy).name} (centring {centring})."])))
    for path, text in texts:
        write_atomic(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)
    return result
