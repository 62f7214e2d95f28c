"""Block objects: entered twice, from two threads, around generators; the redo's agent."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from cmbagent_otel import WorkflowNestingError, phase, redo, semconv, step, workflow
from cmbagent_otel._spans import TracedSpan


def _parent_name(capture: Any, span: Any) -> str | None:
    parent = capture.parent_of(span)
    return parent.name if parent is not None else None


def test_a_block_object_entered_twice_opens_two_spans(capture: Any) -> None:
    control = phase("control")
    again = step(1, "load")
    with workflow("w"), control:
        with again:
            again.set_attribute("round", 1)
        with again:
            again.set_attribute("round", 2)
            again.fail("second round failed")
    first, second = capture.named("step 1")
    assert (first.attributes["round"], second.attributes["round"]) == (1, 2)
    assert first.status.status_code is StatusCode.UNSET and second.status.status_code is StatusCode.ERROR
    assert first.context.span_id != second.context.span_id
    assert {_parent_name(capture, s) for s in (first, second)} == {"phase control"}


def test_nested_entries_of_one_object_act_on_the_innermost(capture: Any) -> None:
    wf = workflow("outer")
    with wf:
        assert not wf.joined
        with wf:  # a workflow inside a workflow joins it: no second run
            assert wf.joined
            with phase("p"):
                pass
        assert not wf.joined
        with phase("q"):
            pass
    assert [s.name for s in capture.named("workflow")] == ["workflow outer"]
    assert {_parent_name(capture, s) for s in capture.named("phase")} == {"workflow outer"}


def test_one_object_in_two_threads_keeps_each_threads_state(capture: Any) -> None:
    """Two threads enter the same block object at once: each gets its own span and handle."""
    shared = step(1, "shared")
    both_inside = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            with workflow(f"run {tag}"), phase("control"), shared:
                both_inside.wait(timeout=30)  # both entries are open at the same time
                shared.set_attribute("tag", tag)
                with TracedSpan(f"work {tag}", "custom"):
                    pass
                both_inside.wait(timeout=30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    steps = capture.named("step 1")
    assert sorted(s.attributes["tag"] for s in steps) == ["a", "b"]
    for tag in ("a", "b"):
        span = next(s for s in steps if s.attributes["tag"] == tag)
        assert capture.one(f"work {tag}").parent.span_id == span.context.span_id
        assert span.context.trace_id == capture.one(f"workflow run {tag}").context.trace_id


def test_one_object_in_two_asyncio_tasks(capture: Any) -> None:
    shared = step(2, "async")

    async def task(tag: str, gate: asyncio.Event, other: asyncio.Event) -> None:
        async with shared:
            gate.set()
            await other.wait()  # both entries open at once
            shared.set_attribute("tag", tag)

    async def main() -> None:
        with workflow("w"), phase("control"):
            a, b = asyncio.Event(), asyncio.Event()
            await asyncio.gather(task("a", a, b), task("b", b, a))

    asyncio.run(main())
    assert sorted(s.attributes["tag"] for s in capture.named("step 2")) == ["a", "b"]


def test_a_decorated_generator_keeps_its_span_open_until_iteration_ends(capture: Any) -> None:
    @step(1, "stream")
    def numbers(n: int) -> Any:
        for i in range(n):
            with TracedSpan(f"item {i}", "custom"):
                pass
            yield i
        return "done"

    with workflow("w"), phase("control"):
        gen = numbers(3)
        assert capture.named("step 1") == []  # nothing runs before iteration starts
        seen = []
        for value in gen:
            with TracedSpan(f"caller {value}", "custom"):  # the caller's work between items
                pass
            seen.append(value)
            assert capture.named("step 1") == []  # still open while suspended
    assert seen == [0, 1, 2]
    (span,) = capture.named("step 1")
    for i in range(3):
        assert capture.one(f"item {i}").parent.span_id == span.context.span_id
        assert capture.parent_of(capture.one(f"caller {i}")).name == "phase control"  # never under the step
    assert span.end_time >= capture.one("item 2").end_time


def test_a_generator_closed_early_or_failing(capture: Any) -> None:
    @step(1, "stream")
    def forever() -> Any:
        i = 0
        while True:
            yield i
            i += 1

    @step(2, "broken")
    def broken() -> Any:
        yield 1
        raise ValueError("bad item")

    with workflow("w"), phase("control"):
        for value in forever():
            if value == 2:
                break  # the generator is closed: its span ends, not failed
        with pytest.raises(ValueError, match="bad item"):
            list(broken())
    (first,) = capture.named("step 1")
    (second,) = capture.named("step 2")
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR and "bad item" in second.status.description
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


def test_send_and_throw_reach_the_generator(capture: Any) -> None:
    @step(1, "echo")
    def echo() -> Any:
        received = []
        while True:
            try:
                value = yield len(received)
            except KeyError:
                received.append("thrown")
                continue
            if value is None:
                return received
            received.append(value)

    with workflow("w"), phase("control"):
        gen = echo()
        assert next(gen) == 0
        assert gen.send("a") == 1
        assert gen.throw(KeyError("k")) == 2
        with pytest.raises(StopIteration) as stop:
            gen.send(None)
    assert stop.value.value == ["a", "thrown"]
    assert len(capture.named("step 1")) == 1


def test_a_decorated_async_generator_keeps_its_span_open(capture: Any) -> None:
    @step(1, "astream")
    async def numbers(n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            with TracedSpan(f"item {i}", "custom"):
                pass
            yield i

    async def main() -> list[int]:
        with workflow("w"), phase("control"):
            out = []
            async for value in numbers(2):
                with TracedSpan(f"caller {value}", "custom"):
                    pass
                out.append(value)
            return out

    assert asyncio.run(main()) == [0, 1]
    (span,) = capture.named("step 1")
    assert all(capture.one(f"item {i}").parent.span_id == span.context.span_id for i in range(2))
    assert all(capture.parent_of(capture.one(f"caller {i}")).name == "phase control" for i in range(2))


def test_a_generator_outside_its_nesting_fails_on_first_next(capture: Any) -> None:
    @step(1, "orphan")
    def orphan() -> Any:
        yield 1

    gen = orphan()  # building the generator checks nothing yet, as for any generator
    with pytest.raises(WorkflowNestingError):
        next(gen)


def test_a_redo_is_its_steps_agents_work(capture: Any) -> None:
    with workflow("w", max_redos=3), phase("control"), step(2, "fit", agent="engineer"):
        with redo(2, 1, "smaller step"):
            pass
        with redo(2, 2, "another model", agent="researcher"):
            pass
    first, second = capture.named("redo")
    assert first.attributes[semconv.STEP_AGENT] == "engineer"
    assert second.attributes[semconv.STEP_AGENT] == "researcher"
