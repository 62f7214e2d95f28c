"""A long-running service: many workflows in one process, each with fresh agents, instrumented once.

Nothing of a finished (or abandoned) run may stay alive because of the instrumentation: not its
agents, not its run state, not its spans; and every process-wide memo stays within its bound.
Counted with weak references and ``gc.get_objects`` after ``gc.collect()``, never by RSS or time.
(The RSS / traced-heap figures per run are in ``bench/bench_memory.py --workflows``.)
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._context import RunState
from cmbagent_otel._spans import TracedSpan, open_node_spans
from cmbagent_otel.dag import _stamps, mapping
from cmbagent_otel.instrumentation import _content, _models
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client

pytestmark = needs_custom_client


def _alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def _held() -> tuple[set[int], int, int]:
    """What earlier tests of the session still hold (a kept exception's traceback keeps its frames'
    spans alive): each test asserts that its own runs added nothing to it."""
    gc.collect()
    return {id(span) for span in open_node_spans()}, _alive(RunState), _alive(TracedSpan)


def _assert_nothing_added(before: tuple[set[int], int, int]) -> None:
    spans, runs, traced = _held()
    assert spans <= before[0], [span.name for span in open_node_spans() if id(span) not in before[0]]
    assert runs <= before[1] and traced <= before[2], (runs, traced, before[1:])


def test_many_workflows_with_fresh_agents_keep_nothing_per_run(tmp_path: Path) -> None:
    cap = Capture()
    refs: list[weakref.ref[Any]] = []
    before = _held()
    with instrumented_with(cap):
        state = AG2Instrumentor()._state
        assert state is not None
        for index in range(12):
            with workflow(f"request {index}", mode="planning-control"), phase("control"), step(1, "fit"):
                group_chat(tmp_path / str(index), before_run=lambda agents: refs.extend(map(weakref.ref, agents)))
        spans = len(cap.spans)
        cap.exporter.clear()  # what an application's exporter does with what it read
        gc.collect()
        assert spans > 12 * 10
        assert sum(ref() is not None for ref in refs) == 0  # every agent of every finished run freed
        assert state.agents == {} and state.candidates == {}  # their per-agent and per-chat facts went with them
        _assert_nothing_added(before)
        # process-wide memos: filled, within their bounds
        assert len(_stamps._texts) <= _stamps._MEMO_SIZE and len(_stamps._seconds) <= _stamps._MEMO_SIZE
        assert len(_content._walked_entries) <= _content._SEEN_CONFIGS_MAX
        assert len(_content._seen_configs) <= _content._SEEN_CONFIGS_MAX
        assert len(_models._infos) <= _models._INFO_MAX
        assert mapping.node_db_id.cache_info().maxsize is not None


def _abandoned_in_a_thread(index: int) -> None:
    # entered, never exited: the thread (and its context) ends with the run still open
    workflow(f"abandoned {index}", mode="planning-control").__enter__()
    phase("control").__enter__()
    step(1, "fit").__enter__()


def _suspended(index: int) -> Iterator[int]:
    with workflow(f"suspended {index}", mode="planning-control"), phase("control"), step(1, "fit"):
        yield index
        yield index + 1


def test_runs_that_never_end_hold_nothing(tmp_path: Path) -> None:
    """Runs that never end properly (a worker thread that gives up, a generator suspended inside its
    workflow and dropped): their spans are held only weakly by the signal handler's set, so nothing
    of them stays once the application drops them; the run's row stays ``executing`` in the DB."""
    cap = Capture()
    before = _held()
    with instrumented_with(cap):
        for index in range(20):
            worker = threading.Thread(target=_abandoned_in_a_thread, args=(index,))
            worker.start()
            worker.join()
            suspended = _suspended(index)
            next(suspended)
            del suspended  # closed by the collector: the with blocks end the spans
        _assert_nothing_added(before)
        assert len(cap.named("workflow suspended")) == 20
        assert cap.named("workflow abandoned") == []  # never ended: never exported
