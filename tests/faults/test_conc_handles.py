"""The handle API of a block (``set_summary``/``set_attribute``/``fail``) under concurrency
(twenty-second fault campaign).

Before, a call from a thread the block's context did not follow (a pool worker: the OpenTelemetry
threading instrumentation carries the OTel context there, not the blocks entered) acted on the block
object's most recent entry: with one block object used by two runs at once (a module-level
``step(1, ...)``), run A's summary and failure went onto run B's step. And inside a function the block
decorates, the block's own handle did nothing (each call enters a copy of the block). Real AG2 agents
on the offline model client; the DAG rows written by the real writer into SQLite.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import create_engine, text

from cmbagent_otel import phase, semconv, step, workflow
from cmbagent_otel.testing import offline_agent

SUMMARY = semconv.STEP_SUMMARY


def _chat(tag: str) -> None:
    left = offline_agent(f"left_{tag}", [f"hello from {tag}", "TERMINATE"])
    right = offline_agent(f"right_{tag}", [f"reply in {tag}", "TERMINATE"])
    left.initiate_chat(right, message=f"start {tag}", max_turns=2, silent=True)


def _runs(capture: Any) -> dict[str, int]:
    """Workflow name -> its trace id."""
    return {s.attributes[semconv.WORKFLOW_NAME]: s.context.trace_id for s in capture.named("workflow ")}


def _rows(capture: Any, url: str) -> dict[str, list[tuple[Any, ...]]]:
    capture.write_dag(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            runs = dict(conn.execute(text("SELECT id, task_description FROM workflow_runs")).fetchall())
            out: dict[str, list[tuple[Any, ...]]] = {}
            for run_id, status in conn.execute(text("SELECT id, status FROM workflow_runs")).fetchall():
                nodes = conn.execute(text("SELECT node_type, agent, status FROM dag_nodes WHERE run_id = :r "
                                          "AND node_type = 'agent' ORDER BY order_index"), {"r": run_id}).fetchall()
                out[str(runs[run_id])] = [status, *[tuple(n) for n in nodes]]
            return out
    finally:
        engine.dispose()


def test_one_block_object_in_two_concurrent_runs_its_handle_from_a_pool_worker(
        instrumented: Any, sqlite_url: str) -> None:
    shared = step(1, "analyse", agent="engineer")  # declared once, used by every run
    pool = ThreadPoolExecutor(2)
    both_in = threading.Barrier(2)
    both_set = threading.Barrier(2)

    def work(name: str) -> None:
        _chat(name)  # the step's AG2 chat runs in the worker
        shared.set_summary(f"summary of {name}")
        if name == "B":
            shared.fail("B judged its step unsuccessful")

    def run(name: str) -> None:
        with workflow(name, task=name), phase("control"), shared:
            both_in.wait()  # both runs' entries of `shared` are open
            pool.submit(work, name).result()
            both_set.wait()  # neither leaves before both set their summaries

    threads = [threading.Thread(target=run, args=(name,)) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.shutdown()

    runs = _runs(instrumented)
    steps = {name: [s for s in instrumented.named("step ") if s.context.trace_id == trace_id]
             for name, trace_id in runs.items()}
    assert {name: [s.attributes.get(SUMMARY) for s in found] for name, found in steps.items()} == {
        "A": ["summary of A"], "B": ["summary of B"]}
    assert steps["A"][0].status.is_ok and not steps["B"][0].status.is_ok
    for name, trace_id in runs.items():  # each chat under its own run's step
        chats = [s for s in instrumented.spans if f"left_{name}" in str(s.attributes.get(semconv.GEN_AI_AGENT_NAME))]
        assert chats and {s.context.trace_id for s in chats} == {trace_id}
    assert _rows(instrumented, sqlite_url) == {
        "A": ["completed", ("agent", "engineer", "completed")],
        "B": ["completed", ("agent", "engineer", "failed")],
    }


def test_the_handle_of_a_decorating_block_inside_the_function_it_decorates(instrumented: Any) -> None:
    plain, coro, gen, agen = (step(n, f"decorated {n}") for n in (1, 2, 3, 4))

    @plain
    def plain_step(tag: str) -> None:
        _chat(tag)
        plain.set_summary(f"plain {tag}")

    @coro
    async def async_step(tag: str) -> None:
        await asyncio.sleep(0)
        coro.set_summary(f"async {tag}")

    @gen
    def generator_step(tag: str) -> Iterator[int]:
        yield 1
        gen.set_summary(f"generator {tag}")
        yield 2

    @agen
    async def async_generator_step(tag: str) -> Any:
        yield 1
        agen.fail(f"async generator {tag} failed")

    async def consume(tag: str) -> None:
        await async_step(tag)
        async for _ in async_generator_step(tag):
            pass

    both_in = threading.Barrier(2)

    def run(tag: str) -> None:
        with workflow(tag), phase("control"):
            both_in.wait()
            plain_step(tag)
            list(generator_step(tag))
            asyncio.run(consume(tag))

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    runs = _runs(instrumented)
    for tag, trace_id in runs.items():
        found = {s.name: s for s in instrumented.named("step ") if s.context.trace_id == trace_id}
        assert {name: s.attributes.get(SUMMARY) for name, s in found.items()} == {
            "step 1": f"plain {tag}", "step 2": f"async {tag}", "step 3": f"generator {tag}", "step 4": None}
        assert found["step 4"].status.description == f"async generator {tag} failed"
        assert all(s.status.is_ok for name, s in found.items() if name != "step 4")


def test_a_handle_called_outside_every_run_of_the_block_changes_none(instrumented: Any) -> None:
    """A thread whose context is in another run (C) than the block's open entries (A): nothing changes."""
    shared = step(1, "shared")
    entered, done = threading.Event(), threading.Event()

    def run_a() -> None:
        with workflow("A"), phase("control"), shared:
            entered.set()
            done.wait()

    thread = threading.Thread(target=run_a)
    thread.start()
    entered.wait()
    with workflow("C"), phase("control"), step(2, "other"):
        shared.set_summary("said in run C")
    done.set()
    thread.join()
    assert [s.attributes.get(SUMMARY) for s in instrumented.named("step ")] == [None, None]



def test_a_block_left_from_another_runs_context_still_ends(instrumented: Any) -> None:
    """Guard (passes on 40d74c5 too): leaving is not a handle call; the block's only entry ends even when
    the thread leaving it is inside another run."""
    shared = step(1, "entered by A")
    entered, left = threading.Event(), threading.Event()

    def run_a() -> None:
        with workflow("A"), phase("control"):
            shared.__enter__()
            entered.set()
            left.wait()

    thread = threading.Thread(target=run_a)
    thread.start()
    entered.wait()
    with workflow("C"), phase("control"):
        shared.__exit__(None, None, None)  # handed over and left here, in run C's context
    left.set()
    thread.join()
    assert [s.name for s in instrumented.named("step ")] == ["step 1"]
