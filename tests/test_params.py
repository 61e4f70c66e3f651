"""Tests of caffe_layers.params: parsing param_str and validating against the schemas."""

import math
import re
from fractions import Fraction

import numpy as np
import yaml

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_layers.param_str import _short_repr
from caffe_layers.params import (
    AUGMENT_SCHEMA,
    FLOAT32_MAX,
    FLOAT32_TINY,
    INT64_MAX,
    INT_MAX,
    MAX_PARAM_DEPTH,
    MAX_PARAM_STR_CHARS,
    PATCH_DATA_SCHEMA,
    REQUIRED,
    format_param_str,
    Param,
    ParamError,
    Schema,
    load_params,
    parse_param_str,
)

WHERE = "AugmentationLayer param_str"
LEGACY = '{"rotate": True, "color": True, "color_a_max":1.5, "color_a_min": .3}'
EXPECTED = {"rotate": True, "color": True, "color_a_max": 1.5, "color_a_min": 0.3}


def augment(text):
    return load_params(text, AUGMENT_SCHEMA, WHERE)


# --- parsing -------------------------------------------------------------------------------


def test_legacy_python_literal_parses_and_validates():
    assert parse_param_str(LEGACY) == EXPECTED
    params = augment(LEGACY)
    assert params["rotate"] is True and params["color"] is True
    assert params["color_a_min"] == 0.3 and params["color_a_max"] == 1.5
    # Everything else is filled from the defaults.
    assert set(params) == set(AUGMENT_SCHEMA.keys)
    assert params["flip"] is False and params["color_b_min"] == -10.0 and params["seed"] is None


@pytest.mark.parametrize(
    "text",
    [
        '{"rotate": true, "color": true, "color_a_max": 1.5, "color_a_min": 0.3}',  # JSON
        "{rotate: true, color: True, color_a_max: 1.5, color_a_min: .3}",  # YAML flow
        "rotate: true\ncolor: true\ncolor_a_max: 1.5\ncolor_a_min: 0.3\n",  # YAML block
        "{'rotate': True, 'color': True, 'color_a_max': 1.5, 'color_a_min': 3e-1}",  # single quotes
    ],
)
def test_json_yaml_and_literal_forms_agree(text):
    assert parse_param_str(text) == EXPECTED
    assert augment(text) == augment(LEGACY)


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t", b""])
def test_empty_param_str_is_empty_dict(text):
    assert parse_param_str(text) == {}
    assert augment(text) == AUGMENT_SCHEMA.defaults()


def test_literal_tuples_and_none():
    assert parse_param_str("{'size': (3, 4), 'seed': None}") == {"size": (3, 4), "seed": None}


def test_yaml_exponent_without_dot_is_a_float():
    # Plain PyYAML (YAML 1.1) would return the string '1e-3'.
    assert parse_param_str("hed_beta: 1e-3") == {"hed_beta": 0.001}


def test_no_eval():
    malicious = '__import__("os").system("echo hi")'
    with pytest.raises(ParamError, match="must be a dict") as info:
        parse_param_str(malicious, WHERE)
    assert WHERE in str(info.value)
    # YAML reads an unquoted call as plain text; it is never executed.
    assert parse_param_str('{"cwd": __import__("os").getcwd()}') == {"cwd": '__import__("os").getcwd()'}


