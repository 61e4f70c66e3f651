"""Declared parameters: :class:`Param` (one key) and :class:`Schema` (a set of keys, checked as a whole).

A parsed ``param_str`` (:mod:`caffe_layers.param_str`) is checked against a declared
:class:`Schema`, which fills in defaults and turns every mistake (typo in a key, wrong type,
value out of range, min above max) into a :class:`~caffe_layers.param_str.ParamError` that
names the layer, the key, the offending value and what would have been allowed. Numbers must
fit the computation: int parameters are 64-bit; float parameters must not exceed
:data:`FLOAT32_MAX` in magnitude, and those that must not be 0 must not be below
:data:`FLOAT32_TINY` either.

Each schema lives beside the code that owns it: ``AUGMENT_SCHEMA`` in
:mod:`caffe_layers.transforms.schema`, ``PATCH_DATA_SCHEMA`` and ``MEAN_SUBTRACT_SCHEMA`` in
:mod:`caffe_layers.patches`, ``MODEL_CARD_SCHEMA`` in :mod:`caffe_layers.model_card`
(:mod:`caffe_layers.params` re-exports them all).

Examples
--------
>>> schema = Schema([Param("rotate", "bool", False), Param("scale", "float", 1.0, min=0.0)])
>>> load_params('{"scale": .5}', schema)
{'rotate': False, 'scale': 0.5}
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .param_str import ParamError, _clip, _key_text, _quote, _short_repr, parse_param_str

__all__ = [
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "INT64_MAX",
    "INT64_MIN",
    "INT_MAX",
    "MAX_FLOATS_ITEMS",
    "REQUIRED",
    "Param",
    "Schema",
    "load_params",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""Range of every int parameter unless its :class:`Param` declares a narrower one."""

INT_MAX = 2**31 - 1
"""Largest number of elements in a Caffe blob (``Blob::Reshape`` checks ``count <= INT_MAX``)."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""The layers compute in float32, so a float parameter's magnitude must not exceed
``FLOAT32_MAX`` (it would become inf); a parameter that must not be 0 (e.g. ``> 0``) must also
be at least ``FLOAT32_TINY``, float32's smallest normal number (a smaller one becomes 0 or a
subnormal there). Where 0 is allowed, a tiny value is accepted: it acts like 0."""


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
_KINDS = ("bool", "int", "float", "str", "floats")
#: Most items a ``floats`` parameter (a list of numbers, e.g. per-channel means) may hold.
MAX_FLOATS_ITEMS = 64


