"""Tests of caffe_layers.params: parsing param_str and validating against the schemas."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_layers.params import (
    AUGMENT_SCHEMA,
    PATCH_DATA_SCHEMA,
    REQUIRED,
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
    with pytest.raises(ParamError, match=r"batch_size=0 is out of range; allowed range: >= 1"):
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
