"""Exceptions in odd places, raised by the application through the workflow blocks (seventeenth fault
campaign): the very same object must come out, the span must record it bounded and without secrets,
and nothing of ours may raise instead.

Found: ``SystemExit`` whose code is an ``int`` subclass with its own ``__eq__`` (raising) made the
block's exit raise that error instead of the ``SystemExit`` (the application saw a ``ValueError``,
the step span was lost); an exception class made at run time with a long name (or one quoting a
key) put that name whole on ``error.type``, the exception event and the status.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow

SECRET = "sk-proj-" + "Q7x" * 14
_Group: Any = getattr(builtins, "ExceptionGroup", None)  # Python 3.11+


class _EqRaises(int):
    def __eq__(self, other: object) -> bool:
        raise ValueError("__eq__ of the exit code raised")

    __hash__ = int.__hash__


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ raised")


class _Huge(Exception):
    def __str__(self) -> str:
        return "x" * (20 << 20)


def _everything(spans: Any) -> str:
    return json.dumps([{**dict(s.attributes), "name": s.name, "status": s.status.description,
                        "events": [dict(e.attributes) for e in s.events]} for s in spans], default=str)


def _raise_through_blocks(exc: BaseException) -> BaseException:
    try:
        with workflow("odd"), phase("control"), step(1, "raises"):
            raise exc
    except BaseException as got:  # the point is what comes out
        return got
    raise AssertionError("nothing propagated")


@pytest.mark.parametrize("code, clean", [(_EqRaises(0), True), (_EqRaises(3), False)], ids=["code-0", "code-3"])
def test_system_exit_with_an_int_subclass_code(provider: Any, code: int, clean: bool) -> None:
    exc = SystemExit(code)
    assert _raise_through_blocks(exc) is exc
    spans = provider.memory.get_finished_spans()
    assert sorted(s.name for s in spans) == ["phase control", "step 1", "workflow odd"]
    expected = StatusCode.UNSET if clean else StatusCode.ERROR  # as the interpreter reads the code: 0, 3
    assert {s.status.status_code for s in spans} == {expected}


def test_an_exception_class_with_a_huge_name_quoting_a_key(provider: Any, sqlite_url: str) -> None:
    odd = type("Odd", (Exception,), {})
    odd.__qualname__ = "E" * 100_000 + f" api_key={SECRET}"
    exc = odd("message")
    assert _raise_through_blocks(exc) is exc
    spans = provider.memory.get_finished_spans()
    assert len(spans) == 3
    for span in spans:
        assert len(span.attributes["error.type"]) <= 300
        assert len(span.events[0].attributes["exception.type"]) <= 600
    text = _everything(spans)
    assert SECRET not in text and "Q7xQ7x" not in text
    assert len(text) < 200_000
    provider.store(sqlite_url)


@pytest.mark.parametrize("exc", [
    GeneratorExit("closing"),
    SystemExit([1, 2]),
    SystemExit(f"exiting, password={SECRET}"),
    _StrRaises("unprintable"),
    _Huge(),
    *([_Group("outer", [ValueError(f"password={SECRET}"),
                        _Group("inner", [KeyError(f"api_key: {SECRET}"), RuntimeError(f"Bearer {SECRET}")])]),
       _Group(f"failed with {SECRET}", [ValueError("one")])] if _Group is not None else []),
], ids=["generator-exit", "exit-list", "exit-secret", "str-raises", "huge", "nested-group", "group-message"][
    :7 if _Group is not None else 5])
def test_odd_exceptions_pass_unchanged_bounded_and_redacted(provider: Any, exc: BaseException) -> None:
    args = exc.args
    assert _raise_through_blocks(exc) is exc
    assert exc.args == args
    spans = provider.memory.get_finished_spans()
    assert len(spans) == 3 and {s.status.status_code for s in spans} == {StatusCode.ERROR}
    text = _everything(spans)
    assert SECRET not in text and "Q7xQ7x" not in text
    assert len(text) < 3 * 64 * 1024  # message, stack trace and status bounded on each span
