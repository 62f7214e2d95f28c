"""Patches made as ``uninstrument()`` runs in another thread (41st fault campaign: session 42's MARS
``Phase.__init_subclass__`` hook and the post-import hooks under faults).

The cmbagent integration patches under its cycle's lock, but read ``state.active`` before taking it: a
``Phase`` subclass defined (or a MARS module imported) in one thread while another ran ``uninstrument()``
passed the check, waited for the lock, and patched once ``uninstrument()`` had put everything back. The
class stayed wrapped by a dead cycle's wrapper (a pass-through), outside any list ``uninstrument()`` reads,
and the next ``instrument()`` found it "ours already" and left it so: that phase's spans were never recorded
again. The interleaving is made certain by running ``uninstrument()`` at the patch's entry
(``conftest.call_at``), with the cycle's lock (an ``RLock``) held there as the waiting thread held it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cmbagent_otel
from cmbagent_otel.integrations.cmbagent import CmbagentInstrumentor
from tests.conftest import SpanCapture

from .conftest import call_at

_BASE = "cmbagent.phases.base"


@pytest.fixture
def mars_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """A ``Phase`` base class of MARS's shape in ``cmbagent.phases.base`` (MARS's source is not installed here:
    a module of its name holding a class of its shape), with a ``cmbagent`` package to find when none is."""
    if importlib.util.find_spec("cmbagent") is None:
        (tmp_path / "cmbagent").mkdir()
        (tmp_path / "cmbagent" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
    module = types.ModuleType(_BASE)
    exec("class Phase:\n    async def execute(self, context):\n        return context\n", vars(module))
    monkeypatch.setitem(sys.modules, _BASE, module)
    yield module.Phase
    cmbagent_otel.uninstrument()


def _entered(code: types.CodeType) -> Any:
    return lambda frame, event, _arg: event == "call" and frame.f_code is code


def _instrument(capture: SpanCapture) -> None:
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_threading=False, set_global=False)


def test_a_phase_class_defined_as_uninstrument_runs_is_left_as_defined(capture: SpanCapture, mars_base: type) -> None:
    """Fails on 5d6278f: the class defined is wrapped after ``uninstrument()``, and the next cycle leaves it with
    the dead cycle's wrapper."""
    _instrument(capture)
    assert "__init_subclass__" in vars(mars_base)  # the hook for the classes defined later
    with call_at(_entered(CmbagentInstrumentor._patch_phase_execute.__code__), cmbagent_otel.uninstrument) as ran:
        class Late(mars_base):  # type: ignore[valid-type, misc]
            async def execute(self, context: Any) -> Any:
                return context
    assert ran  # uninstrument() ran as the class's patch began
    assert not hasattr(vars(Late)["execute"], "__wrapped__")
    assert "__init_subclass__" not in vars(mars_base)


def test_a_module_patched_as_uninstrument_runs_is_left_as_imported(capture: SpanCapture, mars_base: type) -> None:
    """Fails on 5d6278f: the ``Phase`` hook is installed after ``uninstrument()`` (and never removed). The module's
    post-import hook (``_patch_module``, as wrapt calls it for a module imported in another thread) runs with
    ``uninstrument()`` at its ``_patch_phases``."""
    _instrument(capture)
    instrumentor = CmbagentInstrumentor()
    with call_at(_entered(CmbagentInstrumentor._patch_phases.__code__), cmbagent_otel.uninstrument) as ran:
        instrumentor._patch_module(sys.modules[_BASE])
    assert ran
    assert "__init_subclass__" not in vars(mars_base)


class _OwnExecutor:
    """A code executor written from scratch (no AG2 base class): patched when an agent holding one first replies."""

    @property
    def code_extractor(self) -> Any:
        from autogen.coding import MarkdownCodeExtractor

        return MarkdownCodeExtractor()

    def execute_code_blocks(self, code_blocks: Any) -> Any:
        return code_blocks

    def restart(self) -> None:
        pass


def test_an_executor_adopted_as_uninstrument_runs_is_left_as_defined(capture: SpanCapture) -> None:
    """Fails on 5d6278f: the executor class adopted (by a chat in another thread: here run as ``uninstrument()``
    puts the patches back) stays wrapped after ``uninstrument()``, outside its list."""
    from autogen import ConversableAgent

    from cmbagent_otel.instrumentation import _patching, ag2

    original = vars(_OwnExecutor)["execute_code_blocks"]
    agent = ConversableAgent("executor", llm_config=False, human_input_mode="NEVER",
                             code_execution_config={"executor": _OwnExecutor()})
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False, instrument_threading=False,
                             set_global=False)
    state = ag2.AG2Instrumentor()._state

    def first_put_back(frame: Any, event: str, _arg: Any) -> bool:
        return event == "return" and frame.f_code is _patching.unwrap_ours.__code__

    try:
        # the other thread's first reply: it passed the cycle's checks before uninstrument() began
        with call_at(first_put_back, lambda: ag2._adopt_code_executor(state, agent)) as ran:
            cmbagent_otel.uninstrument()
        assert ran
    finally:
        cmbagent_otel.uninstrument()
    assert vars(_OwnExecutor)["execute_code_blocks"] is original


def test_uninstrument_removes_its_wrapper_not_the_one_the_application_put_after(capture: SpanCapture,
                                                                                 mars_base: type) -> None:
    """Fails on 5d6278f: ``uninstrument()`` took off the application's wrapper (the outermost: the generic
    ``unwrap``) and left the dead cycle's own in its place. The application wrapped a patched phase class's
    ``execute`` after ``instrument()`` (its own tracing, another instrumentation: wrapt)."""
    import wrapt

    _instrument(capture)

    class Late(mars_base):  # type: ignore[valid-type, misc]
        async def execute(self, context: Any) -> Any:
            return context

    original = vars(Late)["execute"].__wrapped__
    calls: list[Any] = []

    def applications(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append(args)
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(Late, "execute", applications)
    cmbagent_otel.uninstrument()
    kept = vars(Late)["execute"]
    assert kept._self_wrapper is applications and kept.__wrapped__ is original