def test_parsing_never_calls_eval_or_exec(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert parse_param_str(LEGACY) == EXPECTED
    assert parse_param_str("rotate: true") == {"rotate": True}
    with pytest.raises(ParamError):
        parse_param_str('__import__("os").system("echo hi")')


@pytest.mark.parametrize("text", ["[1, 2]", "42", "'rotate'", "true"])
def test_non_dict_is_rejected_naming_the_text_and_formats(text):
    with pytest.raises(ParamError, match="accepted formats") as info:
        parse_param_str(text, WHERE)
    assert text in str(info.value) and WHERE in str(info.value)


def test_unparsable_text_is_rejected():
    with pytest.raises(ParamError, match=r"cannot parse AugmentationLayer param_str '\{rotate: true'") as info:
        parse_param_str("{rotate: true", WHERE)
    assert "JSON" in str(info.value) and "YAML" in str(info.value)


def test_non_string_keys_are_rejected():
    with pytest.raises(ParamError, match="keys must be strings"):
        parse_param_str("{1: 2}", WHERE)


# --- validation errors ---------------------------------------------------------------------


def test_unknown_key_suggests_the_closest():
    message = re.escape(f"unknown key 'colour' in {WHERE}; did you mean 'color'? valid keys: rotate, flip")
    with pytest.raises(ParamError, match=message) as info:
        augment('{"colour": True}')
    error = info.value
    assert error.key == "colour" and error.value is True and error.where == WHERE
    for key in AUGMENT_SCHEMA.keys:
        assert key in str(error)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ParamError, match=r"unknown key 'zzzz'.*; valid keys: rotate"):
        augment("{zzzz: 1}")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"rotate": 1}', r"rotate=1 has type int; expected a bool"),
        ('{"rotate": 0}', r"rotate=0 has type int; expected a bool"),
        ('{"flip": "yes"}', r"flip='yes' has type str; expected a bool"),
        ('{"color_a_min": "0.3"}', r"color_a_min='0.3' has type str; expected a float"),
        ('{"color_a_min": true}', r"color_a_min=True has type bool; expected a float"),
        ('{"seed": 1.5}', r"seed=1.5 is not an integer"),
        ('{"seed": true}', r"seed=True has type bool"),
        ('{"channel_order": "RBG"}', r"channel_order='RBG' is not allowed; expected one of 'RGB', 'BGR'"),
        ('{"rotate": null}', r"rotate=None is not allowed; expected a bool"),
    ],
)
def test_wrong_type(text, pattern):
    with pytest.raises(ParamError, match=pattern) as info:
        augment(text)
    assert WHERE in str(info.value)


def test_int_accepted_for_float_and_integral_float_for_int():
    params = augment('{"color_a_min": 1, "color_a_max": 2, "seed": 7.0}')
    assert params["color_a_min"] == 1.0 and isinstance(params["color_a_min"], float)
    assert params["seed"] == 7 and isinstance(params["seed"], int)


def test_min_above_max():
    with pytest.raises(ParamError, match=re.escape("color_a_min=1.5 > color_a_max=0.3")) as info:
        augment('{"color_a_min": 1.5, "color_a_max": 0.3}')
    assert info.value.key == "color_a_min"
    with pytest.raises(ParamError, match=re.escape("clip_min=300.0 > clip_max=255.0")):
        augment("clip_min: 300")  # compared with the default of the other end


@pytest.mark.parametrize("value", [0, -0.5])
def test_non_positive_scale(value):
    with pytest.raises(ParamError, match=rf"color_a_min={value} is out of range; allowed range: > 0"):
        augment(f'{{"color_a_min": {value}}}')


