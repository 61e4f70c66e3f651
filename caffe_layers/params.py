"""Parsing and validation of layer parameters (the one parser used by every layer and tool).

Caffe hands a Python layer its configuration as a single string, ``python_param.param_str``.
Over the years these strings have been written as JSON, as YAML and as Python dict literals
(``{"rotate": True, "color_a_min": .3}``), so :func:`parse_param_str` accepts all three --
without ever calling ``eval``; :func:`format_param_str` writes one back. The parsed dict is then checked against a declared
:class:`Schema`, which fills in defaults and turns every mistake (typo in a key, wrong type,
value out of range, min above max) into a :class:`ParamError` that names the layer, the key,
the offending value and what would have been allowed.

Every input is handled in bounded time and memory: a param_str longer than
:data:`MAX_PARAM_STR_CHARS` or nested deeper than :data:`MAX_PARAM_DEPTH` is refused, YAML
anchors and aliases (which can expand a few hundred bytes into gigabytes) are refused, a key
given twice is refused in every format, and the values quoted in error messages are cut to a
few hundred characters before the message is built. Numbers must fit the computation: int
parameters are 64-bit; float parameters must not exceed :data:`FLOAT32_MAX` in magnitude, and
those that must not be 0 must not be below :data:`FLOAT32_TINY` either.

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
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import yaml

__all__ = [
    "ACCEPTED_FORMATS",
    "AUGMENT_SCHEMA",
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "INT64_MAX",
    "INT64_MIN",
    "INT_MAX",
    "MAX_PARAM_DEPTH",
    "MAX_PARAM_STR_CHARS",
    "MEAN_SUBTRACT_SCHEMA",
    "MODEL_CARD_SCHEMA",
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

MAX_PARAM_STR_CHARS = 64 * 1024
"""Longest accepted param_str, in characters (real ones are a few hundred)."""

MAX_PARAM_DEPTH = 32
"""Deepest accepted nesting of dicts and lists (a layer's parameters use 2 or 3 levels)."""

# Longest decimal integer read from a param_str: Python's own limit for int('...') (a
# decimal conversion is quadratic in the number of digits, hence the limit), fixed here so
# the parser does not depend on sys.set_int_max_str_digits().
_MAX_INT_DIGITS = 4300

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


def _clip(text: str, limit: int = _MAX_QUOTED_CHARS) -> str:
    """``text`` cut to ``limit`` characters (plus ``...``), unquoted."""
    return text if len(text) <= limit else text[:limit] + "..."


class _UnreadableInt:
    """Stand-in for a decimal integer with more than :data:`_MAX_INT_DIGITS` digits.

    The JSON and YAML readers return it instead of converting the digits (which Python
    refuses, and which would take time quadratic in their number); the parser then rejects
    it with a :class:`ParamError` naming the key. It never leaves :func:`parse_param_str`.
    """

    def __init__(self, text: str):
        self.text = text
        self.digits = len(text.lstrip("+-").replace("_", ""))

    def __repr__(self) -> str:
        return f"<int with {self.digits} digits>"


class _DuplicateKeyDict(dict):
    """A parsed mapping in which ``duplicate_key`` was given more than once.

    Returned by the JSON and YAML readers so that the parser can name the dotted key; it
    never leaves :func:`parse_param_str`.
    """

    duplicate_key: Any = None


def _int_repr(value: int, limit: int) -> str:
    # Never str() an int of thousands of digits: slow, and refused by Python above 4300.
    if value.bit_length() <= 3 * limit:  # at most ~0.9 * limit digits
        return repr(value)
    digits = int(value.bit_length() * 0.30102999566398120) + 1
    if 10 ** (digits - 1) > abs(value):
        digits -= 1
    return f"<{'negative ' if value < 0 else ''}int with {digits} digits>"


def _repr_pieces(value: Any, limit: int, active: set) -> Iterator[str]:
    """Pieces of ``repr(value)``, generated lazily so the caller can stop at a budget."""
    if isinstance(value, (str, bytes, bytearray)):
        yield repr(value[: limit + 1])
    elif isinstance(value, bool) or value is None or isinstance(value, (float, complex)):
        yield repr(value)
    elif isinstance(value, int):
        yield _int_repr(value, limit)
    elif isinstance(value, (Mapping, list, tuple, set, frozenset)):
        if id(value) in active:  # a container that contains itself, as repr() shows it
            yield "{...}" if isinstance(value, Mapping) else "[...]"
            return
        active.add(id(value))
        try:
            if isinstance(value, Mapping):
                opening, closing, items = "{", "}", value.items()
            elif isinstance(value, list):
                opening, closing, items = "[", "]", value
            elif isinstance(value, tuple):
                opening, closing, items = "(", ",)" if len(value) == 1 else ")", value
            elif not value:
                opening, closing, items = type(value).__name__ + "(", ")", ()
            elif isinstance(value, frozenset):
                opening, closing, items = "frozenset({", "})", value
            else:
                opening, closing, items = "{", "}", value
            yield opening
            for index, item in enumerate(items):
                if index:
                    yield ", "
                if isinstance(value, Mapping):
                    yield from _repr_pieces(item[0], limit, active)
                    yield ": "
                    yield from _repr_pieces(item[1], limit, active)
                else:
                    yield from _repr_pieces(item, limit, active)
            yield closing
        finally:
            active.discard(id(value))
    elif isinstance(value, np.ndarray) and value.size > 16:
        yield f"<ndarray shape={value.shape} dtype={value.dtype}>"
    else:
        # Scalars from the parsers (datetime, Ellipsis, numpy numbers) have short reprs; any
        # other object is cut below, and a repr that fails does not hide the real error.
        try:
            yield repr(value)[: limit + 1]
        except Exception:  # noqa: BLE001 - a broken __repr__ of a caller's object
            yield f"<{type(value).__name__} object>"


def _short_repr(value: Any, limit: int = _MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, built within that budget.

    Containers are walked only as far as the budget reaches, so a huge or deeply nested
    value (or one that contains itself) costs no more than a small one; huge ints are shown
    as ``<int with N digits>``.
    """
    pieces = []
    length = 0
    for piece in _repr_pieces(value, limit, set()):
        pieces.append(piece)
        length += len(piece)
        if length > limit:
            return "".join(pieces)[:limit] + "..."
    return "".join(pieces)


def _key_text(key: Any) -> str:
    """A parsed key as text for a dotted key (non-string keys as their short repr)."""
    return key if isinstance(key, str) else _short_repr(key)


def _dotted(path: tuple) -> str:
    """``('augment', 'x', _ListIndex(0))`` -> ``'augment.x[0]'``."""
    text = ""
    for part in path:
        if isinstance(part, _ListIndex):
            text += f"[{int(part)}]"
        else:
            text += ("." if text else "") + _key_text(part)
    return text


class _ListIndex(int):
    """Position in a list or tuple, in a path (a dict key 0 is a plain int)."""


def _too_deep(where: str, text: str) -> ParamError:
    return ParamError(
        f"{where} is nested too deeply: at most {MAX_PARAM_DEPTH} levels of dicts and lists "
        f"are accepted; {_quote(text)}",
        where=where,
        value=text,
    )


def _duplicate(where: str, text: str, path: tuple) -> ParamError:
    key = _dotted(path)
    return ParamError(
        f"duplicate key {_quote(key)} in {where}: each key may be given only once; {_quote(text)}",
        where=where,
        key=key,
        value=text,
    )


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


class _ParamYamlLoader(_Yaml12FloatLoader):
    """The YAML reader of :func:`parse_param_str`: :class:`_Yaml12FloatLoader` that also

    * refuses anchors and aliases (``&a`` / ``*a``): an alias makes the parsed value share
      the aliased one, so a few hundred bytes can stand for a structure of billions of
      elements that any walk over it -- e.g. quoting it in an error message -- expands;
    * refuses nesting deeper than :data:`MAX_PARAM_DEPTH` (the composer is recursive);
    * marks a mapping with a repeated key (PyYAML silently keeps the last value);
    * reads a decimal integer of more than :data:`_MAX_INT_DIGITS` digits as an
      :class:`_UnreadableInt` instead of failing (or spending quadratic time) on it.
    """

    def __init__(self, stream: str, where: str):
        super().__init__(stream)
        self.param_where = where
        self.param_text = stream
        self.param_depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind, sigil = ("alias", "*") if isinstance(event, yaml.AliasEvent) else ("anchor", "&")
            mark = event.start_mark
            raise ParamError(
                f"YAML anchors and aliases are not accepted in {self.param_where}: found the "
                f"{kind} {_quote(sigil + str(event.anchor))} at line {mark.line + 1}, column "
                f"{mark.column + 1}; write each value out in full",
                where=self.param_where,
                value=self.param_text,
            )
        collection = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if collection:
            self.param_depth += 1
            if self.param_depth > MAX_PARAM_DEPTH:
                raise _too_deep(self.param_where, self.param_text)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self.param_depth -= 1

    def _repeated_key(self, node: yaml.MappingNode) -> Any:
        """The first scalar key given twice in ``node`` (or in a mapping merged into it with
        ``<<``, each checked on its own: a key overriding a merged one is YAML's meaning of
        ``<<``), or ``_NO_KEY``."""
        pending = [node]
        while pending:
            mapping = pending.pop(0)
            seen = set()
            for key_node, value_node in mapping.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    pending.extend(item for item in merged if isinstance(item, yaml.MappingNode))
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a collection key: unhashable, PyYAML refuses it
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        return key
                    seen.add(key)
                except TypeError:
                    continue
        return _NO_KEY

    def construct_checked_map(self, node):
        repeated = self._repeated_key(node) if isinstance(node, yaml.MappingNode) else _NO_KEY
        data: dict = {} if repeated is _NO_KEY else _DuplicateKeyDict()
        if repeated is not _NO_KEY:
            data.duplicate_key = repeated
        yield data
        data.update(self.construct_mapping(node))

    def construct_checked_int(self, node):
        text = str(self.construct_scalar(node))
        digits = text.replace("_", "").lstrip("+-")
        # Only base 10 is slow and limited (0x/0b/octal/sexagesimal convert in linear time).
        if len(digits) > _MAX_INT_DIGITS and digits.isdigit() and not digits.startswith("0"):
            return _UnreadableInt(text)
        return super().construct_yaml_int(node)


_ParamYamlLoader.add_constructor("tag:yaml.org,2002:map", _ParamYamlLoader.construct_checked_map)
_ParamYamlLoader.add_constructor("tag:yaml.org,2002:int", _ParamYamlLoader.construct_checked_int)

_NO_KEY = object()

# Failures of a reader on text it cannot read; anything else is a bug and propagates.
# PyYAML's constructors for explicit tags fail with plain exceptions on odd scalars:
# KeyError ('!!bool x'), IndexError ('!!int ' with nothing after it), AttributeError
# ('!!timestamp x'), ValueError, OverflowError (a sexagesimal '!!float' beyond float).
_READ_ERRORS = (
    ValueError, SyntaxError, TypeError, ArithmeticError, LookupError, AttributeError, MemoryError,
    RecursionError, yaml.YAMLError,
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
        with string keys; if it is longer than :data:`MAX_PARAM_STR_CHARS` characters or
        nested deeper than :data:`MAX_PARAM_DEPTH`; if a dict has a key twice; if it uses
        YAML anchors or aliases; if an integer has more than 4300 digits.
    """
    if text is None:
        return {}
    if isinstance(text, (bytes, bytearray)):
        if len(text) > 4 * MAX_PARAM_STR_CHARS:  # cannot be short enough once decoded
            raise ParamError(
                f"{where} is too long: {len(text)} bytes; at most {MAX_PARAM_STR_CHARS} "
                "characters are accepted",
                where=where,
                value=text,
            )
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParamError(f"{where} is not valid UTF-8: {exc}", where=where, value=text) from exc
    if not isinstance(text, str):
        raise ParamError(
            f"{where} must be a string, got {type(text).__name__} {_short_repr(text)}; {ACCEPTED_FORMATS}",
            where=where,
            value=text,
        )
    if len(text) > MAX_PARAM_STR_CHARS:
        raise ParamError(
            f"{where} is too long: {len(text)} characters; at most {MAX_PARAM_STR_CHARS} are "
            f"accepted; {_quote(text)}",
            where=where,
            value=text,
        )
    if not text.strip():
        return {}

    parsed: Any
    errors = []
    hints = []
    stripped = text.strip()
    for name, parse in (("json.loads", _parse_json), ("ast.literal_eval", _parse_literal),
                        ("yaml.safe_load", _parse_yaml)):
        try:
            parsed = parse(stripped, where)
            break
        except ParamError:
            raise
        except _READ_ERRORS as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            errors.append(f"{name}: {_clip(message)}")
            if isinstance(exc, (RecursionError, MemoryError)) or "too many nested" in message:
                hint = f"it is nested too deeply (at most {MAX_PARAM_DEPTH} levels of dicts and lists)"
            elif "integer string conversion" in message:
                hint = f"an integer in it has more than {_MAX_INT_DIGITS} digits"
            else:
                continue
            if hint not in hints:
                hints.append(hint)
    else:
        raise ParamError(
            f"cannot parse {where} {_quote(text)}; "
            + "".join(hint + "; " for hint in hints)
            + f"{ACCEPTED_FORMATS} (YAML error: {errors[-1].split(': ', 1)[-1]})",
            where=where,
            value=text,
        )

    _check_parsed(parsed, where, text)
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
            f"{where} keys must be strings, got key {_short_repr(bad_keys[0])} in {_quote(text)}",
            where=where,
            key=_key_text(bad_keys[0]),
            value=text,
        )
    return parsed


def _check_parsed(parsed: Any, where: str, text: str) -> None:
    """Reject what a reader marked (repeated keys, unreadable ints) and too deep nesting.

    Walks the parsed value without recursion, in the order of the text, so the first
    problem in the text is the one reported, with its dotted key.
    """
    pending = [(parsed, 0, ())]
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, _UnreadableInt):
            key = _dotted(path)
            what = f"invalid value for {_quote(key)} in {where}: {_clip(key)}=" if path else f"{where}: "
            raise ParamError(
                f"{what}{value!r} is too long to read; integers may have at most {_MAX_INT_DIGITS} digits",
                where=where,
                key=key or None,
                value=value.text,
            )
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            continue
        depth += 1
        if depth > MAX_PARAM_DEPTH:
            raise _too_deep(where, text)
        if isinstance(value, _DuplicateKeyDict):
            raise _duplicate(where, text, path + (value.duplicate_key,))
        if isinstance(value, dict):
            children = []
            for key, item in value.items():
                if isinstance(key, _UnreadableInt):
                    children.append((key, depth, path))
                children.append((item, depth, path + (key,)))
        elif isinstance(value, (list, tuple)):
            children = [(item, depth, path + (_ListIndex(index),)) for index, item in enumerate(value)]
        else:
            children = [(item, depth, path) for item in value]
        pending.extend(reversed(children))


