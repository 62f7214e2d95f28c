"""The MARS tests' setup leaves the PyPI package as it found it (session 42, x-order42).

``pypi_cmbagent_for_mars`` swaps ``cmbagent.cmbagent.CMBAgent`` for a subclass while MARS's phases run. Entered
by two threads at once (``test_cmbreal16_audit``'s two phases awaited in two threads), the one that left last put
back the class the other had installed whenever it had entered second: the subclass stayed for the rest of the
process. It defines no ``solve``, so every later ``instrument()`` found no ``CMBAgent.solve`` to wrap and the
PyPI runs of the process lost their step spans (``step 2: 0 spans``): a race between the two threads' exits,
which is why no single test16 test followed by the PyPI test failed reliably.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from .conftest import pypi_cmbagent_for_mars
from .test_cmbagent_runs import _one
from .test_real_audit import run_cmbagent  # noqa: F401 - the fixture (getfixturevalue)

pytestmark = pytest.mark.cmbagent_autogen


def _overlapping_entries() -> None:
    """Two threads inside ``pypi_cmbagent_for_mars`` at once, the first to enter the first to leave (the order
    that left the second one's saved class behind): each step waits for the other thread's event."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with pypi_cmbagent_for_mars():
                first_in.set()
                assert second_in.wait(60)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            first_in.set()
            first_out.set()

    def second() -> None:
        try:
            assert first_in.wait(60)
            with pypi_cmbagent_for_mars():
                second_in.set()
                assert first_out.wait(60)
        except BaseException as exc:
            errors.append(exc)
        finally:
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_the_mars_setup_entered_by_two_threads_at_once_puts_the_pypi_class_back(mars_phases: Path) -> None:
    """Whatever the order the threads leave in, the PyPI ``CMBAgent`` is back and MARS's manager asks for its
    managed-mode arguments again once the last one left (on 0297505: the first thread's subclass stayed)."""
    import cmbagent.cmbagent as module
    from cmbagent.phases.execution_manager import PhaseExecutionManager

    pypi, managed = module.CMBAgent, vars(PhaseExecutionManager)["get_managed_cmbagent_kwargs"]
    _overlapping_entries()
    assert module.CMBAgent is pypi
    assert vars(PhaseExecutionManager)["get_managed_cmbagent_kwargs"] is managed


def test_a_pypi_run_after_the_mars_setup_overlapped_in_two_threads_has_its_steps(
        request: pytest.FixtureRequest, mars_phases: Path) -> None:
    """The symptom the audit met: a PyPI ``planning_and_control`` after two threads overlapped in the MARS setup
    has its three step spans, each holding its agents (on 0297505: ``step 1: 0 spans``, ``CMBAgent.solve``
    left unwrapped by the run's ``instrument()`` since the module's class was the test's subclass)."""
    _overlapping_entries()
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=lambda script: script)
    assert run.error is None, run.error
    by_id = {s.context.span_id: s for s in run.spans}
    for n in (1, 2, 3):
        step = _one(run, f"step {n}")
        assert [s for s in run.spans if s.name.startswith("invoke_agent") and s.parent is not None
                and _under(s, step, by_id)], f"step {n} holds no agent turn"


def _under(span: Any, ancestor: Any, by_id: dict[int, Any]) -> bool:
    while span.parent is not None:
        span = by_id.get(span.parent.span_id)
        if span is None:
            return False
        if span is ancestor:
            return True
    return False


def test_a_run_whose_cmbagent_class_is_an_apps_subclass_has_its_steps(request: pytest.FixtureRequest,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The product side of the same fault: an application that rebinds ``cmbagent.cmbagent.CMBAgent`` to its own
    subclass (inheriting ``solve``, as MARS's setup above adapts the PyPI class) before ``instrument()``. The
    instrumentor looked for ``solve`` in that class only, found none and wrapped nothing: every step span of the
    process lost (on 0297505 ``step 1: 0 spans``). It now wraps the class of the MRO that defines it."""
    import cmbagent.cmbagent as module

    class AppCMBAgent(module.CMBAgent):  # type: ignore[misc,name-defined]
        """An application's adaptation: defines no ``solve`` of its own."""

    monkeypatch.setattr(module, "CMBAgent", AppCMBAgent)
    run = request.getfixturevalue("run_cmbagent")("planning_and_control", responder=lambda script: script)
    assert run.error is None, run.error
    by_id = {s.context.span_id: s for s in run.spans}
    for n in (1, 2, 3):
        step = _one(run, f"step {n}")
        assert [s for s in run.spans if s.name.startswith("invoke_agent") and _under(s, step, by_id)], n