@pytest.mark.parametrize("key", ["color_p", "hed_p"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probability_outside_unit_interval(key, value):
    with pytest.raises(ParamError, match=rf"{key}={value} is out of range; allowed range: \[0, 1\]"):
        augment(f'{{"{key}": {value}}}')


def test_probability_bounds_are_inclusive():
    assert augment("{color_p: 0, hed_p: 1}")["color_p"] == 0.0


def test_hed_alpha_upper_bound_is_exclusive():
    with pytest.raises(ParamError, match=r"hed_alpha=1\.0 is out of range; allowed range: \[0, 1\)"):
        augment("hed_alpha: 1.0")


@pytest.mark.parametrize("text", ['{"color_b_min": NaN}', "color_b_min: .nan", "clip_max: .inf", '{"angle_max": -Infinity}'])
def test_nan_and_inf_rejected(text):
    with pytest.raises(ParamError, match="is not finite"):
        augment(text)


def test_missing_required_key():
    with pytest.raises(ParamError, match=r"missing required key 'source' in PatchDataLayer param_str") as info:
        load_params('{"batch_size": 4}', PATCH_DATA_SCHEMA, "PatchDataLayer param_str")
    assert info.value.key == "source"


def test_patch_data_defaults_and_nested_augment():
    params = load_params('{"source": "train.txt", "augment": {"rotate": True, "color_a_min": .5}}',
                         PATCH_DATA_SCHEMA, "PatchDataLayer param_str")
    assert params["batch_size"] == 8 and params["patch_size"] == 128 and params["shuffle"] is True
    assert params["root"] is None and params["seed"] is None
    assert params["augment"]["rotate"] is True and params["augment"]["color_a_min"] == 0.5
    assert params["augment"]["color_a_max"] == 1.1
    assert load_params("source: a.txt", PATCH_DATA_SCHEMA)["augment"] is None


@pytest.mark.parametrize(
    "augment_text, pattern",
    [
        ('{"color_a_min": 1.5, "color_a_max": 0.3}', r"augment\.color_a_min=1\.5 > augment\.color_a_max=0\.3"),
        ('{"color_a_min": -1}', r"invalid value for 'augment\.color_a_min'.*augment\.color_a_min=-1 is out of range"),
        ('{"colr": True}', r"unknown key 'augment\.colr'.*did you mean 'augment\.color'\?"),
        ("[1]", r"'augment' in PatchDataLayer param_str must be a dict"),
    ],
)
def test_nested_augment_errors_name_the_dotted_key(augment_text, pattern):
    text = f'{{"source": "a.txt", "augment": {augment_text}}}'
    with pytest.raises(ParamError, match=pattern) as info:
        load_params(text, PATCH_DATA_SCHEMA, "PatchDataLayer param_str")
    assert "PatchDataLayer param_str" in str(info.value)


def test_batch_size_must_be_positive():
    # The range has an upper end since the blob-size limits (see test_patch_data_blob_limits).
    with pytest.raises(ParamError, match=r"batch_size=0 is out of range; allowed range: \[1, 4096\]"):
        load_params("{source: a, batch_size: 0}", PATCH_DATA_SCHEMA)


# --- schema object -------------------------------------------------------------------------


def test_validate_does_not_modify_input_and_returns_new_dict():
    raw = {"rotate": True}
    validated = AUGMENT_SCHEMA.validate(raw, WHERE)
    assert raw == {"rotate": True}
    assert validated is not raw and len(validated) == len(AUGMENT_SCHEMA.keys)


def test_describe_lists_every_key_type_default_and_range():
    table = AUGMENT_SCHEMA.describe()
    for key in AUGMENT_SCHEMA.keys:
        assert key in table
    assert "[0, 1)" in table and "> 0" in table and "color_a_min <= color_a_max" in table
    nested = PATCH_DATA_SCHEMA.describe()
    assert "(required)" in nested and "augment.hed_alpha" in nested


def test_schema_rejects_its_own_mistakes():
    with pytest.raises(ValueError):
        Param("x", "float", 2.0, max=1.0)  # default out of range
    with pytest.raises(ValueError):
        Param("x", "complex", 1.0)
    with pytest.raises(ValueError):
        Schema([Param("x", "int", 1)], ordered_pairs=[("x", "y")])
    assert Param("x", "str", REQUIRED).required


@settings(max_examples=60, deadline=None)
@given(low=st.floats(allow_nan=False, allow_infinity=False, width=32),
       high=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_ordered_pair_property(low, high):
    raw = {"color_b_min": low, "color_b_max": high}
    if low <= high:
        params = AUGMENT_SCHEMA.validate(raw)
        assert params["color_b_min"] == low and params["color_b_max"] == high
    else:
        with pytest.raises(ParamError, match="color_b_min=.* > color_b_max="):
            AUGMENT_SCHEMA.validate(raw)


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), st.text(max_size=5)))
def test_color_p_accepts_exactly_finite_numbers_in_unit_interval(value):
    ok = (not isinstance(value, (bool, str)) and value is not None
          and math.isfinite(value) and 0 <= value <= 1)
    if ok:
        assert AUGMENT_SCHEMA.validate({"color_p": value})["color_p"] == float(value)
    else:
        with pytest.raises(ParamError, match="color_p"):
            AUGMENT_SCHEMA.validate({"color_p": value})


