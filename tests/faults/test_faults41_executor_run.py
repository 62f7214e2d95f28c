"""MARS's ``WorkflowExecutor.run`` wrapped (session 40's ``_executor_run``) under cancellation (thirty-ninth fault
campaign).

The wrapper calls the executor's ``run`` (a coroutine function) at once, as the application's call does (a wrong
argument still raises there), and returns a coroutine of its own that opens the run around awaiting it. A task
cancelled before its first step (``task.cancel()`` right after ``create_task``, ``asyncio.wait_for`` timing out
first, a Ctrl-C in ``asyncio.run``) never starts that coroutine: the executor's own coroutine was left
unstarted and unclosed, and its garbage collection warned ``RuntimeWarning: coroutine 'run' was never
awaited``, a warning the application does not get without us (a cancelled, unstarted coroutine is closed
silently), an error under ``-W error``. The executor's coroutine is now closed when ours goes unstarted.

MARS's class is not installable in this interpreter (``tests/integration_cmbagent`` runs the real one); a class of
its shape stands in for it, patched with the integration's own wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import wrapt

from cmbagent_otel.integrations import cmbagent as integration
from tests.conftest import SpanCapture


def _executor_class(wrapped: bool) -> type:
    class WorkflowExecutor:  # MARS's cmbagent.workflows.composer.WorkflowExecutor: an async run
        workflow = SimpleNamespace(id="preloaded_control")
        context = None

        async def run(self, phases: int = 1) -> str:
            await asyncio.sleep(0)
            return f"ran {phases}"

    if wrapped:
        wrapt.wrap_function_wrapper(WorkflowExecutor, "run", integration._executor_run(integration._State()))
    return WorkflowExecutor


class _Module:
    """A module of cmbagent's shape with an ``async def`` entry point (as hitl workflows are in some versions)."""

    @staticmethod
    async def one_shot(task: str, work_dir: str = ".") -> str:
        await asyncio.sleep(0)
        return f"solved {task}"


def _entry(wrapped: bool) -> Any:
    module = type("cmbagent_module", (), {"one_shot": _Module.one_shot})
    if wrapped:
        wrapt.wrap_function_wrapper(module, "one_shot",
                                    integration._entry_wrapper(integration._State(), "one_shot", "one-shot"))
    return module.one_shot


def _cancelled_before_its_first_step(start: Any) -> list[str]:
    """The unawaited-coroutine warnings of a task running ``start()`` cancelled before it started."""

    async def main() -> None:
        task = asyncio.ensure_future(start())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("wrapped", [False, True], ids=["without us", "instrumented"])
def test_a_run_cancelled_before_it_started_leaves_no_unawaited_coroutine(capture: SpanCapture, wrapped: bool) -> None:
    """Fails on 3c387d5 instrumented: "coroutine 'WorkflowExecutor.run' was never awaited"."""
    executor = _executor_class(wrapped)
    assert _cancelled_before_its_first_step(lambda: executor().run()) == []
    assert capture.spans == []  # nothing ran: no run recorded


@pytest.mark.parametrize("wrapped", [False, True], ids=["without us", "instrumented"])
def test_an_async_entry_point_cancelled_before_it_started_leaves_no_unawaited_coroutine(
        capture: SpanCapture, wrapped: bool) -> None:
    """The same wrapper shape for cmbagent's ``async def`` entry points (``_entry_wrapper``): fails on 3c387d5
    instrumented."""
    entry = _entry(wrapped)
    assert _cancelled_before_its_first_step(lambda: entry("a task")) == []
    assert asyncio.run(entry("a task")) == "solved a task"
    assert [s.name for s in capture.spans if s.parent is None] == (["workflow one_shot"] if wrapped else [])


def test_the_wrapped_run_runs_as_the_run_and_raises_a_wrong_call_at_once(capture: SpanCapture) -> None:
    """Pins: the executor's run is the run (outside any); a wrong argument raises at the call, unchanged."""
    cls = _executor_class(wrapped=True)
    assert asyncio.run(cls().run(2)) == "ran 2"
    assert [s.name for s in capture.spans] == ["workflow preloaded_control"]
    with pytest.raises(TypeError):
        cls().run(1, 2, 3)
    assert _no_warnings_left()


def _no_warnings_left() -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return not [w for w in caught if issubclass(w.category, RuntimeWarning)]


