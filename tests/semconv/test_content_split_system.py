"""``_messages.split_system`` (a model call's input: system instructions apart from the other
messages) reads a list of plain dicts' roles in C (issue 13); it must split as its general loop
does, which an iterator of the same messages still takes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cmbagent_otel.instrumentation import _messages

ROLES = ["system", "developer", "user", "assistant", "tool", "function", None, "System", ""]
contents = st.one_of(st.none(), st.text(max_size=20),
                     st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
                              max_size=2))


def _message(role: Any, content: Any, has_role: bool, kind: int) -> Any:
    raw: dict[str, Any] = {"content": content}
    if has_role:
        raw["role"] = role
    if kind == 1:
        return OrderedDict(raw)  # a Mapping that is no plain dict: the general loop
    if kind == 2:
        return "a bare string"  # not a Mapping: an input message as it is
    return raw


messages = st.lists(st.builds(_message, st.sampled_from(ROLES), contents, st.booleans(),
                              st.sampled_from([0, 0, 0, 0, 1, 2])), max_size=6)


@settings(max_examples=400, deadline=None)
@given(messages)
def test_split_system_of_a_list_is_the_general_loop(values: list[Any]) -> None:
    system, rest = _messages.split_system(values)
    expected_system, expected_rest = _messages.split_system(iter(values))  # an iterator: the loop
    assert system == expected_system
    assert len(rest) == len(expected_rest) and all(a is b for a, b in zip(rest, expected_rest, strict=True))
    assert rest is not values  # a new list: the caller's is never handed back to be changed


def test_a_system_message_after_the_first_is_split_out() -> None:
    values = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
              {"role": "developer", "content": "c"}]
    system, rest = _messages.split_system(values)
    assert [part["content"] for part in system] == ["a", "c"] and rest == [values[1]]