def _parse_json(text: str, where: str) -> Any:
    def pairs_to_dict(pairs):
        result = {}
        repeated = _NO_KEY
        for key, value in pairs:
            if key in result and repeated is _NO_KEY:
                repeated = key
            result[key] = value
        if repeated is _NO_KEY:
            return result
        marked = _DuplicateKeyDict(result)
        marked.duplicate_key = repeated
        return marked

    def to_int(digits: str):
        if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
            return _UnreadableInt(digits)
        return int(digits)

    return json.loads(text, object_pairs_hook=pairs_to_dict, parse_int=to_int)


_CONTAINER_NODES = (ast.Dict, ast.List, ast.Tuple, ast.Set)


def _parse_literal(text: str, where: str) -> Any:
    """``ast.literal_eval(text)``, refusing too deep nesting and keys given twice.

    ``literal_eval`` itself recurses into containers and builds dicts that silently keep the
    last of repeated keys, so the syntax tree is checked first, without recursion.
    """
    with warnings.catch_warnings():
        # Text that is not Python at all (YAML, say) must not print "invalid escape sequence".
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        tree = ast.parse(text, mode="eval")
    repeated_path = None
    pending = [(tree.body, 0, ())]
    while pending:
        node, depth, path = pending.pop()
        if isinstance(node, _CONTAINER_NODES):
            depth += 1
            if depth > MAX_PARAM_DEPTH:
                raise _too_deep(where, text)
        children = []
        if isinstance(node, ast.Dict):
            seen = set()
            for key_node, value_node in zip(node.keys, node.values):
                key = key_node.value if isinstance(key_node, ast.Constant) else _NO_KEY
                if key is not _NO_KEY:
                    if key in seen and repeated_path is None:
                        repeated_path = path + (key,)
                    seen.add(key)
                if key_node is not None:
                    children.append((key_node, depth, path))
                children.append((value_node, depth, path + ("?" if key is _NO_KEY else key,)))
        elif isinstance(node, (ast.List, ast.Tuple)):
            children = [(item, depth, path + (_ListIndex(index),)) for index, item in enumerate(node.elts)]
        else:
            children = [(child, depth, path) for child in ast.iter_child_nodes(node)]
        pending.extend(reversed(children))
    value = ast.literal_eval(tree)
    if repeated_path is not None:  # only now: the text is a Python literal
        raise _duplicate(where, text, repeated_path)
    return value


