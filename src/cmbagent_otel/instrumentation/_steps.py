"""Plan steps derived from cmbagent's ``record_status`` transitions inside one group chat.

cmbagent's ``planning_and_control`` and ``control`` run every plan step in ONE AG2 group
chat: the control agent moves between steps with ``record_status(current_status,
current_plan_step_number, current_sub_task, current_instructions, agent_for_sub_task)``
tool calls (``record_status_starter`` in the carryover loop), which write the context
variables ``current_plan_step_number`` / ``current_status`` / ``agent_for_sub_task``.

A :class:`StepTracker` lives on the group chat manager's span (its *anchor*) when that
chat runs directly in a control phase. After each such tool call it reads the context
variables the tool returned and

* opens ``step n`` when n first goes "in progress" (lazily: at the next turn of the
  chat, so the step starts after the tool call that announced it), goal from the plan in
  ``final_plan`` (else the ``current_sub_task`` argument), agent from
  ``agent_for_sub_task`` (else the plan);
* ends it at its own "completed" (after the tool call that completed it has finished), at
  the next step's start, or when the chat ends. A step ends failed when the chat ended on it
  out of attempts (``n_attempts >= max_n_attempts``: the plan stopped), or when the chat
  raised; one control moved past (the next step started) ends completed, even out of
  attempts or reported "failed", as the plan went on; one the chat ended while it was still in
  progress (``max_rounds``) ends completed, its summary saying so, as cmbagent's own
  tracking completes it. "failed" does not end the step: cmbagent hands a failed step
  back to its agent to fix it;
* counts cmbagent's retries: each time ``n_attempts`` goes up inside the step a failed
  ``attempt`` event span is recorded under the step, and the step carries
  ``cmbagent.step.attempts`` (failed attempts) and ``cmbagent.step.max_attempts``.

The step spans are never attached: every turn of the chat (agent calls, handoffs) starts
directly in the manager's scope, whose :class:`~cmbagent_otel._context.Cursor` parents it
under the open step by explicit context. In a chat that already runs inside a step (the
carryover loop's ``solve(step=n)``, a MARS step) the tracker only records failed attempts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from .. import semconv
from .._context import Cursor, Frame, Scope
from .._spans import NodeSpec, compose, end_frame, open_frame
from ..redaction import redact_name, safe_text, truncate
from ..workflow import ONE_SHOT_PHASE

logger = logging.getLogger("cmbagent_otel")

STATUS_TOOLS = frozenset({"record_status", "record_status_starter"})
_MAX_STEP = 2**31 - 1  # a step number is an order_index (INTEGER column); anything larger is not a plan step
_MAX_NOT_STARTED = 1000  # never-started plan steps recorded (cmbagent's plans have max_plan_steps, a handful)

_STEP_RE = re.compile(r"^\s*-\s*Step\s+(\d+)\s*:", re.IGNORECASE)
_SUBTASK_RE = re.compile(r"^\s*\*\s*sub-task:\s*(.*)$", re.IGNORECASE)
_AGENT_RE = re.compile(r"^\s*\*\s*agent in charge:\s*(.*)$", re.IGNORECASE)


def plan_steps(plan: Any) -> list[dict[str, Any]]:
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


def context_get(context: Any, key: str) -> Any:
    """Read a key from a dict or an AG2 ``ContextVariables`` (cmbagent passes both)."""
    try:
        getter = getattr(context, "get", None)
        return getter(key) if callable(getter) else None
    except Exception:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _agent(value: Any) -> str | None:
    """An agent named by the plan or the context variables: text a model wrote (the planner's
    plan, ``record_status`` arguments), redacted and bounded as agent names are."""
    return redact_name(value) if isinstance(value, str) and value else None


def plan_agent(planned: Mapping[str, Any]) -> str | None:
    """The agent one step of a cmbagent plan (a sub-task dict) names: its ``sub_task_agent``."""
    return _agent(planned.get("sub_task_agent"))


def tracker_for(scope: Scope | None, tracer: Tracer) -> StepTracker | None:
    """A tracker for a group chat starting at ``scope``, when that chat can hold plan steps.

    ``tracer``: the workflow-scope tracer its step and attempt spans are started with.
    """
    if scope is None or not scope.in_workflow or scope.steps is not None:
        return None
    if scope.step is None and scope.dag_node_type == semconv.NODE_CONTROL:
        return StepTracker(tracer, derive=True)
    if scope.step is not None and scope.dag_node_type == semconv.NODE_AGENT:
        return StepTracker(tracer, derive=False)
    if scope.phase == ONE_SHOT_PHASE and scope.dag_node_type == semconv.NODE_AGENT:
        # one_shot's execution retries like a plan step (n_attempts), observed only; its chat starts from
        # cmbagent's default context (n_attempts 0), and the first tool call to read it may be the one
        # that counted the first failure
        tracker = StepTracker(tracer, derive=False)
        tracker.last_attempts = 0
        return tracker
    return None


class _Step:
    __slots__ = ("agent", "carried_from", "end", "exc", "failed", "failures", "frame", "goal", "last_attempts",
                 "max_attempts", "number", "status")

    def __init__(self, number: int, goal: str, agent: str | None, attempts: int,
                 carried_from: int | None = None) -> None:
        self.number = number
        self.goal = goal
        self.agent = agent
        self.frame: Frame | None = None
        self.failures = 0
        self.last_attempts = attempts
        # the step whose n_attempts this one started with: cmbagent resets the count only when a step is
        # reported completed or failed, not when control moves past a step without reporting it
        self.carried_from = carried_from if attempts > 0 else None
        self.max_attempts: int | None = None
        self.status = "in progress"
        self.failed = False  # reported "failed" and not completed since
        self.end = "chat_end"
        self.exc: BaseException | None = None


class StepTracker:
    """Plan steps of one group chat (see the module docstring)."""

    __slots__ = ("_lock", "_scope", "_span", "current", "cursor", "derive", "last_attempts", "pending", "plan",
                 "seen", "tracer")

    def __init__(self, tracer: Tracer, derive: bool = True) -> None:
        self.tracer = tracer
        self.derive = derive
        self.cursor = Cursor()
        self._lock = self.cursor.lock  # one lock: the cursor calls back into the tracker
        self._scope: Scope | None = None
        self._span: Span | None = None
        self.current: _Step | None = None
        self.pending: _Step | None = None
        self.seen: set[int] = set()
        self.last_attempts: int | None = None
        self.plan: Any = None  # the chat's final_plan, as last seen in its context variables

    def bind(self, scope: Scope | None, span: Span) -> None:
        """The chat manager's span has started; ``scope`` is its children's (the anchor) scope."""
        self._scope = scope
        self._span = span

    # --- tool calls ---------------------------------------------------------------------
    def after_tool(self, name: str, context: Any) -> None:
        """A tool ran in this chat; ``context`` is the group's context variables after it."""
        if context is None or self._scope is None:
            return
        with self._lock:
            self._observe_attempts(context)
            if self.derive and name in STATUS_TOOLS:
                self.plan = context_get(context, "final_plan") or self.plan
                self._transition(context)

    def _observe_attempts(self, context: Any) -> None:
        attempts = _int(context_get(context, "n_attempts"))
        if attempts is None:
            return
        step = self.current
        last = self.last_attempts if step is None else step.last_attempts
        if step is not None:
            step.max_attempts = _int(context_get(context, "max_n_attempts")) or step.max_attempts
            step.last_attempts = attempts
        self.last_attempts = attempts
        if last is None or attempts <= last:
            return  # cmbagent resets n_attempts when a step completes: not a retry
        for _ in range(attempts - last):
            self._failed_attempt(step, attempts, _int(context_get(context, "max_n_attempts")),
                                 _agent(context_get(context, "agent_for_sub_task")))

    def _failed_attempt(self, step: _Step | None, attempts: int, limit: int | None, agent: str | None) -> None:
        """A failed attempt event under the step; ``agent``: the context's agent for the sub-task (the
        step's own agent when this tracker opened the step)."""
        if step is not None:
            step.failures += 1
            number, k = step.number, step.failures
            parent_scope = step.frame.scope if step.frame is not None else self._scope
            parent_span = step.frame.span if step.frame is not None else self._span
        else:  # observe-only: the chat runs inside a step opened elsewhere
            scope = self._scope
            number, k = (scope.step if scope is not None else None), None
            parent_scope, parent_span = self._scope, self._span
        if parent_scope is None or parent_span is None:
            return
        attrs: dict[str, Any] = {semconv.STEP_ATTEMPTS: attempts}
        if number is not None:
            attrs[semconv.STEP_NUMBER] = number
        if k is not None:
            attrs[semconv.STEP_ATTEMPT] = k
        if limit is not None:
            attrs[semconv.STEP_MAX_ATTEMPTS] = limit
        if step is not None and step.agent:
            agent = step.agent
        if agent:
            attrs[semconv.GEN_AI_AGENT_NAME] = agent
        label = f"step {number} attempt {k if k is not None else attempts}" if number is not None \
            else f"attempt {attempts}"
        emit_event(self.tracer, f"{label} failed", semconv.KIND_ATTEMPT, attrs, parent_scope, parent_span,
                   f"{label} failed (cmbagent n_attempts={attempts}"
                   + (f" of max_n_attempts={limit})" if limit is not None else ")"), "attempt_failed")

    def _transition(self, context: Any) -> None:
        number = _int(context_get(context, "current_plan_step_number"))
        status = _text(context_get(context, "current_status"))
        if number is None or not 0 < number <= _MAX_STEP or status is None:
            return
        status = status.strip().lower()
        current = self.current
        if "in progress" in status:
            if current is not None and current.number == number:
                current.status, current.failed = "in progress", False
                return
            if number in self.seen:
                return  # a step opens when its number first goes "in progress"
            self.seen.add(number)
            if current is not None:
                self._close(current, "next")
            goal, agent = _goal_and_agent(number, context)
            self.current = _Step(number, goal, agent, _int(context_get(context, "n_attempts")) or 0,
                                 current.number if current is not None else None)
            self.current.max_attempts = _int(context_get(context, "max_n_attempts"))
            self.cursor.pending = self._open_pending
        elif current is not None and current.number == number:
            if "completed" in status:
                current.status, current.failed = "completed", False
                self._close(current, "completed")
            elif "failed" in status:
                current.status, current.failed = "failed", True
                if current.frame is None:
                    self._open_pending()
                if current.frame is not None:
                    attrs = {semconv.STEP_NUMBER: number}
                    if current.agent:
                        attrs[semconv.GEN_AI_AGENT_NAME] = current.agent
                    emit_event(self.tracer, f"step {number} reported failed", semconv.KIND_ATTEMPT, attrs,
                               current.frame.scope, current.frame.span, f"record_status reported step {number} failed",
                               "step_failed")

    # --- opening and closing --------------------------------------------------------------
    def _open_pending(self) -> None:
        with self._lock:
            step = self.current
            if step is None or step.frame is not None or self._scope is None:
                return
            self.cursor.pending = None
            attrs: dict[str, Any] = {
                semconv.STEP_NUMBER: step.number,
                semconv.STEP_GOAL: safe_text(step.goal) or "",
            }
            if self._scope.phase is not None:
                attrs[semconv.PHASE] = self._scope.phase
            if step.agent:
                attrs[semconv.STEP_AGENT] = step.agent
            node = NodeSpec(f"step_{step.number}", semconv.NODE_AGENT, order_index=step.number)
            frame = open_frame(f"step {step.number}", semconv.KIND_STEP, attrs, node, self._scope, self._span,
                               "step", owner=self, scope_changes={"step": step.number}, tracer=self.tracer)
            frame.finish = lambda f, step=step: self._finish(step, f)  # type: ignore[misc]
            step.frame = frame
            self.cursor.push(frame)

    def _close(self, step: _Step, end: str) -> None:
        """Ask ``step`` to end: ``end`` is "completed", "next" (the next step started) or "chat_end"."""
        if self.current is step:
            self.current = None
            self.cursor.pending = None
        step.end = end
        if step.frame is None:
            # announced but nothing ran in it yet: it is still a node of the plan
            self.current = step
            self._open_pending()
            self.current = None
            if step.frame is None:
                return
        self.cursor.close(step.frame)

    def finish(self, exc: BaseException | None) -> None:
        """The chat ended (``exc``: the exception it raised): end the open step now."""
        with self._lock:
            step = self.current
            if step is not None and self.derive:
                step.exc = exc
                self._close(step, "chat_end")
            self.current = None
            self.cursor.pending = None
            self.cursor.close_all()  # nothing of the chat runs any more
            if self.derive:
                self._not_started_steps()

    def _not_started_steps(self) -> None:
        """The plan steps this chat never started (the plan stopped before them: a step ran out of
        attempts, or the chat ended or raised) become pending nodes (:func:`record_not_started`)."""
        if self._scope is None or self._span is None or not self.seen:
            return
        record_not_started(self.tracer, self._scope, self._span, self.plan, self.seen)

    def _finish(self, step: _Step, frame: Frame) -> None:
        span = frame.span
        error = None
        try:
            attrs: dict[str, Any] = {semconv.STEP_ATTEMPTS: step.failures, semconv.STEP_STATUS: step.status}
            if step.max_attempts is not None:
                attrs[semconv.STEP_MAX_ATTEMPTS] = step.max_attempts
            span.set_attributes(attrs)
            out_of_attempts = (_out_of_attempts(step)
                               if step.max_attempts is not None and step.last_attempts >= step.max_attempts else None)
            if step.end == "completed":
                error = None
            elif out_of_attempts is not None and step.end != "next":
                # also when control had reported it failed first: out of attempts is what stops the plan
                error = out_of_attempts
                if self._scope is not None and self._scope.run.failed_step is None:
                    self._scope.run.failed_step = f"plan stopped: {error}"
            elif out_of_attempts is not None and step.exc is None:
                # the last failure went to control (post_execution_transfer's "control"), which started the
                # next step: the plan went on past it, as past a step reported failed
                span.set_attribute(semconv.STEP_SUMMARY, f"the next step started after {out_of_attempts}")
            elif step.end == "chat_end" and step.exc is None:
                # cut by max_rounds (or a handoff that ended the chat) before it reported completion, in
                # progress or reported failed: cmbagent's own tracking completes such a step, failing only
                # one out of attempts (MARS ControlPhase: complete_step unless n_attempts >= max_n_attempts);
                # the summary says how it ended, the status attribute keeps what was last reported
                how = "was reported failed" if step.failed else "was in progress"
                span.set_attribute(semconv.STEP_SUMMARY, f"the chat ended while step {step.number} {how}, "
                                   "before it reported completion")
            elif step.failed and step.exc is None:
                # control moved on to another step: the plan went on past it, as past a completed one
                span.set_attribute(semconv.STEP_SUMMARY, f"the next step started while step {step.number} was "
                                   "reported failed")
            if error is not None:
                frame.error = "step_failed" if step.failed else "step_incomplete"  # the step duration metric's
                span.set_status(Status(StatusCode.ERROR, error))
                span.set_attribute(semconv.ERROR_TYPE, frame.error)
        except Exception:
            logger.debug("cmbagent_otel: could not record step outcome", exc_info=True)
        end_frame(frame, step.exc)


