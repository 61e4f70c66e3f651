"""The safe ``param_str`` reader and writer: the one parser of every layer's and tool's parameters.

Caffe hands a Python layer its configuration as a single string, ``python_param.param_str``.
Over the years these strings have been written as JSON, as YAML and as Python dict literals
(``{"rotate": True, "color_a_min": .3}``), so :func:`parse_param_str` accepts all three --
without ever calling ``eval``; :func:`format_param_str` writes one back. Validation against
declared keys is :mod:`caffe_layers.schema`'s job.

Every input is handled in bounded time and memory: a param_str longer than
:data:`MAX_PARAM_STR_CHARS` or nested deeper than :data:`MAX_PARAM_DEPTH` is refused, YAML
anchors and aliases (which can expand a few hundred bytes into gigabytes) are refused, a key
given twice is refused in every format, and the values quoted in error messages are cut to a
few hundred characters before the message is built.

Examples
--------
>>> parse_param_str('{"rotate": True, "color_a_min": .3}')
{'rotate': True, 'color_a_min': 0.3}
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import yaml

__all__ = [
    "ACCEPTED_FORMATS",
    "MAX_PARAM_DEPTH",
    "MAX_PARAM_STR_CHARS",
    "ParamError",
    "format_param_str",
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
