"""StructuredOutput (sampling/structured.py): exactly one constraint, each validated with an error naming
the field; equal constraints share one key (the compiled-grammar cache's) whatever their spacing."""
from __future__ import annotations

import pytest

from tinyinfer import SamplingParams, StructuredOutput
from tinyinfer.config.errors import InvalidParam


@pytest.mark.parametrize("kwargs, field", [
    ({}, "structured"),
    ({"regex": "a+", "choice": ["x"]}, "structured"),
    ({"json_schema": "{not json"}, "structured.json_schema"),
    ({"json_schema": 3}, "structured.json_schema"),
    ({"json_schema": True}, "structured.json_schema"),
    ({"json_schema": {"x": float("nan")}}, "structured.json_schema"),
    ({"json_object": 1}, "structured.json_object"),
    ({"regex": ""}, "structured.regex"),
    ({"regex": b"a"}, "structured.regex"),
    ({"choice": []}, "structured.choice"),
    ({"choice": ["a", ""]}, "structured.choice"),
    ({"choice": "ab"}, "structured.choice"),
    ({"grammar": "  "}, "structured.grammar"),
])
def test_a_bad_constraint_is_refused_naming_its_field(kwargs, field):
    with pytest.raises(InvalidParam) as err:
        StructuredOutput(**kwargs)
    assert err.value.field == field


def test_equal_constraints_share_a_key_whatever_their_spacing():
    a = StructuredOutput(json_schema={"type": "object", "required": ["a"]})
    b = StructuredOutput(json_schema='{"type":  "object",\n "required": [ "a"]}')
    assert a == b and hash(a) == hash(b) and a.key == b.key and a.schema == {"type": "object", "required": ["a"]}
    # key order is kept: properties are generated in the order the schema lists them
    c = StructuredOutput(json_schema={"required": ["a"], "type": "object"})
    assert c != a and list(c.schema) == ["required", "type"]
    assert StructuredOutput(choice=["x", "y"]) == StructuredOutput(choice=("x", "y"))
    assert StructuredOutput(choice=["x", "y"]) != StructuredOutput(choice=["y", "x"])
    assert StructuredOutput(regex="a") != StructuredOutput(grammar="a")
    assert [StructuredOutput(**kw).kind for kw in ({"json_object": True}, {"regex": "a"}, {"grammar": "start: \"a\""})] \
        == ["json_object", "regex", "grammar"]


def test_sampling_params_takes_only_a_structured_output():
    s = StructuredOutput(json_object=True)
    assert SamplingParams(structured=s).structured is s
    with pytest.raises(InvalidParam) as err:
        SamplingParams(structured={"type": "json_object"})
    assert err.value.field == "structured"