# --- hostile and careless input ------------------------------------------------------------

PATCH_WHERE = "PatchDataLayer param_str"
# "Billion laughs": 9 levels of 9 aliases each stand for 9**9 (387 million) strings; PyYAML
# builds it from shared lists in no time, and quoting the value in an error message used to
# expand it to gigabytes.
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{','.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
)


def test_alias_bomb_is_what_it_claims():
    # The plain SafeLoader reads it (cheaply: the lists are shared) into 9**9 leaves.
    assert len(ALIAS_BOMB) < 400
    value = yaml.safe_load(ALIAS_BOMB)["i"]
    for _ in range(8):
        assert len(value) == 9
        value = value[0]
    assert value == ["x"] * 9


def test_yaml_alias_bomb_is_rejected_with_a_short_message():
    with pytest.raises(ParamError, match="YAML anchors and aliases are not accepted") as info:
        augment(ALIAS_BOMB)
    message = str(info.value)
    assert len(message) < 1000
    assert WHERE in message and info.value.where == WHERE
    assert "'&a' at line 1, column 4" in message


@pytest.mark.parametrize("text, found", [
    ("rotate: &x true", "anchor '&x'"),
    ("{a: &x 1, b: *x}", "anchor '&x'"),
    ("rotate: *undefined", "alias '*undefined'"),
    ("- &x a\n- *x", "anchor '&x'"),
])
def test_any_yaml_anchor_or_alias_is_rejected(text, found):
    with pytest.raises(ParamError, match=f"not accepted in {WHERE}: found the {re.escape(found)}"):
        parse_param_str(text, WHERE)


def test_ampersand_and_star_in_values_are_not_aliases():
    assert parse_param_str('{"source": "&a *b"}') == {"source": "&a *b"}
    assert parse_param_str("source: 'a&b*c'") == {"source": "a&b*c"}


@pytest.mark.parametrize("text", [
    '{"rotate": true, "color": true, "rotate": false}',  # JSON
    "{'rotate': True, 'color': True, 'rotate': False}",  # Python literal
    "rotate: true\ncolor: true\nrotate: false\n",  # YAML block
    "{rotate: true, color: true, rotate: false}",  # YAML flow
    "{'rotate': True, 'rotate': x}",  # not a literal (x): read as YAML, still a repeat
])
def test_duplicate_keys_are_rejected_in_every_format(text):
    with pytest.raises(ParamError, match=f"duplicate key 'rotate' in {WHERE}: each key may be given only once"
                       ) as info:
        parse_param_str(text, WHERE)
    assert info.value.key == "rotate" and info.value.where == WHERE


@pytest.mark.parametrize("text", [
    '{"source": "a", "augment": {"flip": true, "flip": false}}',
    "{'source': 'a', 'augment': {'flip': True, 'flip': False}}",
    "source: a\naugment:\n  flip: true\n  flip: false\n",
])
def test_nested_duplicate_key_is_named_with_its_dotted_key(text):
    with pytest.raises(ParamError, match=r"duplicate key 'augment\.flip'") as info:
        load_params(text, PATCH_DATA_SCHEMA, PATCH_WHERE)
    assert info.value.key == "augment.flip"