def _out_of_attempts(step: _Step) -> str:
    """Why ``step`` is out of attempts, naming the earlier step when part of cmbagent's count is that
    step's (control moved past it without reporting it, and the count went on)."""
    counts = f"n_attempts {step.last_attempts} >= max_n_attempts {step.max_attempts}"
    if step.carried_from is not None and step.failures < step.last_attempts:
        return (f"step {step.number} reached cmbagent's attempt limit with the attempts of step "
                f"{step.carried_from} carried over ({counts}; {step.failures} failed in step {step.number})")
    return f"step {step.number} ran out of attempts ({counts})"


def _goal_and_agent(number: int, context: Any) -> tuple[str, str | None]:
    goal, agent = "", _agent(context_get(context, "agent_for_sub_task"))
    steps = plan_steps(context_get(context, "final_plan"))
    if 0 < number <= len(steps):
        goal = _text(steps[number - 1].get("sub_task")) or ""
        agent = agent or plan_agent(steps[number - 1])
    if not goal:
        goal = _text(context_get(context, "current_sub_task")) or ""
    return goal, agent


def reported_status(value: Any) -> str | None:
    """A status ``record_status`` reported (its ``current_status``) as the step tracker reads it:
    ``in progress``, ``completed`` or ``failed``; ``None`` for anything else."""
    status = _text(value)
    if status is None:
        return None
    status = status.strip().lower()
    return next((known for known in ("in progress", "completed", "failed") if known in status), None)