def _parse_yaml(text: str, where: str) -> Any:
    loader = _ParamYamlLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
        return "\n".join(line_.rstrip() for line_ in lines)

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
        Param("stain_angle", "float", 0.0, min=0.0, max=30.0,
              doc="hue jitter with hed: turn the H and E optical-density vectors by U[-stain_angle, "
                  "stain_angle] degrees each, per sample, in their plane (0: off)"),
        Param("max_value", "float", 255.0, min=0.0, min_inclusive=False,
              doc="intensity of white in the input (optical density reference for hed)"),
        Param("channel_order", "str", "RGB", choices=("RGB", "BGR"),
              doc="channel order of the input images (hed needs to know which channel is red)"),
        Param("seed", "int", None, optional=True, min=0, max=INT64_MAX,
              doc="random seed for numpy.random.default_rng, 0 to 2**63-1; None draws fresh entropy"),
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
        Param("batch_size", "int", 8, min=1, max=4096,
              doc="samples per batch (at most 4096, and batch_size*3*patch_size**2 <= INT_MAX)"),
        Param("patch_size", "int", 128, min=1, max=8192,
              doc="side of the square patches, pixels (at most 8192, and batch_size*3*patch_size**2 <= INT_MAX)"),
        Param("shuffle", "bool", True, doc="shuffle the list every epoch"),
        Param("seed", "int", None, optional=True, min=0, max=INT64_MAX,
              doc="random seed for numpy.random.default_rng, 0 to 2**63-1; None draws fresh entropy"),
    ],
    nested={"augment": AUGMENT_SCHEMA},
    name="patch data",
    # Caffe refuses a blob of more than INT_MAX elements; the data top is N×3×P×P.
    size_limits=[(("batch_size", 3, "patch_size", "patch_size"), INT_MAX,
                  "elements in the N×3×P×P data blob (Caffe's limit is INT_MAX)")],
)
"""Parameters of the patch data layer; ``augment`` (None: no augmentation) uses :data:`AUGMENT_SCHEMA`."""