def test_yaml_merge_key_override_is_not_a_duplicate():
    # YAML's own meaning of '<<': a key of the mapping overrides a merged one.
    assert parse_param_str("<<: {rotate: true, flip: true}\nrotate: false") == {"rotate": False, "flip": True}
    with pytest.raises(ParamError, match="duplicate key 'rotate'"):
        parse_param_str("<<: {rotate: true, rotate: false}")


@pytest.mark.parametrize("text, key", [
    ("color_a_max: 1e301", "color_a_max"),
    ('{"color_b_min": -1e39}', "color_b_min"),
    ("{'clip_max': 1e39}", "clip_max"),
    ("hed_beta: 3.5e38", "hed_beta"),
    ('{"color_b_max": ' + "9" * 400 + "}", "color_b_max"),  # an int, far beyond float32
])
def test_float_above_float32_max(text, key):
    with pytest.raises(ParamError, match=rf"invalid value for '{key}' in {WHERE}: {key}=.* is out of range "
                       r"for float32 computation; allowed magnitudes: up to 3\.4028235e\+38") as info:
        augment(text)
    assert info.value.key == key


@pytest.mark.parametrize("text, key", [
    ("max_value: 1e-300", "max_value"),
    ('{"color_a_min": 1e-39, "color_a_max": 1}', "color_a_min"),
    ("{'color_a_min': 5e-324, 'color_a_max': 1e-320}", "color_a_min"),
])
def test_float_that_must_not_be_0_below_float32_normal_range(text, key):
    # float32 would make it 0 (or a subnormal): "> 0" would no longer hold in the computation.
    with pytest.raises(ParamError, match=rf"invalid value for '{key}' in {WHERE}: {key}=.* is out of range "
                       r"for float32 computation, where it would be 0 or subnormal; allowed: > 0 and a "
                       r"magnitude of at least 1\.1754944e-38") as info:
        augment(text)
    assert info.value.key == key


def test_tiny_float_where_0_is_allowed_is_accepted():
    # It acts like 0, which is allowed (and BatchAugmenter callers pass such values).
    params = AUGMENT_SCHEMA.validate({"clip_min": 1e-300, "color_b_max": 5e-324, "hed_beta": 1e-45, "color_p": 1e-200})
    assert params["clip_min"] == 1e-300 and params["hed_beta"] == 1e-45
    assert not AUGMENT_SCHEMA.params["max_value"].check_zero_allowed()
    assert AUGMENT_SCHEMA.params["clip_min"].check_zero_allowed()


def test_float32_range_limits_themselves_are_accepted():
    params = AUGMENT_SCHEMA.validate({"color_b_min": -FLOAT32_MAX, "color_b_max": FLOAT32_MAX,
                                      "max_value": FLOAT32_TINY, "clip_min": 0.0, "clip_max": 0.0})
    assert params["color_b_max"] == FLOAT32_MAX == float(np.float32(params["color_b_max"]))
    assert params["max_value"] == FLOAT32_TINY == float(np.float32(FLOAT32_TINY))
    assert np.isfinite(np.float32(params["color_b_min"]))


def test_a_bound_violation_is_reported_before_the_float32_range():
    with pytest.raises(ParamError, match=r"color_a_min=-1e\+301 is out of range; allowed range: > 0"):
        augment("color_a_min: -1e301")


TEN_TO_4000 = "1" + "0" * 4000
DIGITS_5000 = "7" * 5000