def _format_number(value: float) -> str:
    if value == INT64_MAX:
        return "2**63-1"
    if value == INT64_MIN:
        return "-2**63"
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
        also accepts ints; ``int`` also accepts integral floats such as ``8.0``. An ``int``
        is limited to 64 bits (:data:`INT64_MIN` to :data:`INT64_MAX`, the default bounds);
        a ``float`` to magnitudes up to :data:`FLOAT32_MAX`, and, if its range excludes 0,
        from :data:`FLOAT32_TINY` (what float32 computation can hold).
    default : object
        Value used when the key is absent; :data:`REQUIRED` makes the key mandatory.
    optional : bool
        Whether None is an accepted value.
    min, max : float or None
        Bounds for numeric kinds (None: unbounded for ``float``, the 64-bit range for ``int``).
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
        if (self.min is not None or self.max is not None) and self.kind not in ("int", "float", "floats"):
            raise ValueError(f"Param {self.name!r}: min/max only apply to int, float and floats")
        if self.kind == "int":
            if self.min is None:
                object.__setattr__(self, "min", INT64_MIN)
            if self.max is None:
                object.__setattr__(self, "max", INT64_MAX)
            if self.min < INT64_MIN or self.max > INT64_MAX:
                raise ValueError(f"Param {self.name!r}: int bounds must lie within 64 bits")
        if self.kind in ("float", "floats"):
            for bound in (self.min, self.max):
                if bound is not None and not abs(bound) <= FLOAT32_MAX:
                    raise ValueError(f"Param {self.name!r}: float bounds must lie within float32")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Param {self.name!r}: min {self.min} > max {self.max}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.default is not REQUIRED:
            self.check(self.default, where=f"schema default of {self.name!r}")

    def check_zero_allowed(self) -> bool:
        """Whether 0 lies in this numeric parameter's range (and choices)."""
        below = self.min is not None and (self.min > 0 or (self.min == 0 and not self.min_inclusive))
        above = self.max is not None and (self.max < 0 or (self.max == 0 and not self.max_inclusive))
        return not (below or above) and (self.choices is None or 0 in self.choices)

    @property
    def required(self) -> bool:
        """Whether the key has no default and must be given."""
        return self.default is REQUIRED

    def type_description(self) -> str:
        """Type as shown to users, e.g. ``'float'`` or ``'int or None'``."""
        kind = "list of floats" if self.kind == "floats" else self.kind
        return f"{kind} or None" if self.optional else kind

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
                f"invalid value for {_quote(key)} in {where}: {_clip(key)}={_short_repr(value)} {problem}",
                where=where,
                key=key,
                value=value,
            )

        if value is None:
            if self.optional:
                return None
            raise fail(f"is not allowed; expected a {self.kind}")

        if self.kind == "floats":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise fail(f"has type {type(value).__name__}; expected a list of numbers, e.g. [104, 117, 123]")
            if not 1 <= len(value) <= MAX_FLOATS_ITEMS:
                raise fail(f"has {len(value)} items; expected 1 to {MAX_FLOATS_ITEMS}")
            item = dataclasses.replace(self, kind="float", default=REQUIRED, optional=False)
            return tuple(item.check(entry, where, f"{key}[{index}]") for index, entry in enumerate(value))

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
            # ``number`` is exact: an int stays an int (float() of a huge int overflows), and
            # Python compares ints with floats exactly, so the bounds below need no conversion.
            if isinstance(value, numbers.Integral):
                number: int | float = int(value)
            else:
                try:
                    number = float(value)
                except (OverflowError, ValueError):  # e.g. a Fraction beyond float
                    raise fail(f"is out of range; expected a finite {self.kind}") from None
                if not math.isfinite(number):
                    raise fail(f"is not finite; expected a finite {self.kind}")
                if self.kind == "int" and not number.is_integer():
                    raise fail("is not an integer; expected an int")
            below = self.min is not None and (
                number < self.min or (number == self.min and not self.min_inclusive)
            )
            above = self.max is not None and (
                number > self.max or (number == self.max and not self.max_inclusive)
            )
            if below or above:
                raise fail(f"is out of range; allowed range: {self.range_description()}")
            if self.kind == "float" and abs(number) > FLOAT32_MAX:
                raise fail(f"is out of range for float32 computation; allowed magnitudes: up to {FLOAT32_MAX:.8g}")
            if self.kind == "float" and 0 < abs(number) < FLOAT32_TINY and not self.check_zero_allowed():
                raise fail(
                    "is out of range for float32 computation, where it would be 0 or subnormal; "
                    f"allowed: {self.range_description()} and a magnitude of at least {FLOAT32_TINY:.8g}"
                )
            converted = int(number) if self.kind == "int" else float(number)

        if self.choices is not None and converted not in self.choices:
            raise fail(f"is not allowed; expected {self.range_description()}")
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
    size_limits : iterable of (factors, limit, what)
        Products that must not exceed ``limit``: ``factors`` are names of int parameters and
        constant ints, ``what`` says what the product counts. E.g. ``(("batch_size", 3,
        "patch_size", "patch_size"), INT_MAX, "elements in the N×3×P×P data blob")``.
    """

    def __init__(
        self,
        params: Iterable[Param],
        ordered_pairs: Iterable[tuple[str, str]] = (),
        nested: Mapping[str, Schema] | None = None,
        name: str = "",
        size_limits: Iterable[tuple[tuple[str | int, ...], int, str]] = (),
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
        self.size_limits: tuple[tuple[tuple[str | int, ...], int, str], ...] = tuple(
            (tuple(factors), int(limit), str(what)) for factors, limit, what in size_limits
        )
        for factors, _, _ in self.size_limits:
            for factor in factors:
                if isinstance(factor, str) and (factor not in self.params or self.params[factor].kind != "int"):
                    raise ValueError(f"size limit refers to {factor!r}, not an int parameter")
                if not isinstance(factor, (str, int)) or isinstance(factor, bool):
                    raise ValueError(f"size limit factor {factor!r} is neither a name nor an int")
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
            what = f"{_quote(_prefix.rstrip('.'))} in {where}" if _prefix else where
            raise ParamError(
                f"{what} must be a dict of parameters, got {type(raw).__name__} {_short_repr(raw)}",
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

        for factors, limit, what in self.size_limits:
            values = [validated[factor] if isinstance(factor, str) else factor for factor in factors]
            if any(value is None for value in values):
                continue
            product = math.prod(values)
            if product > limit:
                names = list(dict.fromkeys(factor for factor in factors if isinstance(factor, str)))
                raise ParamError(
                    f"invalid values in {where}: "
                    + ", ".join(f"{_prefix}{name}={validated[name]!r}" for name in names)
                    + f" give {'*'.join(map(str, values))} = {product} {what}; at most {limit} "
                    "are possible",
                    where=where,
                    key=_prefix + names[0],
                    value=validated[names[0]],
                )
        return validated

    def _raise_unknown(self, key: Any, value: Any, where: str, prefix: str) -> None:
        dotted = prefix + _key_text(key)
        valid = self.keys
        # A key much longer than every valid one has no close match (and a long one would
        # only make difflib slower).
        close = difflib.get_close_matches(_key_text(key)[:64], valid, n=1, cutoff=0.6)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ";"
        raise ParamError(
            f"unknown key {_quote(dotted)} in {where}{hint} valid keys: "
            + ", ".join(prefix + k for k in valid)
            + f" (got {_clip(dotted)}={_short_repr(value)})",
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
        lines.extend(self._notes())
        return "\n".join(line_.rstrip() for line_ in lines)

    def describe_markdown(self) -> str:
        """The table of :meth:`describe` as a Markdown table (the generated docs pages use it)."""
        def cell(text):  # Markdown-inert: no table breaks, emphasis or HTML from key text
            for char in "\\|*_":
                text = text.replace(char, "\\" + char)
            return text.replace("<", "&lt;")

        lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        lines.extend(f"| `{key}` | {cell(kind)} | `{default.replace('|', '/')}` | {cell(allowed)} | {cell(doc)} |"
                     for key, kind, default, allowed, doc in self._rows())
        notes = self._notes()
        if notes:
            lines.append("")
            lines.extend(f"- {note}" for note in notes)
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        """The constraints between keys and the number limits, one line each."""
        lines = []
        pairs = [f"{low} <= {high}" for low, high in self.ordered_pairs]
        pairs += [f"{' * '.join(map(str, factors))} <= {limit} ({what})" for factors, limit, what in self.size_limits]
        for nested_name, schema in self.nested.items():
            pairs += [f"{nested_name}.{low} <= {nested_name}.{high}" for low, high in schema.ordered_pairs]
        if pairs:
            lines.append("constraints: " + "; ".join(pairs))
        kinds = {param.kind for param in self._all_params()}
        if "int" in kinds or "float" in kinds:
            limits = []
            if "int" in kinds:
                limits.append("ints are 64-bit")
            if "float" in kinds:
                limits.append(f"float magnitudes are at most {FLOAT32_MAX:.8g}, and at least "
                              f"{FLOAT32_TINY:.8g} where 0 is not allowed (float32)")
            lines.append("number limits: " + "; ".join(limits))
        return lines

    def _all_params(self) -> list[Param]:
        params = list(self.params.values())
        for schema in self.nested.values():
            params.extend(schema._all_params())
        return params

    def __repr__(self) -> str:
        return f"Schema(name={self.name!r}, keys={list(self.keys)!r})"


def load_params(param_str: str | bytes | None, schema: Schema, where: str = "param_str") -> dict:
    """Parse ``param_str`` and validate it with ``schema``; see :func:`parse_param_str`."""
    return schema.validate(parse_param_str(param_str, where), where)
