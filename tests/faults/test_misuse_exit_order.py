"""Workflow blocks exited out of order, or in another thread than the one that entered them.

``with`` nests blocks last-in-first-out; an application driving ``__enter__``/``__exit__`` by hand
(a state machine, a callback-driven framework, a ``contextlib.ExitStack`` popped in the wrong
order) may leave them in another order, or in another thread. Before, each exit restored the
context its own entry found: after "enter A, enter B, exit A, exit B" the context held A's ended
span for good, so every later ``workflow()`` of that thread joined the ended run (no span, no run
row) and every later span of the application went under it. Now the context from before A comes
back once the last of them is left, and a ``workflow`` opened where the enclosing run has already
ended starts a run of its own, with one warning line.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import threading
from typing import Any

import pytest
from opentelemetry import trace
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow


def _rows(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            runs = [tuple(r) for r in conn.execute(text("SELECT id, status FROM workflow_runs ORDER BY started_at"))]
            nodes = [tuple(r) for r in conn.execute(text("SELECT run_id, status, parent_node_id FROM dag_nodes"))]
            ids = {r[0] for r in conn.execute(text("SELECT id FROM dag_nodes"))}
    finally:
        engine.dispose()
    assert all(parent is None or parent in ids for _, _, parent in nodes), "a node's parent row is missing"
    return runs, nodes


def _isolated(test: Any) -> Any:
    """Runs the test in a copy of the context: a context left holding an ended span (the old
    behaviour) must not leak into the tests after it."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return contextvars.copy_context().run(test, *args, **kwargs)

    return run


def _no_span_current() -> bool:
    return not trace.get_current_span().get_span_context().is_valid


@_isolated
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "-".join(map(str, o)))
def test_blocks_left_in_any_order_give_the_context_back(provider: Any, sqlite_url: str, order: tuple[int, ...]) -> None:
    blocks = [workflow("first"), phase("control"), step(1, "load")]
    for block in blocks:
        block.__enter__()
    for index in order:
        blocks[index].__exit__(None, None, None)
    assert _no_span_current(), trace.get_current_span()
    with workflow("second"), phase("control"), step(1, "again"):  # its own run, not the ended one's
        pass
    assert _no_span_current()
    names = {s.name: s for s in provider.memory.get_finished_spans()}
    assert {"workflow first", "phase control", "step 1", "workflow second"} <= set(names)
    assert names["workflow first"].context.trace_id != names["workflow second"].context.trace_id
    provider.store(sqlite_url)
    runs, nodes = _rows(sqlite_url)
    assert [status for _, status in runs] == ["completed", "completed"]
    assert {status for _, status, _ in nodes} == {"completed"}
    assert {run for run, _, _ in nodes} == {run for run, _ in runs}


@_isolated
def test_a_block_left_early_ends_its_span_and_work_stays_under_the_open_one(provider: Any) -> None:
    outer, inner = workflow("w"), phase("control")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # left before the phase it holds
    assert trace.get_current_span().name == "phase control"  # type: ignore[attr-defined]
    with step(1, "inside"):
        pass
    inner.__exit__(None, None, None)
    assert _no_span_current()
    spans = {s.name: s for s in provider.memory.get_finished_spans()}
    assert spans["step 1"].parent.span_id == spans["phase control"].context.span_id
    assert spans["workflow w"].end_time <= spans["phase control"].end_time


@_isolated
def test_a_workflow_left_in_another_thread(provider: Any, sqlite_url: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    first = workflow("first")
    first.__enter__()
    leaver = threading.Thread(target=first.__exit__, args=(None, None, None))
    leaver.start()
    leaver.join()
    # this thread's context still holds the span the other thread ended: the next run is its own
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
        with workflow("second") as second, phase("control"), step(1, "load"):
            assert not second.joined
        with workflow("third") as third:
            assert not third.joined
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "already ended" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    spans = {s.name: s for s in provider.memory.get_finished_spans()}
    assert {"workflow first", "workflow second", "workflow third", "step 1"} <= set(spans)
    traces = {spans[n].context.trace_id for n in ("workflow first", "workflow second", "workflow third")}
    assert len(traces) == 3
    assert spans["workflow second"].parent is None
    provider.store(sqlite_url)
    runs, nodes = _rows(sqlite_url)
    assert [status for _, status in runs] == ["completed"] * 3
    assert {status for _, status, _ in nodes} == {"completed"}


@_isolated
def test_a_task_that_outlives_its_workflow_opens_a_run_of_its_own(provider: Any, sqlite_url: str) -> None:
    """A task created inside a workflow holds a copy of its context; a workflow it opens after the
    first one ended joined that ended run before (no span, no run row)."""
    async def later(started: asyncio.Event) -> bool:
        await started.wait()
        with workflow("later") as block, phase("control"), step(1, "late work"):
            return block.joined

    async def main() -> bool:
        started = asyncio.Event()
        with workflow("first"):
            task = asyncio.create_task(later(started))
        started.set()
        return await task

    assert asyncio.run(main()) is False
    spans = {s.name: s for s in provider.memory.get_finished_spans()}
    assert spans["workflow later"].context.trace_id != spans["workflow first"].context.trace_id
    assert spans["step 1"].context.trace_id == spans["workflow later"].context.trace_id
    provider.store(sqlite_url)
    runs, nodes = _rows(sqlite_url)
    assert [status for _, status in runs] == ["completed", "completed"]
    assert {status for _, status, _ in nodes} == {"completed"}