def record_not_started(tracer: Tracer, parent_scope: Scope, parent_span: Span, plan: Any,
                       started: Collection[int], after: int = 0) -> None:
    """Plan steps of ``plan`` (numbered from 1) past ``after`` and not in ``started``, each a zero-length
    ``step n`` span under ``parent_span`` (goal and agent from the plan, ``cmbagent.step.status`` "not
    started"), stored as a pending node: cmbagent's DAG has a node per plan step once planning is done
    (``add_step_nodes``, pending) and never sets a step it did not reach running."""
    try:
        for number, planned in enumerate(plan_steps(plan)[:_MAX_NOT_STARTED], start=1):
            if number <= after or number in started:
                continue
            attrs: dict[str, Any] = {
                semconv.STEP_NUMBER: number,
                semconv.STEP_GOAL: safe_text(_text(planned.get("sub_task")) or ""),
                semconv.STEP_STATUS: semconv.STEP_NOT_STARTED,
            }
            if parent_scope.phase is not None:
                attrs[semconv.PHASE] = parent_scope.phase
            agent = plan_agent(planned)
            if agent:
                attrs[semconv.STEP_AGENT] = agent
            emit_event(tracer, f"step {number}", semconv.KIND_STEP, attrs, parent_scope, parent_span,
                       node=NodeSpec(f"step_{number}", semconv.NODE_AGENT, order_index=number),
                       scope_changes={"step": number})
    except Exception:
        logger.debug("cmbagent_otel: could not record the plan's steps not started", exc_info=True)


def emit_event(tracer: Tracer, name: str, kind: str, attributes: Mapping[str, Any], parent_scope: Scope,
               parent_span: Span, error: str | None = None, error_type: str | None = None,
               node: NodeSpec | None = None, scope_changes: Mapping[str, Any] | None = None) -> None:
    """A zero-length span under ``parent_span`` (explicit parent; nothing attached): an event, or with
    ``node`` a DAG node of its own (a plan step that never started)."""
    try:
        attrs, _ = compose(parent_scope, kind, attributes, node, False, None, scope_changes)
        span = tracer.start_span(name, context=trace.set_span_in_context(parent_span),
                                       kind=SpanKind.INTERNAL, attributes=attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, truncate(error, 1024)))
            span.set_attribute(semconv.ERROR_TYPE, error_type or "error")
        span.end()
    except Exception:
        logger.debug("cmbagent_otel: could not record %s", name, exc_info=True)