@pytest.mark.parametrize("text, problem", [
    ('{"seed": ' + TEN_TO_4000 + "}", r"seed=<int with 4001 digits> is out of range; allowed range: \[0, 2\*\*63-1\]"),
    ("seed: " + TEN_TO_4000, r"seed=<int with 4001 digits> is out of range"),
    ("{'seed': " + TEN_TO_4000 + ", 'rotate': True}", r"seed=<int with 4001 digits> is out of range"),
    ('{"seed": ' + DIGITS_5000 + "}", r"seed=<int with 5000 digits> is too long to read; integers may have at most 4300"),
    ("seed: " + DIGITS_5000, r"seed=<int with 5000 digits> is too long to read"),
    ("{'seed': " + DIGITS_5000 + ", 'rotate': True}", r"seed=<int with 5000 digits> is too long to read"),
    ('{"seed": 9223372036854775808}', r"seed=9223372036854775808 is out of range; allowed range: \[0, 2\*\*63-1\]"),
    ('{"seed": 1e300}', r"seed=1e\+300 is out of range"),
    ("{'seed': 0x" + "f" * 10000 + "}", r"seed=<int with 12042 digits> is out of range"),
    ("color_b_min: " + TEN_TO_4000, r"color_b_min=<int with 4001 digits> is out of range for float32"),
])
def test_huge_integers_name_the_key(text, problem):
    with pytest.raises(ParamError, match=problem) as info:
        augment(text)
    assert info.value.key in ("seed", "color_b_min") and WHERE in str(info.value)
    assert len(str(info.value)) < 400


def test_huge_integer_in_nested_augment_names_the_dotted_key():
    for value in (TEN_TO_4000, DIGITS_5000):
        with pytest.raises(ParamError, match=r"invalid value for 'augment\.seed'") as info:
            load_params('{"source": "a", "augment": {"seed": ' + value + "}}", PATCH_DATA_SCHEMA, PATCH_WHERE)
        assert info.value.key == "augment.seed"


def test_undecodable_integer_where_no_format_reads_the_text_says_so():
    # A Python literal but for the digits ('a' 'b' is Python's string concatenation, not YAML).
    text = "{'seed': " + DIGITS_5000 + ", 'source': 'a' 'b'}"
    with pytest.raises(ParamError, match="an integer in it has more than 4300 digits"):
        parse_param_str(text, WHERE)


@pytest.mark.parametrize("value, keys", [
    (10**400, ("seed", "color_b_min")),
    (-(10**5000), ("seed", "color_b_min")),
    (Fraction(10**400, 3), ("seed", "color_b_min")),
    (2**64, ("seed",)),  # a fine float32 magnitude
    (np.uint64(2**64 - 1), ("seed",)),
], ids=["10**400", "-10**5000", "Fraction", "2**64", "uint64"])
def test_validate_of_huge_python_numbers_raises_param_error_not_overflow(value, keys):
    for key in keys:
        with pytest.raises(ParamError, match=f"invalid value for '{key}'") as info:
            AUGMENT_SCHEMA.validate({key: value})
        assert len(str(info.value)) < 400


def test_seed_fits_default_rng_and_says_so():
    seed = AUGMENT_SCHEMA.params["seed"]
    assert seed.range_description() == "[0, 2**63-1]"
    assert augment(f'{{"seed": {INT64_MAX}}}')["seed"] == INT64_MAX
    np.random.default_rng(INT64_MAX)  # accepted by numpy
    assert PATCH_DATA_SCHEMA.params["seed"].range_description() == "[0, 2**63-1]"


def test_int_params_are_64_bit_by_default():
    param = Param("n", "int", 0)
    assert param.range_description() == "[-2**63, 2**63-1]"
    assert param.check(-(2**63)) == -(2**63)
    with pytest.raises(ParamError, match=r"n=9223372036854775808 is out of range; allowed range: \[-2\*\*63, 2\*\*63-1\]"):
        param.check(2**63)
    with pytest.raises(ValueError):
        Param("n", "int", 0, max=2**64)
    with pytest.raises(ValueError):
        Param("x", "float", 0.0, max=1e39)


