"""Automatic workflow structure for cmbagent runs, without changing cmbagent's code.

:func:`instrument_cmbagent` patches cmbagent (through wrapt) so that its runs produce the
``workflow > phase > step [> redo]`` span tree of :mod:`cmbagent_otel.workflow`:

* workflow entry points (``one_shot``, ``planning_and_control``,
  ``planning_and_control_context_carryover``, ``control``, ``human_in_the_loop``,
  ``get_keywords`` and, in the MARS fork, ``deep_research``, ``idea_generation``,
  ``hitl_*_workflow``, ``copilot``...) open a ``workflow`` span carrying cmbagent's mode
  string, the task, work_dir and the agent/model of the run;
* ``CMBAgent.solve`` opens the phase it runs (``planning`` for the planner, ``one_shot``,
  ``chat``, otherwise ``control``); a solve for one plan step (``step=n``, the
  context-carryover loop) opens ``step n`` with the goal and agent from the plan and the
  summary cmbagent derives from the step's chat, inside one ``control`` phase shared by
  all steps of the run;
* MARS's ``PhaseExecutionManager`` (``start``/``start_step``/``create_redo_branch``/
  ``complete_step``/``fail_step``/``complete``/``fail``) opens phase, step and redo spans.

A CMBAgent built or solved inside a phase (nested instances) joins the active trace: a
workflow opened inside another joins it and a solve inside a phase opens no new phase.

Every patch is looked up defensively: an attribute missing from the installed cmbagent is
skipped (logged at debug level) and no telemetry error reaches the application.
:func:`uninstrument_cmbagent` puts back the original objects (identity preserved).
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
import logging
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import wrapt

from .._context import current_scope
from ..workflow import _Block, phase, redo, step, workflow

logger = logging.getLogger("cmbagent_otel")

#: Workflow entry points -> cmbagent mode string written to ``workflow_runs.mode``.
ENTRY_POINTS: Mapping[str, str] = {
    "one_shot": "one-shot",
    "get_keywords": "one-shot",
    "planning_and_control": "planning-control",
    "planning_and_control_context_carryover": "planning-control",
    "control": "planning-control",
    "deep_research": "planning-control",
    "human_in_the_loop": "hitl-interactive",
    "preprocess_task": "enhance-input",
    "hitl_interactive_workflow": "hitl-interactive",
    "hitl_planning_only_workflow": "hitl-interactive",
    "hitl_error_recovery_workflow": "hitl-interactive",
    "idea_generation": "idea-generation",
    "idea_to_execution": "idea-generation",
    "copilot": "copilot",
    "copilot_async": "copilot",
    "swarm_copilot": "copilot",
    "swarm_copilot_async": "copilot",
}

#: Modules whose entry-point attributes are patched (PyPI layout first, then MARS's).
ENTRY_MODULES: tuple[str, ...] = (
    "cmbagent.cmbagent",
    "cmbagent",
    "cmbagent.workflows.planning_control",
    "cmbagent.workflows.one_shot",
    "cmbagent.workflows.control",
    "cmbagent.workflows.idea_workflows",
    "cmbagent.workflows.hitl_workflow",
    "cmbagent.workflows.copilot",
    "cmbagent.workflows.swarm_copilot",
    "cmbagent.workflows",
)
CMBAGENT_CLASS_MODULE = "cmbagent.cmbagent"
PHASE_MANAGER_MODULE = "cmbagent.phases.execution_manager"

PLANNER_AGENTS = frozenset({"plan_setter", "planner", "hitl_planner"})

_lock = threading.RLock()
_active = False
_hooked: set[str] = set()


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any
    wrapper: Any


_patches: list[_Patch] = []


# --- patch bookkeeping ---------------------------------------------------------------
class _Wrapper(wrapt.FunctionWrapper):  # type: ignore[misc]
    """Marks wrappers installed by this module, so they are never stacked twice."""


def _patch(owner: Any, name: str, wrapper_fn: Callable[..., Any], *, class_attr: bool = False) -> bool:
    if any(p.owner is owner and p.name == name for p in _patches):
        return False
    try:
        current = owner.__dict__.get(name) if class_attr else getattr(owner, name, None)
    except Exception:
        current = None
    if current is None or not callable(current):
        logger.debug("cmbagent_otel: %s.%s not found in this cmbagent; skipped",
                     getattr(owner, "__name__", owner), name)
        return False
    if isinstance(current, _Wrapper):
        # a re-export bound to a wrapper installed on its defining module: restore it too
        _patches.append(_Patch(owner, name, current.__wrapped__, current))
        return True
    try:
        wrapper = _Wrapper(current, wrapper_fn)
        setattr(owner, name, wrapper)
    except Exception:
        logger.debug("cmbagent_otel: could not patch %s", name, exc_info=True)
        return False
    _patches.append(_Patch(owner, name, current, wrapper))
    return True


def _patch_module(module: ModuleType) -> None:
    with _lock:
        if not _active:
            return
        name = module.__name__
        try:
            if name in ENTRY_MODULES:
                for func_name, mode in ENTRY_POINTS.items():
                    if func_name in vars(module):
                        _patch(module, func_name, _entry_wrapper(func_name, mode))
            if name == CMBAGENT_CLASS_MODULE:
                cls = getattr(module, "CMBAgent", None)
                if isinstance(cls, type):
                    _patch(cls, "solve", _solve_wrapper, class_attr=True)
                else:
                    logger.debug("cmbagent_otel: cmbagent.cmbagent.CMBAgent not found; skipped")
            if name == PHASE_MANAGER_MODULE:
                cls = getattr(module, "PhaseExecutionManager", None)
                if isinstance(cls, type):
                    instrument_phase_manager(cls)
        except Exception:
            logger.debug("cmbagent_otel: patching %s failed", name, exc_info=True)


def _on_import(module: ModuleType) -> None:
    _patch_module(module)


def instrument_phase_manager(cls: type) -> None:
    """Patch a ``PhaseExecutionManager`` class (MARS) so its lifecycle opens spans.

    Methods the class does not define are skipped. Also enables the integration's
    wrappers (undone by :func:`uninstrument_cmbagent`).
    """
    global _active
    with _lock:
        _active = True
        for name, fn in (
            ("start", _pm_start),
            ("start_step", _pm_start_step),
            ("create_redo_branch", _pm_redo),
            ("complete_step", _pm_complete_step),
            ("fail_step", _pm_fail_step),
            ("complete", _pm_complete),
            ("fail", _pm_fail),
            ("__exit__", _pm_exit),
        ):
            _patch(cls, name, fn, class_attr=True)


def instrument_cmbagent() -> bool:
    """Patch cmbagent when it is installed; return whether it is.

    Modules already imported are patched at once, the others when they get imported (so
    calling this does not import cmbagent). Idempotent.
    """
    global _active
    with _lock:
        if _active:
            return True
        try:
            if importlib.util.find_spec("cmbagent") is None:
                return False
        except (ImportError, ValueError):
            return False
        _active = True
        for name in (*ENTRY_MODULES, PHASE_MANAGER_MODULE):
            if name in _hooked:
                module = sys.modules.get(name)
                if module is not None:
                    _patch_module(module)
            else:
                _hooked.add(name)
                # fires now for a module already imported, otherwise right after its import
                wrapt.register_post_import_hook(_on_import, name)
        return True


def uninstrument_cmbagent() -> None:
    """Restore every attribute patched by :func:`instrument_cmbagent` to its original object."""
    global _active
    with _lock:
        _active = False
        while _patches:
            patch = _patches.pop()
            try:
                setattr(patch.owner, patch.name, patch.original)
            except Exception:
                logger.debug("cmbagent_otel: could not restore %s", patch.name, exc_info=True)


def is_instrumented() -> bool:
    """Whether :func:`instrument_cmbagent` is in effect."""
    return _active


# --- helpers ---------------------------------------------------------------------------
def _enter(block: _Block) -> _Block | None:
    """Enter ``block``; a nesting error (e.g. redo above max_redos) only skips the span."""
    try:
        block.__enter__()
    except Exception:
        logger.debug("cmbagent_otel: could not open %r", block, exc_info=True)
        return None
    return block


def _exit(block: _Block | None, exc: BaseException | None = None) -> None:
    if block is None:
        return
    try:
        block.__exit__(type(exc) if exc is not None else None, exc,
                       exc.__traceback__ if exc is not None else None)
    except Exception:
        logger.debug("cmbagent_otel: could not close %r", block, exc_info=True)


@contextmanager
def _opened(block: _Block | None) -> Iterator[_Block | None]:
    entered = _enter(block) if block is not None else None
    try:
        yield entered
    except BaseException as exc:
        _exit(entered, exc)
        raise
    else:
        _exit(entered)


def _bind(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except Exception:
        return dict(kwargs)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class _Slot:
    """A phase left open across several ``solve`` calls (the context-carryover step loop)."""

    name: str | None = None
    block: _Block | None = None

    def close(self, exc: BaseException | None = None) -> None:
        block, self.block, self.name = self.block, None, None
        _exit(block, exc)

    def open(self, name: str) -> None:
        self.close()
        block = _enter(phase(name))
        if block is not None:
            self.name, self.block = name, block


_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("cmbagent_otel_phase_slot", default=None)


@contextmanager
def _run(block: workflow) -> Iterator[None]:
    """Open a workflow (or join the active one) with its own phase slot."""
    entered = _enter(block)
    # a joined workflow reuses the enclosing entry point's slot; a user's plain `with workflow()`
    # has none, so the first entry point inside it provides one
    own_slot = entered is not None and (not block.joined or _slot.get() is None)
    token = _slot.set(_Slot()) if own_slot else None
    try:
        yield
    except BaseException as exc:
        if token is not None:
            slot = _slot.get()
            _slot.reset(token)
            if slot is not None:
                slot.close(exc)
        _exit(entered, exc)
        raise
    else:
        if token is not None:
            slot = _slot.get()
            _slot.reset(token)
            if slot is not None:
                slot.close()
        _exit(entered)


# --- workflow entry points -------------------------------------------------------------
def _workflow_for_entry(name: str, mode: str, func: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> workflow:
    bound = _bind(func, args, kwargs)
    agent = _text(bound.get("agent"))
    if agent is None and "engineer_model" in bound:
        agent = "engineer"
    model = _text(bound.get(f"{agent}_model")) if agent else None
    if model is None:
        model = _text(bound.get("engineer_model"))
    work_dir = bound.get("work_dir")
    return workflow(
        name,
        mode=mode,
        task=_text(bound.get("task")),
        agent=agent,
        model=model,
        work_dir=_text(work_dir),
        max_redos=_int(bound.get("max_redos")),
    )


def _entry_wrapper(name: str, mode: str) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not _active:
            return wrapped(*args, **kwargs)
        try:
            block = _workflow_for_entry(name, mode, wrapped, args, kwargs)
        except Exception:
            logger.debug("cmbagent_otel: could not describe %s", name, exc_info=True)
            return wrapped(*args, **kwargs)
        if inspect.iscoroutinefunction(wrapped):
            return _run_async(block, wrapped(*args, **kwargs))
        with _run(block):
            return wrapped(*args, **kwargs)

    return wrapper


async def _run_async(block: workflow, coro: Any) -> Any:
    with _run(block):
        return await coro


# --- CMBAgent.solve --------------------------------------------------------------------
def _phase_name(initial_agent: str | None, solve_mode: str | None, agent_mode: str | None) -> str:
    if initial_agent in PLANNER_AGENTS:
        return "planning"
    if solve_mode == "one_shot" or agent_mode == "one_shot":
        return "one_shot"
    if solve_mode == "chat" or agent_mode == "chat":
        return "chat"
    return "control"


_STEP_RE = re.compile(r"^\s*-\s*Step\s+(\d+)\s*:", re.IGNORECASE)
_SUBTASK_RE = re.compile(r"^\s*\*\s*sub-task:\s*(.*)$", re.IGNORECASE)
_AGENT_RE = re.compile(r"^\s*\*\s*agent in charge:\s*(.*)$", re.IGNORECASE)


def _plan_steps(plan: Any) -> list[dict[str, Any]]:
    """cmbagent keeps the plan as a list of sub-task dicts or as PlannerResponse.format() text."""
    if isinstance(plan, list):
        return [s for s in plan if isinstance(s, dict)]
    if isinstance(plan, Mapping) and isinstance(plan.get("sub_tasks"), list):
        return [s for s in plan["sub_tasks"] if isinstance(s, dict)]
    if not isinstance(plan, str):
        return []
    steps: list[dict[str, Any]] = []
    for line in plan.splitlines():
        if _STEP_RE.match(line):
            steps.append({})
        elif steps and (m := _SUBTASK_RE.match(line)):
            steps[-1]["sub_task"] = m.group(1).strip()
        elif steps and (m := _AGENT_RE.match(line)):
            steps[-1]["sub_task_agent"] = m.group(1).strip()
    return steps


def _get(context: Any, key: str) -> Any:
    """Read a key from a dict or an AG2 ``ContextVariables`` (cmbagent passes both)."""
    try:
        getter = getattr(context, "get", None)
        return getter(key) if callable(getter) else None
    except Exception:
        return None


def _step_from_plan(number: int, context: Any) -> tuple[str, str | None]:
    goal, agent = "", None
    steps = _plan_steps(_get(context, "final_plan"))
    if 0 < number <= len(steps):
        goal = _text(steps[number - 1].get("sub_task")) or ""
        agent = _text(steps[number - 1].get("sub_task_agent"))
    if agent is None and _int(_get(context, "current_plan_step_number")) == number:
        agent = _text(_get(context, "agent_for_sub_task"))
    return goal, agent


def _step_summary(instance: Any, agent: str | None) -> str | None:
    """The summary cmbagent's step loop builds: the last message of the step's agent."""
    if not agent:
        return None
    history = getattr(getattr(instance, "chat_result", None), "chat_history", None)
    if not isinstance(history, list):
        return None
    base = agent.removesuffix("_context").removesuffix("_agent")
    names = {name for a in (agent, base) for name in (a, f"{a}_nest", f"{a}_response_formatter")}
    for msg in reversed(history):
        if isinstance(msg, Mapping) and msg.get("name") in names:
            content = msg.get("content")
            return content.strip() if isinstance(content, str) else _text(content)
    return None


def _step_failed(instance: Any) -> str | None:
    final = getattr(instance, "final_context", None)
    attempts, limit = _get(final, "n_attempts"), _get(final, "max_n_attempts")
    if isinstance(attempts, int) and isinstance(limit, int) and attempts >= limit:
        return f"number of failures {attempts} >= max_n_attempts {limit}"
    return None


def _solve_with_step(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], number: int, context: Any) -> Any:
    goal, agent = _step_from_plan(number, context)
    block = step(number, goal, agent=agent)
    with _opened(block) as entered:
        result = wrapped(*args, **kwargs)
        if entered is not None:
            try:
                if agent is None:
                    agent = _text(_get(getattr(instance, "final_context", None), "agent_for_sub_task"))
                summary = _step_summary(instance, agent)
                if summary:
                    block.set_summary(summary)
                failure = _step_failed(instance)
                if failure:
                    block.fail(failure)
            except Exception:
                logger.debug("cmbagent_otel: could not read step outcome", exc_info=True)
        return result


def _solve_in_workflow(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any], call: dict[str, Any]) -> Any:
    scope = current_scope()
    number = _int(call.get("step"))
    context = call.get("shared_context")
    slot = _slot.get()
    sticky = slot is not None and slot.block is not None and scope is not None and scope.phase == slot.name
    if scope is not None and scope.phase is not None and not sticky:
        # inside a phase someone else opened (a nested CMBAgent): join it
        if number is not None and number > 0 and scope.step is None:
            return _solve_with_step(wrapped, instance, args, kwargs, number, context)
        return wrapped(*args, **kwargs)
    name = _phase_name(_text(call.get("initial_agent")), _text(call.get("mode")),
                       _text(getattr(instance, "mode", None)))
    if number is not None and number > 0:
        if slot is None:
            with _opened(phase(name)):
                return _solve_with_step(wrapped, instance, args, kwargs, number, context)
        if not (sticky and slot.name == name):
            slot.open(name)  # the phase spans every step solve of the loop
        return _solve_with_step(wrapped, instance, args, kwargs, number, context)
    if sticky and slot is not None:
        slot.close()
    with _opened(phase(name)):
        return wrapped(*args, **kwargs)


def _solve_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _active:
        return wrapped(*args, **kwargs)
    try:
        call = _bind(wrapped, args, kwargs)
        scope = current_scope()
        in_workflow = scope is not None and scope.in_workflow
    except Exception:
        logger.debug("cmbagent_otel: could not inspect CMBAgent.solve", exc_info=True)
        return wrapped(*args, **kwargs)
    if in_workflow:
        return _solve_in_workflow(wrapped, instance, args, kwargs, call)
    # a CMBAgent used directly: the solve is the whole run
    solve_mode = _text(call.get("mode"))
    agent = _text(call.get("initial_agent"))
    model = None
    try:
        configs = getattr(instance, "agent_llm_configs", None)
        if isinstance(configs, Mapping) and isinstance(configs.get(agent), Mapping):
            model = _text(configs[agent].get("model"))
    except Exception:
        model = None
    mode = {"one_shot": "one-shot", "chat": "hitl-interactive"}.get(solve_mode or "", "planning-control")
    block = workflow("solve", mode=mode, task=_text(call.get("task")), agent=agent, model=model,
                     work_dir=_text(getattr(instance, "work_dir", None)))
    with _run(block):
        return _solve_in_workflow(wrapped, instance, args, kwargs, call)


# --- MARS PhaseExecutionManager --------------------------------------------------------
@dataclass
class _ManagerSpans:
    stack: list[tuple[str, _Block]] = field(default_factory=list)

    def close_to(self, kinds: set[str], exc: BaseException | None = None) -> _Block | None:
        """Close open blocks down to (not including) the first of ``kinds``; return it."""
        while self.stack and self.stack[-1][0] not in kinds:
            _exit(self.stack.pop()[1], exc)
        return self.stack[-1][1] if self.stack else None

    def push(self, kind: str, block: _Block) -> None:
        entered = _enter(block)
        if entered is not None:
            self.stack.append((kind, entered))


_managers: weakref.WeakKeyDictionary[Any, _ManagerSpans] = weakref.WeakKeyDictionary()


def _spans_of(manager: Any, create: bool = False) -> _ManagerSpans | None:
    try:
        spans = _managers.get(manager)
        if spans is None and create:
            spans = _ManagerSpans()
            _managers[manager] = spans
        return spans
    except TypeError:  # not weak-referenceable
        return None


def _pm_start(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if _active:
        try:
            spans = _spans_of(instance, create=True)
            if spans is not None and not spans.stack:
                ctx = getattr(instance, "context", None)
                phase_type = _text(getattr(getattr(instance, "phase", None), "phase_type", None)) or "phase"
                scope = current_scope()
                if scope is None or not scope.in_workflow:
                    shared = getattr(ctx, "shared_state", None)
                    mode = _text(shared.get("mode")) if isinstance(shared, Mapping) else None
                    spans.push("workflow", workflow(
                        phase_type, mode=mode or "planning-control", task=_text(getattr(ctx, "task", None)),
                        work_dir=_text(getattr(ctx, "work_dir", None)),
                        max_redos=_int(getattr(getattr(getattr(instance, "phase", None), "config", None),
                                               "max_redos", None)),
                    ))
                current = current_scope()
                if current is not None and current.phase is None:
                    spans.push("phase", phase(phase_type))
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.start", exc_info=True)
    return wrapped(*args, **kwargs)


def _pm_start_step(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if _active:
        try:
            spans = _spans_of(instance)
            call = _bind(wrapped, args, kwargs)
            number = _int(call.get("step_number", args[0] if args else None))
            if spans is not None and number is not None and number > 0:
                spans.close_to({"phase", "workflow"})
                scope = current_scope()
                if scope is not None and scope.phase is not None:
                    description = _text(call.get("description", args[1] if len(args) > 1 else None)) or ""
                    spans.push("step", step(number, description))
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.start_step", exc_info=True)
    return wrapped(*args, **kwargs)


def _pm_redo(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if _active:
        try:
            spans = _spans_of(instance)
            call = _bind(wrapped, args, kwargs)
            number = _int(call.get("step_number"))
            attempt = _int(call.get("redo_number"))
            if spans is not None and number and attempt:
                spans.close_to({"step", "phase", "workflow"})
                if spans.stack and spans.stack[-1][0] == "step":
                    spans.push("redo", redo(number, attempt, _text(call.get("hypothesis"))))
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.create_redo_branch", exc_info=True)
    return wrapped(*args, **kwargs)


def _close_step(instance: Any, summary: str | None, error: str | None) -> None:
    spans = _spans_of(instance)
    if spans is None:
        return
    top = spans.close_to({"step", "phase", "workflow"})
    if top is None or spans.stack[-1][0] != "step":
        return
    if isinstance(top, step) and summary:
        top.set_summary(summary)
    if error:
        top.fail(error)
    _exit(spans.stack.pop()[1])


def _pm_complete_step(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        call = _bind(wrapped, args, kwargs)
        _close_step(instance, _text(call.get("summary")), None)
    except Exception:
        logger.debug("cmbagent_otel: PhaseExecutionManager.complete_step", exc_info=True)
    return result


def _pm_fail_step(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        call = _bind(wrapped, args, kwargs)
        _close_step(instance, None, _text(call.get("error")) or "step failed")
    except Exception:
        logger.debug("cmbagent_otel: PhaseExecutionManager.fail_step", exc_info=True)
    return result


def _close_manager(instance: Any, error: str | None = None, exc: BaseException | None = None) -> None:
    spans = _spans_of(instance)
    if spans is None:
        return
    while spans.stack:
        kind, block = spans.stack.pop()
        if error and kind in ("phase", "workflow"):
            block.fail(error)
        _exit(block, exc)


def _pm_complete(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        _close_manager(instance)
    except Exception:
        logger.debug("cmbagent_otel: PhaseExecutionManager.complete", exc_info=True)
    return result


def _pm_fail(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        result = wrapped(*args, **kwargs)
    finally:
        try:
            call = _bind(wrapped, args, kwargs)
            _close_manager(instance, _text(call.get("error")) or "phase failed")
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.fail", exc_info=True)
    return result


def _pm_exit(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return wrapped(*args, **kwargs)
    finally:
        try:
            exc = args[1] if len(args) > 1 and isinstance(args[1], BaseException) else None
            _close_manager(instance, exc=exc)
        except Exception:
            logger.debug("cmbagent_otel: PhaseExecutionManager.__exit__", exc_info=True)


__all__ = [
    "ENTRY_POINTS",
    "instrument_cmbagent",
    "instrument_phase_manager",
    "is_instrumented",
    "uninstrument_cmbagent",
]