MEAN_SUBTRACT_SCHEMA = Schema(
    [Param("mean_file", "str", REQUIRED, doc="Caffe mean file (.binaryproto), 1×C×H×W or C×H×W")],
    name="mean subtract",
)
"""Parameters of :class:`~caffe_layers.mean_subtract.MeanSubtractLayer`."""

MODEL_CARD_SCHEMA = Schema(
    [
        Param("input_blob", "str", "data", doc="the deploy net's input blob"),
        Param("channel_order", "str", "RGB", choices=("RGB", "BGR"),
              doc="channel order the net was trained on (Caffe's OpenCV-based tools and DIGITS: BGR)"),
        Param("raw_scale", "float", 1.0, min=0.0, min_inclusive=False,
              doc="step 1: pixel values 0-255 are multiplied by this (1/255 for a net trained on 0-1 images)"),
        Param("mean_file", "str", None, optional=True,
              doc="step 2: a .binaryproto mean (net channel order, raw-scaled units) subtracted; "
                  "relative to the card's folder"),
        Param("mean_value", "floats", None, optional=True, min=-1e6, max=1e6,
              doc="step 2, or: per-channel means (net channel order, raw-scaled units) subtracted"),
        Param("input_scale", "float", 1.0, min=0.0, min_inclusive=False,
              doc="step 3: multiplied last (transform_param { scale } after its mean)"),
        Param("output_blob", "str", "prob", doc="the blob holding the class map or class scores"),
        Param("output", "str", "probabilities", choices=("probabilities", "scores"),
              doc="probabilities (a softmax) or raw scores (a softmax over channels is applied)"),
        Param("foreground_class", "int", 1, min=0, max=1023, doc="output channel of the nucleus class"),
        Param("patch_classifier", "bool", False,
              doc="the net maps a P×P patch (its input size) to class scores for the centre pixel"),
        Param("patch_stride", "int", 1, min=1, max=256,
              doc="with patch_classifier: classify the patch centred on every this-many-th pixel of each row "
                  "and column and interpolate between them (stride² fewer forward passes; 1: every pixel)"),
        Param("size_multiple", "int", 1, min=1, max=1024, doc="input sides must be multiples of this"),
        Param("mpp", "float", None, optional=True, min=0.0, min_inclusive=False, max=1000.0,
              doc="micrometres per pixel of the images the net was trained on: whole slides are segmented "
                  "at the pyramid level nearest to it"),
    ],
    name="model card",
)
"""Keys of a model card: how to feed a deploy net and read its output (see :mod:`caffe_layers.model_card`)."""