def test_patch_data_blob_limits():
    def patch(text):
        return load_params("{source: a, " + text + "}", PATCH_DATA_SCHEMA, PATCH_WHERE)

    assert patch("batch_size: 4096, patch_size: 128")["batch_size"] == 4096
    assert patch("batch_size: 10, patch_size: 8192")["patch_size"] == 8192  # 2013265920 elements
    with pytest.raises(ParamError, match=r"batch_size=4097 is out of range; allowed range: \[1, 4096\]"):
        patch("batch_size: 4097")
    with pytest.raises(ParamError, match=r"patch_size=8193 is out of range; allowed range: \[1, 8192\]"):
        patch("patch_size: 8193")
    with pytest.raises(ParamError, match=re.escape(
            f"invalid values in {PATCH_WHERE}: batch_size=11, patch_size=8192 give 11*3*8192*8192 = "
            f"2214592512 elements in the N×3×P×P data blob (Caffe's limit is INT_MAX); at most {INT_MAX} "
            "are possible")) as info:
        patch("batch_size: 11, patch_size: 8192")
    assert info.value.key == "batch_size"
    with pytest.raises(ParamError, match=r"4096\*3\*8192\*8192 = 824633720832 elements"):
        patch("batch_size: 4096, patch_size: 8192")
    assert "batch_size * 3 * patch_size * patch_size <= 2147483647" in PATCH_DATA_SCHEMA.describe()
    with pytest.raises(ValueError):
        Schema([Param("x", "float", 1.0)], size_limits=[(("x",), 10, "things")])


def test_describe_states_the_number_limits():
    assert ("ints are 64-bit; float magnitudes are at most 3.4028235e+38, and at least 1.1754944e-38 where 0 "
            "is not allowed (float32)") in AUGMENT_SCHEMA.describe()


def _nested(depth, opening, closing, leaf="1"):
    return opening * depth + leaf + closing * depth


@pytest.mark.parametrize("text", [
    '{"a": ' + _nested(MAX_PARAM_DEPTH, "[", "]") + "}",  # JSON, parses, then too deep
    '{"a": ' + _nested(5000, "[", "]") + "}",  # JSON: RecursionError inside json
    _nested(MAX_PARAM_DEPTH + 1, '{"a": ', "}"),
    "{'a': (" + _nested(MAX_PARAM_DEPTH, "(", ",)") + ",)}",  # Python literal tuples
    "{'a': " + _nested(199, "[", "]") + ", 'b': True}",  # just under Python's bracket limit
    "{'a': " + _nested(20000, "[", "]") + ", 'b': True}",  # far over it
    "a:\n" + "".join(" " * i + "- \n" for i in range(1, 60)),  # YAML block sequences
    "- " * 30000,
    "[" * 60000,
])
def test_deep_nesting_is_a_clear_param_error(text):
    assert len(text) <= MAX_PARAM_STR_CHARS
    with pytest.raises(ParamError, match="nested too deeply") as info:
        parse_param_str(text, WHERE)
    assert WHERE in str(info.value) and len(str(info.value)) < 1000


@pytest.mark.parametrize("make", [
    lambda depth: '{"a": ' + _nested(depth - 1, "[", "]") + "}",
    lambda depth: "{'a': " + _nested(depth - 1, "(", ",)") + "}",
    lambda depth: "a:" + "".join("\n" + " " * i + "-" for i in range(1, depth)) + " 1",
])
def test_nesting_up_to_the_limit_is_accepted(make):
    assert "a" in parse_param_str(make(MAX_PARAM_DEPTH))
    with pytest.raises(ParamError, match="nested too deeply"):
        parse_param_str(make(MAX_PARAM_DEPTH + 1))


def test_too_long_input():
    filler = '{"source": "' + "a" * (MAX_PARAM_STR_CHARS - 14) + '"}'
    assert len(filler) == MAX_PARAM_STR_CHARS and parse_param_str(filler)["source"].startswith("aaa")
    for text in (filler + " ", "rotate: true #" + "x" * MAX_PARAM_STR_CHARS, b"x" * (5 * MAX_PARAM_STR_CHARS)):
        with pytest.raises(ParamError, match=f"{WHERE} is too long: .* at most {MAX_PARAM_STR_CHARS}") as info:
            parse_param_str(text, WHERE)
        assert len(str(info.value)) < 1000


