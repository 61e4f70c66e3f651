"""Parsing and validation of layer parameters (the one parser used by every layer and tool).

Caffe hands a Python layer its configuration as a single string, ``python_param.param_str``.
Over the years these strings have been written as JSON, as YAML and as Python dict literals
(``{"rotate": True, "color_a_min": .3}``), so :func:`parse_param_str` accepts all three --
without ever calling ``eval``; :func:`format_param_str` writes one back. The parsed dict is then checked against a declared
:class:`Schema`, which fills in defaults and turns every mistake (typo in a key, wrong type,
value out of range, min above max) into a :class:`ParamError` that names the layer, the key,
the offending value and what would have been allowed.

All schemas live in this module: :data:`AUGMENT_SCHEMA` (the augmentation layer and
:class:`caffe_layers.transforms.BatchAugmenter`) and :data:`PATCH_DATA_SCHEMA` (the patch data
layer, whose ``augment`` entry is validated with :data:`AUGMENT_SCHEMA`).

Examples
--------
>>> params = load_params('{"rotate": True, "color": True, "color_a_min": .3}',
...                      AUGMENT_SCHEMA, where="AugmentationLayer param_str")
>>> params["rotate"], params["color_a_min"], params["color_a_max"]
(True, 0.3, 1.1)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import yaml

__all__ = [
    "ACCEPTED_FORMATS",
    "AUGMENT_SCHEMA",
    "MEAN_SUBTRACT_SCHEMA",
    "PATCH_DATA_SCHEMA",
    "REQUIRED",
    "Param",
    "ParamError",
    "Schema",
    "format_param_str",
    "load_params",
    "parse_param_str",
]

ACCEPTED_FORMATS = (
    "accepted formats: a JSON object ('{\"rotate\": true}'), a Python dict literal "
    "('{\"rotate\": True, \"color_a_min\": .3}') or a YAML mapping ('rotate: true'); "
    "an empty string means no parameters"
)

# Longest param_str excerpt quoted in an error message; keeps messages readable.
_MAX_QUOTED_CHARS = 200


class ParamError(ValueError):
    """A layer or tool parameter could not be parsed or is invalid.

    The message always names where the parameters came from (e.g. ``"AugmentationLayer
    param_str"``), the key (when there is one) and the offending value.

    Attributes
    ----------
    where : str
        Where the parameters came from.
    key : str or None
        Dotted key of the offending entry (``"augment.color_a_min"``), or None when the
        whole text or dict is at fault.
    value : object
        The offending value (or text).
    """

    def __init__(self, message: str, *, where: str, key: str | None = None, value: Any = None):
        super().__init__(message)
        self.where = where
        self.key = key
        self.value = value


class _RequiredType:
    """Sentinel type of :data:`REQUIRED` (a parameter without a default)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self):
        return "REQUIRED"


REQUIRED = _RequiredType()
"""Default of a :class:`Param` that must be given explicitly."""


def _quote(text: str) -> str:
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[:_MAX_QUOTED_CHARS] + "..."
    return repr(text)


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (PyYAML follows YAML 1.1, where a
    float needs a dot, so ``1e-3`` would silently become the string ``'1e-3'``)."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_param_str(text: str | bytes | None, where: str = "param_str") -> dict:
    """Parse a layer's ``param_str`` into a dict, never evaluating code.

    The formats are tried in order: JSON (``json.loads``), Python literal
    (``ast.literal_eval``: ``True``/``False``/``None``, ``.3``, single quotes, tuples) and
    YAML (``yaml.safe_load``, with ``1e-3`` read as a float).

    Parameters
    ----------
    text : str, bytes or None
        The parameter text. None, ``''`` and whitespace give ``{}``.
    where : str
        Where the text came from, used in error messages (e.g. ``"AugmentationLayer
        param_str"``).

    Returns
    -------
    dict
        The parsed parameters (not validated; see :meth:`Schema.validate`).

    Raises
    ------
    ParamError
        If the text parses in none of the formats, or parses to something other than a dict
        with string keys.
    """
    if text is None:
        return {}
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParamError(f"{where} is not valid UTF-8: {exc}", where=where, value=text) from exc
    if not isinstance(text, str):
        raise ParamError(
            f"{where} must be a string, got {type(text).__name__} {text!r}; {ACCEPTED_FORMATS}",
            where=where,
            value=text,
        )
    if not text.strip():
        return {}

    parsed: Any
    errors = []
    for parse in (json.loads, ast.literal_eval, _parse_yaml):
        try:
            parsed = parse(text.strip())
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, yaml.YAMLError) as exc:
            errors.append(f"{parse.__name__}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    else:
        raise ParamError(
            f"cannot parse {where} {_quote(text)}; {ACCEPTED_FORMATS} "
            f"(YAML error: {errors[-1].split(': ', 1)[-1]})",
            where=where,
            value=text,
        )

    if not isinstance(parsed, dict):
        raise ParamError(
            f"{where} must be a dict of parameters, but {_quote(text)} is a "
            f"{type(parsed).__name__}; {ACCEPTED_FORMATS}",
            where=where,
            value=text,
        )
    bad_keys = [key for key in parsed if not isinstance(key, str)]
    if bad_keys:
        raise ParamError(
            f"{where} keys must be strings, got key {bad_keys[0]!r} in {_quote(text)}",
            where=where,
            key=str(bad_keys[0]),
            value=text,
        )
    return parsed


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12FloatLoader)  # noqa: S506 - SafeLoader subclass


