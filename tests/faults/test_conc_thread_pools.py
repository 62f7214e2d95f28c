"""Thread pools reused across runs (twenty-second fault campaign).

A ``multiprocessing.pool.ThreadPool`` starts its worker and result-handler threads once, when it is
made, and hands them tasks through a queue. The threading instrumentation carries the context a thread
was started in into it (for its whole life) and wraps ``ThreadPoolExecutor.submit``, not this queue: a
pool made inside run A (in a step, or lazily by a library on first use) ran every later task of every
later run in run A's context, so run B's AG2 chat was recorded in run A's trace, under A's step, after A
had ended, and B's step had none. Real AG2 agents on the offline model client; DAG rows written by the
real writer into SQLite (and PostgreSQL when ``CMBAGENT_OTEL_TEST_PG_URL`` is set).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.pool import ThreadPool
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, semconv, step, workflow
from cmbagent_otel.testing import offline_agent


def _chat(tag: str) -> str:
    left = offline_agent(f"left_{tag}", [f"hello from {tag}", "TERMINATE"])
    right = offline_agent(f"right_{tag}", [f"reply in {tag}", "TERMINATE"])
    left.initiate_chat(right, message=f"start {tag}", max_turns=2, silent=True)
    return tag


def _agents_by_run(capture: Any) -> dict[str, set[str]]:
    runs = {s.context.trace_id: s.attributes[semconv.WORKFLOW_NAME] for s in capture.named("workflow ")}
    found: dict[str, set[str]] = {}
    for s in capture.spans:
        agent = (s.attributes or {}).get(semconv.GEN_AI_AGENT_NAME)
        if agent:
            found.setdefault(runs.get(s.context.trace_id, "outside any run"), set()).add(agent)
    return found


def _sub_agents_by_run(capture: Any, url: str) -> dict[str, list[tuple[str, str]]]:
    capture.write_dag(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT r.task_description, n.agent, n.status FROM dag_nodes n JOIN workflow_runs r ON r.id = n.run_id "
                "WHERE n.node_type = 'sub_agent' ORDER BY r.task_description, n.agent")).fetchall()
            return {task: sorted({(agent, status) for t, agent, status in rows if t == task})
                    for task in {row[0] for row in rows}}
    finally:
        engine.dispose()


@pytest.mark.parametrize("call", ["apply", "map", "apply_async_callback", "imap_unordered", "starmap"])
def test_a_thread_pool_made_in_one_run_serves_the_next_in_its_own(instrumented: Any, db_url: str, call: str) -> None:
    pools: list[ThreadPool] = []
    callbacks: dict[str, str] = {}

    def callback(tag: str) -> None:  # runs in the pool's result-handler thread, also started in run A
        _chat(f"{tag}_callback")
        callbacks[tag] = tag
        done.set()

    for name in ("A", "B"):
        done = threading.Event()
        with workflow(name, task=name), phase("control"), step(1, "pooled"):
            if not pools:
                pools.append(ThreadPool(2))  # made inside run A's step, reused by run B
            pool = pools[0]
            if call == "apply":
                pool.apply(_chat, (name,))
            elif call == "map":
                pool.map(_chat, [name])
            elif call == "apply_async_callback":
                pool.apply_async(_chat, (name,), callback=callback).get()
                done.wait()  # the callback has run (before the step is left)
            elif call == "imap_unordered":
                list(pool.imap_unordered(_chat, [name]))
            else:
                pool.starmap(_chat, [(name,)])
    pools[0].close()
    pools[0].join()

    expected = {name: {f"left_{name}", f"right_{name}"} for name in ("A", "B")}
    if call == "apply_async_callback":
        for name in ("A", "B"):
            expected[name] |= {f"left_{name}_callback", f"right_{name}_callback"}
    assert _agents_by_run(instrumented) == expected
    sub_agents = _sub_agents_by_run(instrumented, db_url)
    assert {task: {agent for agent, _ in rows} for task, rows in sub_agents.items()} == expected
    assert {status for rows in sub_agents.values() for _, status in rows} == {"completed"}


def test_a_thread_pool_made_in_a_run_serves_work_outside_any_run_outside(instrumented: Any) -> None:
    with workflow("A"), phase("control"), step(1, "makes the pool"):
        pool = ThreadPool(1)
        pool.apply(_chat, ("A",))
    pool.apply(_chat, ("outside",))  # after the run: in no run, as the caller
    pool.close()
    pool.join()
    assert _agents_by_run(instrumented) == {"A": {"left_A", "right_A"},
                                            "outside any run": {"left_outside", "right_outside"}}


def test_a_reused_executor_worker_carries_no_run_into_the_next(instrumented: Any) -> None:
    """Held up: ``ThreadPoolExecutor`` (one worker) reused by runs A and B, and by work outside any run."""
    executor = ThreadPoolExecutor(1)
    for name in ("A", "B"):
        with workflow(name), phase("control"), step(1, "pooled"):
            executor.submit(_chat, name).result()
    executor.submit(_chat, "outside").result()
    executor.shutdown()
    assert _agents_by_run(instrumented) == {"A": {"left_A", "right_A"}, "B": {"left_B", "right_B"},
                                            "outside any run": {"left_outside", "right_outside"}}


def test_uninstrument_gives_thread_pool_its_own_methods_back(capture: Any) -> None:
    from multiprocessing.pool import Pool

    import cmbagent_otel

    before = dict(ThreadPool.__dict__)
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        assert ThreadPool.apply_async is not Pool.apply_async
    finally:
        cmbagent_otel.uninstrument()
    assert dict(ThreadPool.__dict__) == before
    assert ThreadPool.apply_async is Pool.apply_async
