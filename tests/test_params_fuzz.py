"""Fuzzing of caffe_layers.params: whatever the param_str, the parser and the schema either
return a dict or raise a ParamError with a message of bounded length -- never another
exception, never a huge message.

The example counts keep the whole file at a few seconds (generating nested structures and
PyYAML, in pure Python, are the slow parts); raise ``max_examples`` locally when changing the
parser.
"""

import json
import math

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from caffe_layers.params import AUGMENT_SCHEMA, MAX_PARAM_DEPTH, PATCH_DATA_SCHEMA, ParamError, load_params, parse_param_str

WHERE = "fuzzed param_str"
# Longest message seen is an unknown key (quoted twice, 200 characters each) plus the list of
# valid keys; anything near this bound would be a value quoted without truncation.
MAX_MESSAGE = 1500

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_STRUCTURES = settings(FUZZ, max_examples=30)


def outcome(call, *args):
    """Run ``call``; return the dict, or None for a ParamError (checking its message)."""
    try:
        result = call(*args)
    except ParamError as error:
        message = str(error)
        assert len(message) < MAX_MESSAGE, message[:500]
        assert error.where == WHERE, error.where
        assert WHERE in message
        return None
    assert isinstance(result, dict)
    return result


def check_text(text):
    parsed = outcome(parse_param_str, text, WHERE)
    validated = outcome(load_params, text, AUGMENT_SCHEMA, WHERE)
    if validated is not None:
        assert parsed is not None and set(validated) == set(AUGMENT_SCHEMA.keys)
    outcome(load_params, text, PATCH_DATA_SCHEMA, WHERE)
    return parsed


# Pieces that mean something to at least one of the formats, so random concatenations reach
# past the first syntax error more often than random characters do.
TOKENS = st.sampled_from([
    "{", "}", "[", "]", "(", ")", ",", ":", ": ", "\n", "  ", "- ", "? ", "#", "'", '"', "\\", "&a ", "*a",
    "!!int ", "!!float ", "!!str ", "!!binary ", "!!set ", "!!omap ", "!!python/object ", "<<: ", "---\n",
    "...\n", "%YAML 1.1\n", "|\n", ">\n", "true", "True", "null", "None", "NaN", ".inf", "-Infinity",
    "1", "-0", "0x1f", "0o7", "0b1", "1_000", "1:30", "1e-3", ".5", "1e400", "1e-400", "9" * 30,
    "2001-12-14", "1j", "rotate", "color_a_min", "seed", "augment", "source", "\t", "\x00", "\ufeff",
    "!!bool ", "!!timestamp ", "!!null ", "!!pairs ", "!!seq ", "!!map ",
    "é", "\U0001f600", "\ud800",
])
token_text = st.lists(TOKENS, max_size=30).map("".join)

KEYS = st.one_of(st.sampled_from(list(AUGMENT_SCHEMA.keys) + list(PATCH_DATA_SCHEMA.keys)), st.text(max_size=8))
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**4000, 10**300, 0]),
    st.floats(),
    st.floats(width=32),
    st.sampled_from([3.4028235e38, 3.5e38, 1.1754944e-38, 1e-39, 5e-324, 1e308, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=10))
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=12,
)
PARAM_DICTS = st.dictionaries(KEYS, STRUCTURES, max_size=8)


def depth(value):
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def same(a, b):
    """Equality that treats NaN as equal to itself and lists as tuples (Python literals)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@FUZZ
@given(st.text(max_size=200))
@example("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]")
@example('{"seed": ' + "9" * 5000 + "}")
@example("[" * 5000)
def test_random_text(text):
    check_text(text)


@FUZZ
@given(token_text)
def test_random_token_soup(text):
    check_text(text)


@FUZZ
@given(st.binary(max_size=100))
def test_random_bytes(data):
    check_text(data)


@FUZZ_STRUCTURES
@given(PARAM_DICTS)
def test_random_structures_as_json(params):
    text = json.dumps(params)
    parsed = check_text(text)
    if depth(params) <= MAX_PARAM_DEPTH:
        # JSON is read first and exactly (dicts from json.dumps have no repeated keys).
        assert parsed is not None and same(parsed, params)


@FUZZ_STRUCTURES
@given(PARAM_DICTS)
def test_random_structures_as_python_literal(params):
    text = repr(params)
    parsed = check_text(text)
    if parsed is not None and "nan" not in text and "inf" not in text:
        assert same(parsed, params)


@FUZZ_STRUCTURES
@given(PARAM_DICTS)
def test_random_structures_as_yaml(params):
    try:
        text = yaml.safe_dump(params, default_flow_style=None)
    except (yaml.YAMLError, ValueError):  # an int PyYAML itself cannot write
        return
    check_text(text)


@FUZZ_STRUCTURES
@given(PARAM_DICTS)
def test_random_structures_validated_directly(params):
    outcome(AUGMENT_SCHEMA.validate, params, WHERE)
    outcome(PATCH_DATA_SCHEMA.validate, dict(params, source="a.txt"), WHERE)


@FUZZ_STRUCTURES
@given(st.dictionaries(st.sampled_from(AUGMENT_SCHEMA.keys), NUMBERS, max_size=6),
       st.sampled_from([json.dumps, repr]))
def test_schema_keys_with_random_numbers(params, dump):
    # Mostly valid keys, so validation rather than parsing is what gets exercised.
    try:
        text = dump(params)
    except ValueError:  # repr/json of an int beyond Python's 4300-digit conversion limit
        return
    check_text(text)