@pytest.mark.parametrize("value", [
    0, -3, 1.5, float("nan"), "rotate", b"x", None, True, (), (1,), (1, 2), [], [1, [2, "a"]], {}, {"a": (1, None)},
    set(), {3}, frozenset(), frozenset({1}), 1 + 2j, np.float64(0.25), np.int64(7), 10**50,
])
def test_short_repr_of_small_values_is_repr(value):
    assert _short_repr(value) == repr(value)


def test_short_repr_is_bounded_for_huge_values():
    shared = ["x"] * 9
    for _ in range(60):  # 9 * 2**60 leaves, a few hundred objects
        shared = [shared, shared]
    loop = []
    loop.append(loop)
    values = [shared, loop, {"k": loop}, "q" * 10**6, list(range(10**5)), 10**4000, -(7**20000),
              {i: str(i) for i in range(10**4)}, np.zeros(10**6)]
    for value in values:
        text = _short_repr(value, 100)
        assert len(text) <= 103, text
    assert _short_repr(loop) == "[[...]]"
    assert _short_repr(10**4000) == "<int with 4001 digits>"
    assert _short_repr("q" * 1000, 10) == "'qqqqqqqqq..."


def test_messages_quote_values_and_keys_briefly():
    cases = [
        lambda: AUGMENT_SCHEMA.validate({"rotate": list(range(10**5))}),
        lambda: AUGMENT_SCHEMA.validate({"k" * 10**5: 1}),
        lambda: AUGMENT_SCHEMA.validate({"colour": "v" * 10**5}),
        lambda: AUGMENT_SCHEMA.validate(list(range(10**5))),
        lambda: PATCH_DATA_SCHEMA.validate({"source": "a", "augment": ["x"] * 10**5}),
        lambda: parse_param_str(list(range(10**5))),
        lambda: parse_param_str("{" + ", ".join(f"{i}: 1" for i in range(5000)) + "}"),
        lambda: parse_param_str("? " + "1" * 4400 + "\n: 1"),
    ]
    for case in cases:
        with pytest.raises(ParamError) as info:
            case()
        assert len(str(info.value)) < 1000, str(info.value)[:300]


def test_stain_angle_key_default_range_and_nesting():
    param = AUGMENT_SCHEMA.params["stain_angle"]
    assert param.default == 0.0 and param.range_description() == "[0, 30]"
    assert "stain_angle" in AUGMENT_SCHEMA.describe()
    assert load_params('{"hed": True, "stain_angle": 4}', AUGMENT_SCHEMA, WHERE)["stain_angle"] == 4.0
    for bad, problem in ((-0.5, "stain_angle"), (45, "stain_angle"), (True, "stain_angle")):
        with pytest.raises(ParamError, match=problem):
            AUGMENT_SCHEMA.validate({"stain_angle": bad}, WHERE)
    nested = PATCH_DATA_SCHEMA.validate({"source": "a.txt", "augment": {"stain_angle": 3}}, WHERE)
    assert nested["augment"]["stain_angle"] == 3.0
    with pytest.raises(ParamError, match="augment.stain_angle"):
        PATCH_DATA_SCHEMA.validate({"source": "a.txt", "augment": {"stain_angle": 31}}, WHERE)


def test_format_param_str():
    text = format_param_str({"color": True, "color_a_min": 0.74, "color_a_max": 1.45})
    assert text == '{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}'
    assert format_param_str({"n": 3, "x": 1.0, "s": "a", "l": [1, 2.5]}) == (
        '{"n": 3, "x": 1.0, "s": "a", "l": [1, 2.5]}'
    )
    with pytest.raises(ValueError, match="non-finite"):
        format_param_str({"x": float("nan")})