_parse_yaml.__name__ = "yaml.safe_load"

_KINDS = ("bool", "int", "float", "str")


def _format_number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Param:
    """Declaration of one parameter.

    Parameters
    ----------
    name : str
        Key in the parameter dict.
    kind : {'bool', 'int', 'float', 'str'}
        Expected type. ``bool`` accepts only real booleans (not 1/0 or ``"yes"``); ``float``
        also accepts ints; ``int`` also accepts integral floats such as ``8.0``.
    default : object
        Value used when the key is absent; :data:`REQUIRED` makes the key mandatory.
    optional : bool
        Whether None is an accepted value.
    min, max : float or None
        Bounds for numeric kinds (None: unbounded).
    min_inclusive, max_inclusive : bool
        Whether the bounds themselves are allowed.
    choices : tuple or None
        The only accepted values, if given.
    doc : str
        One-line description, shown by :meth:`Schema.describe`.
    """

    name: str
    kind: str
    default: Any = REQUIRED
    optional: bool = False
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    choices: tuple | None = None
    doc: str = ""

    def __post_init__(self):
        # Catch schema mistakes when the module is imported, not when a user hits them.
        if self.kind not in _KINDS:
            raise ValueError(f"Param {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        if (self.min is not None or self.max is not None) and self.kind not in ("int", "float"):
            raise ValueError(f"Param {self.name!r}: min/max only apply to int and float")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Param {self.name!r}: min {self.min} > max {self.max}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.default is not REQUIRED:
            self.check(self.default, where=f"schema default of {self.name!r}")

    @property
    def required(self) -> bool:
        """Whether the key has no default and must be given."""
        return self.default is REQUIRED

    def type_description(self) -> str:
        """Type as shown to users, e.g. ``'float'`` or ``'int or None'``."""
        return f"{self.kind} or None" if self.optional else self.kind

    def range_description(self) -> str:
        """Allowed values as shown to users, e.g. ``'[0, 1]'``, ``'> 0'`` or ``'any'``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(choice) for choice in self.choices)
        if self.kind == "bool":
            return "true/false"
        if self.min is None and self.max is None:
            return "any"
        if self.max is None:
            return (">= " if self.min_inclusive else "> ") + _format_number(self.min)
        if self.min is None:
            return ("<= " if self.max_inclusive else "< ") + _format_number(self.max)
        return (
            ("[" if self.min_inclusive else "(")
            + f"{_format_number(self.min)}, {_format_number(self.max)}"
            + ("]" if self.max_inclusive else ")")
        )

    def check(self, value: Any, where: str = "param_str", key: str | None = None) -> Any:
        """Return ``value`` converted to this parameter's kind, or raise :class:`ParamError`.

        Parameters
        ----------
        value : object
            The raw value.
        where : str
            Where the value came from, for the error message.
        key : str, optional
            Dotted key to report (defaults to :attr:`name`).
        """
        key = self.name if key is None else key

        def fail(problem: str) -> ParamError:
            return ParamError(
                f"invalid value for {key!r} in {where}: {key}={value!r} {problem}",
                where=where,
                key=key,
                value=value,
            )

        if value is None:
            if self.optional:
                return None
            raise fail(f"is not allowed; expected a {self.kind}")

        if self.kind == "bool":
            # 1/0 and "yes" are rejected on purpose: in old param_strs they were typos as often as not.
            if not isinstance(value, (bool, np.bool_)):
                raise fail(f"has type {type(value).__name__}; expected a bool (true/false)")
            converted: Any = bool(value)
        elif self.kind == "str":
            if not isinstance(value, str):
                raise fail(f"has type {type(value).__name__}; expected a string")
            converted = value
        else:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise fail(f"has type {type(value).__name__}; expected a {self.type_description()}")
            if not math.isfinite(float(value)):
                raise fail(f"is not finite; expected a finite {self.kind}")
            if self.kind == "int":
                if not isinstance(value, numbers.Integral) and not float(value).is_integer():
                    raise fail("is not an integer; expected an int")
                converted = int(value)
            else:
                converted = float(value)

        if self.choices is not None and converted not in self.choices:
            raise fail(f"is not allowed; expected {self.range_description()}")
        if self.kind in ("int", "float"):
            below = self.min is not None and (
                converted < self.min or (converted == self.min and not self.min_inclusive)
            )
            above = self.max is not None and (
                converted > self.max or (converted == self.max and not self.max_inclusive)
            )
            if below or above:
                raise fail(f"is out of range; allowed range: {self.range_description()}")
        return converted


class Schema:
    """A declared set of parameters, validated as a whole.

    Parameters
    ----------
    params : iterable of Param
        The accepted keys.
    ordered_pairs : iterable of (str, str)
        Pairs ``(low_key, high_key)`` whose values must satisfy ``low <= high`` (when both
        are not None).
    nested : mapping of str to Schema, optional
        Keys whose value is a dict validated with another schema (or None, the default,
        meaning "absent").
    name : str, optional
        Short name used by :meth:`describe`.
    """

    def __init__(
        self,
        params: Iterable[Param],
        ordered_pairs: Iterable[tuple[str, str]] = (),
        nested: Mapping[str, Schema] | None = None,
        name: str = "",
    ):
        self.params: dict[str, Param] = {}
        for param in params:
            if param.name in self.params:
                raise ValueError(f"duplicate parameter {param.name!r} in schema")
            self.params[param.name] = param
        self.nested: dict[str, Schema] = dict(nested or {})
        clash = set(self.params) & set(self.nested)
        if clash:
            raise ValueError(f"keys declared both as params and nested schemas: {sorted(clash)}")
        self.ordered_pairs: tuple[tuple[str, str], ...] = tuple(tuple(pair) for pair in ordered_pairs)
        for low, high in self.ordered_pairs:
            for key in (low, high):
                if key not in self.params:
                    raise ValueError(f"ordered pair refers to unknown parameter {key!r}")
        self.name = name

    @property
    def keys(self) -> tuple[str, ...]:
        """All valid keys, in declaration order (nested keys last)."""
        return tuple(self.params) + tuple(self.nested)

    def defaults(self) -> dict:
        """Defaults of all optional keys (required keys are left out)."""
        values = {name: p.default for name, p in self.params.items() if not p.required}
        values.update({name: None for name in self.nested})
        return values

    def validate(self, raw: Mapping | None, where: str = "param_str", _prefix: str = "") -> dict:
        """Check ``raw`` and return a new dict with every key filled in.

        Parameters
        ----------
        raw : mapping or None
            Parsed parameters (None is treated as ``{}``). Not modified.
        where : str
            Where the parameters came from, used in error messages.

        Returns
        -------
        dict
            One entry per key of the schema: the converted value or its default. Nested
            entries are None or fully filled dicts.

        Raises
        ------
        ParamError
            For an unknown key (with the closest valid key suggested), a missing required
            key, a wrong type, a value out of range or an ordered pair with low > high.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            what = f"{_prefix.rstrip('.')!r} in {where}" if _prefix else where
            raise ParamError(
                f"{what} must be a dict of parameters, got {type(raw).__name__} {raw!r}",
                where=where,
                key=_prefix.rstrip(".") or None,
                value=raw,
            )

        for key in raw:
            if key not in self.params and key not in self.nested:
                self._raise_unknown(key, raw[key], where, _prefix)

        validated: dict[str, Any] = {}
        for name, param in self.params.items():
            dotted = _prefix + name
            if name in raw:
                validated[name] = param.check(raw[name], where=where, key=dotted)
            elif param.required:
                doc = f" ({param.doc})" if param.doc else ""
                raise ParamError(
                    f"missing required key {dotted!r} in {where}: expected a "
                    f"{param.type_description()}{doc}",
                    where=where,
                    key=dotted,
                    value=None,
                )
            else:
                validated[name] = param.default

        for name, schema in self.nested.items():
            value = raw.get(name)
            validated[name] = None if value is None else schema.validate(value, where, _prefix + name + ".")

        for low, high in self.ordered_pairs:
            low_value, high_value = validated[low], validated[high]
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ParamError(
                    f"invalid values in {where}: {_prefix}{low}={low_value!r} > "
                    f"{_prefix}{high}={high_value!r}; {_prefix}{low} must not exceed {_prefix}{high}",
                    where=where,
                    key=_prefix + low,
                    value=low_value,
                )
        return validated

    def _raise_unknown(self, key: Any, value: Any, where: str, prefix: str) -> None:
        dotted = f"{prefix}{key}"
        valid = self.keys
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ";"
        raise ParamError(
            f"unknown key {dotted!r} in {where}{hint} valid keys: "
            + ", ".join(prefix + k for k in valid)
            + f" (got {dotted}={value!r})",
            where=where,
            key=dotted,
            value=value,
        )

    def _rows(self, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
        rows = []
        for name, param in self.params.items():
            default = "(required)" if param.required else repr(param.default)
            rows.append((prefix + name, param.type_description(), default, param.range_description(), param.doc))
        for name, schema in self.nested.items():
            label = schema.name or "nested"
            rows.append((prefix + name, "dict or None", "None", f"{label} keys below", f"nested {label} parameters"))
            rows.extend(schema._rows(prefix + name + "."))
        return rows

    def describe(self) -> str:
        """A plain-text table of keys, types, defaults, allowed ranges and descriptions."""
        header = ("key", "type", "default", "allowed", "description")
        rows = [header] + self._rows()
        widths = [max(len(row[column]) for row in rows) for column in range(4)]

        def line(row):
            return "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]

        lines = [line(header), "  ".join("-" * width for width in widths) + "  " + "-" * 11]
        lines.extend(line(row) for row in rows[1:])
        if self.ordered_pairs or any(schema.ordered_pairs for schema in self.nested.values()):
            pairs = [f"{low} <= {high}" for low, high in self.ordered_pairs]
            for nested_name, schema in self.nested.items():
                pairs += [f"{nested_name}.{low} <= {nested_name}.{high}" for low, high in schema.ordered_pairs]
            lines.append("constraints: " + "; ".join(pairs))
        return "\n".join(line_.rstrip() for line_ in lines)

    def __repr__(self) -> str:
        return f"Schema(name={self.name!r}, keys={list(self.keys)!r})"


def load_params(param_str: str | bytes | None, schema: Schema, where: str = "param_str") -> dict:
    """Parse ``param_str`` and validate it with ``schema``; see :func:`parse_param_str`."""
    return schema.validate(parse_param_str(param_str, where), where)


def _format_value(value):
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if value is None:
        return "None"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"cannot format non-finite parameter value {value!r}")
        # Up to 4 significant digits is plenty for augmentation ranges.
        text = f"{value:.4g}"
        return text if ("." in text or "e" in text) else text + ".0"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return format_param_str(value)
    raise ValueError(f"cannot format parameter value {value!r} of type {type(value).__name__}")


def format_param_str(params):
    """Format a parameter dict as a Python-literal string for a ``param_str`` field.

    Parameters
    ----------
    params : dict[str, bool | int | float | str | list]

    Returns
    -------
    text : str
        E.g. ``'{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}'``;
        ``ast.literal_eval(text) == params`` up to float rounding.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict; got {type(params).__name__}")
    parts = []
    for key, value in params.items():
        if not isinstance(key, str):
            raise ValueError(f"parameter names must be strings; got {key!r}")
        parts.append(f"{_format_value(key)}: {_format_value(value)}")
    return "{" + ", ".join(parts) + "}"


def _probability(name: str, doc: str, default: float = 1.0) -> Param:
    return Param(name, "float", default, min=0.0, max=1.0, doc=doc)


AUGMENT_SCHEMA = Schema(
    [
        Param("rotate", "bool", False, doc="random multiple of 90 degrees per sample (0/180 only for non-square patches)"),
        Param("flip", "bool", False, doc="random horizontal and vertical flips per sample"),
        Param("rotate_any", "bool", False, doc="arbitrary-angle rotation about the centre, reflect padding"),
        Param("angle_min", "float", -180.0, min=-360.0, max=360.0, doc="lowest rotate_any angle, degrees"),
        Param("angle_max", "float", 180.0, min=-360.0, max=360.0, doc="highest rotate_any angle, degrees"),
        Param("color", "bool", False, doc="per-sample, per-channel x*a + b"),
        Param("color_a_min", "float", 0.9, min=0.0, min_inclusive=False, doc="lowest contrast factor a"),
        Param("color_a_max", "float", 1.1, min=0.0, min_inclusive=False, doc="highest contrast factor a"),
        Param("color_b_min", "float", -10.0, doc="lowest brightness offset b, in input intensity units"),
        Param("color_b_max", "float", 10.0, doc="highest brightness offset b, in input intensity units"),
        _probability("color_p", "probability that a sample gets the colour change"),
        Param("clip", "bool", True, doc="clip to [clip_min, clip_max] after the colour change"),
        Param("clip_min", "float", 0.0, doc="lower clip bound"),
        Param("clip_max", "float", 255.0, doc="upper clip bound"),
        Param("hed", "bool", False, doc="stain-space (haematoxylin/eosin/DAB) jitter, Tellez et al."),
        Param("hed_alpha", "float", 0.05, min=0.0, max=1.0, max_inclusive=False,
              doc="stain scale alpha ~ U[1-hed_alpha, 1+hed_alpha] per sample and stain"),
        Param("hed_beta", "float", 0.01, min=0.0, doc="stain shift beta ~ U[-hed_beta, hed_beta] per sample and stain"),
        _probability("hed_p", "probability that a sample gets the stain jitter"),
        Param("max_value", "float", 255.0, min=0.0, min_inclusive=False,
              doc="intensity of white in the input (optical density reference for hed)"),
        Param("channel_order", "str", "RGB", choices=("RGB", "BGR"),
              doc="channel order of the input images (hed needs to know which channel is red)"),
        Param("seed", "int", None, optional=True, min=0, doc="random seed; None draws fresh entropy"),
        Param("test_augment", "bool", False, doc="also augment in the TEST phase"),
    ],
    ordered_pairs=[
        ("angle_min", "angle_max"),
        ("color_a_min", "color_a_max"),
        ("color_b_min", "color_b_max"),
        ("clip_min", "clip_max"),
    ],
    name="augment",
)
"""Parameters of the augmentation layer and :class:`~caffe_layers.transforms.BatchAugmenter`."""

PATCH_DATA_SCHEMA = Schema(
    [
        Param("source", "str", REQUIRED, doc="list file of image/label pairs"),
        Param("root", "str", None, optional=True,
              doc="base directory of relative paths in the list file (None: the list file's directory)"),
        Param("batch_size", "int", 8, min=1, doc="samples per batch"),
        Param("patch_size", "int", 128, min=1, doc="side of the square patches, pixels"),
        Param("shuffle", "bool", True, doc="shuffle the list every epoch"),
        Param("seed", "int", None, optional=True, min=0, doc="random seed; None draws fresh entropy"),
    ],
    nested={"augment": AUGMENT_SCHEMA},
    name="patch data",
)
"""Parameters of the patch data layer; ``augment`` (None: no augmentation) uses :data:`AUGMENT_SCHEMA`."""

MEAN_SUBTRACT_SCHEMA = Schema(
    [Param("mean_file", "str", REQUIRED, doc="Caffe mean file (.binaryproto), 1×C×H×W or C×H×W")],
    name="mean subtract",
)
"""Parameters of :class:`~caffe_layers.mean_subtract.MeanSubtractLayer`."""
