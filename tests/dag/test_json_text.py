"""The DAG rows' JSON text: the values ``json.dumps(value, default=str)`` writes, as compact ASCII
standard JSON, whether orjson or the standard library's encoder writes it."""

from __future__ import annotations

import collections
import json
from datetime import date, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbagent_otel._jsontext import finite, has_non_finite
from cmbagent_otel.dag.statements import Sql, encode_json

Pair = collections.namedtuple("Pair", "a b")


class Number(float):
    """A float subclass, as numpy's float64 is."""


NAN, INF = float("nan"), float("inf")
ODD_VALUES: list[Any] = [
    {"span_id": None, "cost": NAN},  # a null beside a NaN: the NaN must not become null
    {"a": [None, {"b": (1, -INF)}]},
    [Number(1.5), Number(NAN)],
    Pair(1, "x"),
    {"big": 2**70, "small": -(2**70)},
    {1: "int key", None: "none key", False: "bool key", 2.5: "float key"},
    {"text": "é ü 日本 \U0001f600", "lone": "\ud800"},
    {"when": datetime(2026, 1, 2, 3, 4, 5, 6), "day": date(2026, 1, 2)},
    {"bytes": b"raw", "set": {1}},
    {"null": "null", "nested": [[[[]]]], "empty": {}},
    "plain text",
    [1e-05, 1e16, -0.0, 0.1 + 0.2, 5e-324],
    {"k": "a \"quoted\"\n\ttext\x00\x1f\x7f"},
]


def _expected(value: Any) -> Any:
    return json.loads(json.dumps(finite(value), default=str))


@pytest.mark.parametrize("value", ODD_VALUES, ids=range(len(ODD_VALUES)))
def test_text_holds_the_values_json_dumps_writes(value: Any) -> None:
    text = encode_json(value)
    assert text.isascii()
    assert json.loads(text) == _expected(value)  # json.loads parses standard JSON (no NaN literal here)


def test_text_is_compact() -> None:
    value = {"a": [1, "b, c: d"], "c": None, "d": {"e": 1.5}}
    assert encode_json(value) == '{"a":[1,"b, c: d"],"c":null,"d":{"e":1.5}}'


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_row_converters_write_the_same_text(dialect: str) -> None:
    """The converters inline the encoder; a row with a value orjson refuses or writes as null takes
    the standard library's, the other columns unchanged."""
    sql = Sql(dialect)
    cols = (("id", ""), ("meta", "json"), ("inputs", "json"))
    rows = [{"id": str(i), "meta": value, "inputs": {"k": i}} for i, value in enumerate(ODD_VALUES)]
    want = [(str(i), encode_json(value), encode_json({"k": i})) for i, value in enumerate(ODD_VALUES)]
    assert sql.params(rows, cols) == want


def test_non_finite_floats_are_found_at_any_depth() -> None:
    assert has_non_finite({"a": [1, {"b": (None, Number(INF))}]})
    assert has_non_finite(NAN)
    assert not has_non_finite({"a": [1.5, {"b": (None, "nan", 2**70)}]})
    assert not has_non_finite("text")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_round_trips(value: Any) -> None:
    text = encode_json(value)
    assert text.isascii()
    assert json.loads(text) == _expected(value)
