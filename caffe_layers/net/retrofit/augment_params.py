"""The AugmentationLayer's param_str in a retrofit: read from ``--param-str``, carried over, written.

Keys come from an existing augmentation layer, from a ``PatchDataLayer``'s ``augment`` entry and
from the given param_str (which wins); they are checked against
:data:`~caffe_layers.transforms.schema.AUGMENT_SCHEMA` and written back as a Python-literal dict
with exact floats.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path

from ...param_str import ParamError, parse_param_str
from ...transforms.schema import AUGMENT_SCHEMA

# The param_str keys holding intensities, in 0-255 grey levels (scaled by input_range).
INTENSITY_KEYS = ("color_b_min", "color_b_max", "clip_min", "clip_max", "max_value")
GEOMETRY_KEYS = ("rotate", "flip", "rotate_any")


def read_param_str_source(text):
    """The param_str text behind ``--param-str``: ``@file`` reads a file; else ``text`` itself.

    A file holding the ``--json`` output of ``caffe-stain-estimate`` (an object with ``params``
    and ``param_str``) gives its ``params``.
    """
    if text is None:
        return None
    text = str(text)
    where = "--param-str"
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--param-str file {str(path)!r} does not exist (or is not a file)")
        text = path.read_text(encoding="utf-8").strip()
        where = f"--param-str file {str(path)!r}"
    parsed = parse_param_str(text, where)
    if isinstance(parsed, Mapping) and "param_str" in parsed and isinstance(parsed.get("params"), Mapping):
        parsed = dict(parsed["params"])  # caffe-stain-estimate --json
    return parsed, where


def literal(value):
    """A value in the Python-literal param_str style, floats exact (``repr``)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{literal(str(key))}: {literal(item)}" for key, item in value.items()) + "}"
    raise ValueError(f"cannot write parameter value {value!r} into a param_str")


def known_keys(raw, where, drop_unknown, lines):
    """``raw`` without unknown keys (refused, with every unknown key named, unless dropped)."""
    valid = AUGMENT_SCHEMA.keys
    unknown = [key for key in raw if key not in valid]
    if not unknown:
        return dict(raw)
    described = []
    for key in unknown:
        close = difflib.get_close_matches(str(key)[:64], valid, n=1, cutoff=0.6)
        described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not drop_unknown:
        raise ParamError(f"{where} has key(s) the AugmentationLayer does not know: {', '.join(described)}; valid keys: "
                         f"{', '.join(valid)}; fix them there, or drop them (drop_unknown_keys / --drop-unknown-keys)",
                         where=where, key=str(unknown[0]), value=raw[unknown[0]])
    lines.append(f"  dropped unknown key(s) of {where}: {', '.join(described)}")
    return {key: value for key, value in raw.items() if key in valid}
