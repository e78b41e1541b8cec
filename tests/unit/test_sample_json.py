"""A sample's metadata JSON is parsed within limits: hostile documents end as a reason, never as
an exception from the parser (RecursionError) or an unbounded parse."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tokenflow.config import SampleLimitsConfig
from tokenflow.data.examples import conversation, conversation_examples
from tokenflow.data.sample_json import SampleJSONError, parse_sample_json, parse_sample_object
from tokenflow.data.token_shards import TokenSample

GOOD = json.dumps({"conversations": [{"from": "human", "value": "<image>\nIs it red?"},
                                     {"from": "gpt", "value": "Yes"}]})


@pytest.mark.parametrize("raw,reason", [
    ("[" * 100_000 + "]" * 100_000, "json_too_deep"),  # Python's parser would raise RecursionError
    ('{"a": "' + "x" * 2_000_000 + '"}', "json_too_large"),
    ('{"conversations": [', "json_invalid"),
    (b"\xff\xfe{", "json_invalid"),
])
def test_hostile_documents_end_as_a_reason(raw, reason):
    with pytest.raises(SampleJSONError) as err:
        parse_sample_json(raw)
    assert err.value.reason == reason


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = json.dumps({"value": "[" * 1000 + '\\"{' * 500})
    assert parse_sample_json(text, SampleLimitsConfig(max_json_depth=1)) == json.loads(text)


def test_the_depth_scan_is_linear_on_escaped_quotes():
    raw = '"' + '\\"' * 400_000  # an unterminated string of escaped quotes: quadratic for a regex
    start = time.perf_counter()
    with pytest.raises(SampleJSONError):
        parse_sample_json(raw)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "null", '{"conversations": {"from": "human"}}'])
def test_an_object_of_the_wrong_shape_is_a_schema_reason(raw):
    with pytest.raises(SampleJSONError) as err:
        parse_sample_object(raw, {"conversations": list})
    assert err.value.reason == "json_schema"


@pytest.mark.parametrize("raw,reason", [
    (None, "no_json"), ("", "no_json"), ("[" * 5000, "json_too_deep"), ("[]", "json_schema"),
    ('{"conversations": [{"from": "gpt", "value": "x"}]}', "no_turns"), (GOOD, None),
])
def test_every_row_without_a_conversation_says_why(raw, reason):
    turns, why = conversation(raw)
    assert why == reason and (turns == [("Is it red?", "Yes")]) == (reason is None)


def test_conversation_examples_of_a_hostile_row_are_none_not_an_exception():
    sample = TokenSample("k", np.zeros(4, np.uint16), None, "[" * 100_000)
    assert conversation_examples(sample, split_turns=True) == []
