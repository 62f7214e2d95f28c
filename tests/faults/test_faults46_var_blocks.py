"""Ctrl-C as our context-setting blocks are entered or left (46th fault campaign; session 44's Left).

``database.untraced()`` (instrumentation suppressed around our own statements) and ``database.deadline()`` (the
bound of every database wait) were ``contextlib`` context managers. A ``KeyboardInterrupt`` raised as the
generator yielded to ``__enter__`` (``next()``'s return there) or as ``__exit__`` was entered (points where a signal
handler runs) never reached the generator's ``finally``: the variable stayed set in the thread for as long as the
interrupt's traceback was kept (an interactive session keeps the last one: ``sys.last_traceback``), the
application's spans there suppressed, every write of ours there past its deadline. Both are now
``_varblock.VarSet``, whose exit is C code.

Each operation is run again and again, interrupted at its n-th signal point (a Python function's entry, a C
call's return: ``conftest.interrupt_at``), each run in a context of its own with the interrupt kept, and the
context must be as before afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

from cmbagent_otel.dag import database

from .conftest import each_interrupt, runs_under


def _left_changed(block: Callable[[], contextlib.AbstractContextManager[Any]],
                  state: Callable[[], object]) -> tuple[list[str], int]:
    """The points after which ``state()`` differed from before, each run in a context of its own (a leak stays
    there), and how many points there were."""
    def body() -> None:
        with block():
            pass

    contexts: list[contextvars.Context] = []

    def run() -> None:
        contexts.append(contextvars.copy_context())
        contexts[-1].run(body)

    before = state()
    left: list[str] = []
    points = 0
    for point, raised in each_interrupt(run, lambda frame, event: event in ("call", "c_return")
                                        and runs_under(frame, body.__code__)):
        points += 1
        if contexts[-1].run(state) != before:
            left.append(point)
            raised.clear()
            contexts[-1].run(gc.collect)  # the generator left suspended (main) closed in its own context
    return left, points


def test_ctrl_c_in_untraced_leaves_no_suppression() -> None:
    """Fails on main 75098e5: suppressed after 5 of 20 points (``c_return __enter__``: ``next()``, ``call __exit__``,
    OTel's ``attach`` and ``detach``)."""
    tracer = trace.get_tracer("app")
    left, points = _left_changed(database.untraced, lambda: (
        otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY), otel_context.get_current()))
    assert points >= 3
    assert left == []
    with tracer.start_as_current_span("app"):
        assert otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY) is None


def test_ctrl_c_in_a_deadline_leaves_no_bound() -> None:
    """Fails on main 75098e5: a deadline left after 3 of 15 points (``c_return __enter__``: ``next()``, ``call
    __exit__``, ``c_return deadline``: the set)."""
    left, points = _left_changed(lambda: database.deadline(3600), database.time_left_ms)
    assert points >= 2
    assert left == []
    assert database.time_left_ms() is None


def test_the_blocks_still_set_and_reset() -> None:
    """Nested deadlines take the nearer; the block's exception comes out unchanged, the variables reset."""
    error = ValueError("the application's")
    with pytest.raises(ValueError) as caught, database.deadline(100):
        left = database.time_left_ms()
        assert left is not None and 90_000 < left <= 100_000
        with database.deadline(1000):
            assert database.time_left_ms() <= left  # type: ignore[operator]
        with database.deadline(0):
            assert database.time_left_ms() == 0
        with database.untraced():
            assert otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY) is True
            raise error
    assert caught.value is error
    assert database.time_left_ms() is None
    assert otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY) is None
    with database.deadline(None):
        assert database.time_left_ms() is None
