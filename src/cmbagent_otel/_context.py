"""Per-run state carried in the OpenTelemetry context.

The state lives inside the OTel ``Context`` (itself a contextvar), so it follows the
active span everywhere OTel context goes: asyncio tasks copy it, and
opentelemetry-instrumentation-threading carries it into threads and executor workers.
There is deliberately no process-global "current run".

Some DAG nodes are opened and closed by calls that are not ``with`` blocks: a plan step
derived from cmbagent's ``record_status`` tool calls inside one group chat, a MARS
``PhaseExecutionManager`` phase or step, the control phase kept open across the
context-carryover step loop. Their spans are never attached to the context (so attach
and detach stay strictly last-in-first-out); instead a :class:`Cursor` on the *anchor*
scope (the scope in which that later work starts: the group chat manager's, the run's)
names the innermost open :class:`Frame`, and every span started directly in the anchor
scope is parented under that frame by explicit context (see ``_spans.TracedSpan``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context
from opentelemetry.trace import propagation as _trace_propagation

from . import semconv
from ._forksafe import reset_in_child

_SCOPE_KEY = otel_context.create_key("cmbagent_otel.scope")
# The key the OTel API keeps the current span under: with it a span's context (span + scope) is
# built with one dict copy instead of two set_value calls. Absent in some API: the two-step path.
SPAN_KEY: str | None = getattr(_trace_propagation, "_SPAN_KEY", None)


def _context_var() -> contextvars.ContextVar[Context] | None:
    """The contextvar behind OTel's default runtime context (``None`` with another runtime context)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime).__name__ != "ContextVarsRuntimeContext":
        return None
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


# The current Context, read and set on the hot path of every span: straight on the contextvar of
# OTel's default runtime context (what get_current/attach/detach do, two Python calls fewer each);
# through the public API with any other runtime context. ``detach`` raises ValueError for a token
# of another context (OTel's would log it): callers catch it.
_VAR = _context_var()
if _VAR is not None:
    get_current: Callable[[], Context] = _VAR.get
    attach: Callable[[Context], Any] = _VAR.set
    detach: Callable[[Any], None] = _VAR.reset
else:  # pragma: no cover - another OTEL_PYTHON_CONTEXT
    get_current = otel_context.get_current
    attach = otel_context.attach
    detach = otel_context.detach

try:
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS
except ImportError:  # older API: the instrumentation package holds it
    from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS
try:
    from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY_PLAIN as _SUPPRESS_PLAIN
except ImportError:
    _SUPPRESS_PLAIN = "suppress_instrumentation"

_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
_fill = dict.__setitem__  # Context forbids item assignment; used only on a copy not yet shared


def suppressed(ctx: Context) -> bool:
    """Whether instrumentation is suppressed in ``ctx`` (what ``is_instrumentation_enabled`` reads)."""
    return bool(ctx.get(_SUPPRESS) or ctx.get(_SUPPRESS_PLAIN))


def span_context(ctx: Context, span: Any) -> Context:
    """``ctx`` with ``span`` as the current span."""
    if SPAN_KEY is None:
        from opentelemetry import trace

        return trace.set_span_in_context(span, ctx)
    new = Context(ctx)
    _fill(new, SPAN_KEY, span)
    return new


CHILDREN_KEY = "\x00children:"  # + a node's id: the RunState counter of that node's children


_PHASES_KEY = "\x00phases"
_PLANNINGS_KEY = "\x00plannings"


class _Counters(dict[str, "itertools.count[int]"]):
    """One ``itertools.count`` per key, created on first use (``setdefault``: atomic under the GIL)."""

    def __missing__(self, key: str) -> itertools.count[int]:
        return self.setdefault(key, itertools.count(1))


@dataclass
class RunState:
    """Mutable, thread-safe bookkeeping shared by every span of one run (one trace)."""

    session_id: str = semconv.DEFAULT_SESSION_ID
    max_redos: int | None = None
    name: str | None = None  # the workflow's name (None: a plain AG2 program)
    # why this cmbagent run stopped early: a plan step (or one_shot's execution) ran out of attempts
    # (cmbagent stops there and its own tracking fails the run, although the entry function returns
    # normally); the failed run's status message. None: nothing did
    failed_step: str | None = None
    # the carryover loop's last step that returned with the plan going on, and the plan: (number, plan).
    # Its later steps are pending nodes if the entry call raises before the next step starts (Ctrl-C while
    # cmbagent builds that step's agents). None: no such step, or the next one started
    loop_next: tuple[int, Any] | None = None
    # the run's workflow span has ended (its block was left): a context that still holds it (a block
    # left out of order, or in another thread) starts a new run rather than joining this one
    ended: bool = False
    warned: bool = False  # that the ended run was still held by a context (logged once)
    # the tracer its workflow block started it with (None: not known): its phase, step and redo blocks start
    # their spans there too, so a run open when instrument() binds another provider stays whole in one
    tracer: Any = None
    _order: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counters: _Counters = field(default_factory=_Counters)

    def next_order(self) -> int:
        """Return the next execution order of this run (1, 2, 3, ...).

        ``itertools.count`` advances atomically (one C call under the GIL): no lock needed then.
        """
        if _GIL:
            return next(self._order)
        with self._lock:
            return next(self._order)

    def _next(self, key: str) -> int:
        # one itertools.count per key: its creation (setdefault) and next() are atomic under the GIL
        if _GIL:
            return next(self._counters[key])
        with self._lock:
            return next(self._counters[key])

    def unique_node_id(self, base: str) -> str:
        """Return ``base`` the first time it is asked for in this run, then ``base_2``, ..."""
        count = next(self._counters[base]) if _GIL else self._next(base)  # _next written out: every DAG node
        return base if count == 1 else f"{base}_{count}"

    @staticmethod
    def numbered_id(base: str, count: int) -> str:
        """The id :meth:`unique_node_id` gives ``base`` the ``count``-th time (its number taken by :meth:`take`)."""
        return base if count == 1 else f"{base}_{count}"

    def next_phase_index(self) -> int:
        return self._next(_PHASES_KEY)

    def take_phase_index(self, taken: list[int]) -> None:
        """Append the run's next phase index to ``taken`` (see :meth:`take`), for the block interrupted after
        that to be recorded under it."""
        self.take(_PHASES_KEY, taken)

    def take(self, key: str, taken: list[int]) -> None:
        """Append the next number of the counter ``key`` to ``taken``, in one C call (``list.extend``
        consuming the counter): a ``KeyboardInterrupt`` from a signal handler is raised when a call returns,
        and one raised as ``next()`` returned lost the number taken (the counter had advanced); here it is
        in ``taken`` once taken."""
        counter = self._counters[key]
        if _GIL:
            taken.extend(itertools.islice(counter, 1))
        else:
            with self._lock:
                taken.extend(itertools.islice(counter, 1))

    def next_planning_index(self) -> int:
        """1 for the run's first planning phase, then 2, 3, ..."""
        return self._next(_PLANNINGS_KEY)

    def take_planning_index(self, taken: list[int]) -> None:
        """Append :meth:`next_planning_index`'s number to ``taken`` as :meth:`take` does."""
        self.take(_PLANNINGS_KEY, taken)

    def has_phases(self) -> bool:
        """Whether a phase was opened in this run (the counter :meth:`next_phase_index` creates)."""
        return _PHASES_KEY in self._counters

    def next_child_index(self, parent_node: str) -> int:
        """Sibling position of a new sub-node under ``parent_node`` (1-based)."""
        key = CHILDREN_KEY + parent_node
        return next(self._counters[key]) if _GIL else self._next(key)


class Scope:
    """What a new span needs to know about where it stands in the run.

    Treated as immutable: :meth:`evolve` returns a modified copy (hand-written rather than
    ``dataclasses.replace``, which costs several microseconds on every span).

    Made by :meth:`build` (every field named), or by a plain class call with no arguments whose maker then
    sets every field (:meth:`child_node`, :meth:`child_event`, one per agent turn): no ``__init__`` runs
    (``object.__init__``, as for ``_spans.TracedSpanShell``), ~500 instructions less per scope than
    ``Scope.__new__(Scope)`` (callgrind: 711 against 1,219 per object made and dropped). ``Scope(...)`` with
    arguments raises ``TypeError``.
    """

    __slots__ = ("agent_depth", "conversation_id", "cursor", "dag_depth", "dag_node", "dag_node_type", "dag_order",
                 "event_depth", "handoffs", "in_workflow", "owner", "phase", "run", "step", "steps")

    __init__ = object.__init__  # type: ignore[assignment]

    @classmethod
    def build(
        cls,
        run: RunState,
        conversation_id: str | None = None,
        dag_node: str | None = None,
        dag_node_type: str | None = None,
        dag_depth: int = -1,
        event_depth: int = 0,
        agent_depth: int = 0,
        phase: str | None = None,
        step: int | None = None,
        in_workflow: bool = False,
        dag_order: int = 0,
        steps: Any = None,
    ) -> Scope:
        """A scope with these fields (a run's root: ``Scope.build(run)``; cursor, handoffs and owner unset)."""
        self = cls()
        self.run = run
        self.conversation_id = conversation_id
        self.dag_node = dag_node
        self.dag_node_type = dag_node_type
        self.dag_depth = dag_depth
        self.dag_order = dag_order  # order_index of dag_node: the base of its children's order_index
        self.event_depth = event_depth
        self.agent_depth = agent_depth
        self.phase = phase
        self.step = step
        self.in_workflow = in_workflow
        self.steps = steps  # the StepTracker of the enclosing cmbagent control chat (inherited)
        self.cursor: Cursor | None = None  # set only on an anchor scope; never inherited
        # handoff events the span this is the children's scope of can still take (None: not known yet;
        # never inherited)
        self.handoffs: int | None = None
        # the span of ours this is the children's scope of (set when both are made current; another
        # instrumentation's span may be current below it)
        self.owner: Any = None
        return self

    def evolve(self, **changes: Any) -> Scope:
        """A copy of this scope (cursor and handoffs not inherited) with ``changes`` applied."""
        new = self.child_event(self.conversation_id)
        new.event_depth = self.event_depth
        for name, value in changes.items():
            setattr(new, name, value)  # AttributeError for an unknown field (slots)
        return new

    def child_node(self, dag_node: str, node: Any, depth: int, order: int | None, conversation_id: str | None) -> Scope:
        """The scope under a span that is DAG node ``dag_node`` (of spec ``node``, a ``NodeSpec``: its ``node_type``;
        ``order``: its order index, ``None`` for none) started in this scope. Its arguments are the span start's own
        names, as they are: the starts generated from ``_spans.start`` write this in with no temporary per argument."""
        new = Scope()  # child_event written out with the node's fields: every DAG node (no __init__ runs)
        new.run = self.run
        new.conversation_id = conversation_id
        new.dag_node = dag_node
        new.dag_node_type = node.node_type
        new.dag_depth = depth
        new.dag_order = order or 0
        new.event_depth = 0
        new.agent_depth = 0
        new.phase = self.phase
        new.step = self.step
        new.in_workflow = self.in_workflow
        new.steps = self.steps
        new.cursor = None
        new.handoffs = None
        new.owner = None
        return new

    def child_event(self, conversation_id: str | None) -> Scope:
        """The scope under an execution event span started in this scope (``evolve`` without keywords:
        this runs for most spans)."""
        new = Scope()  # no __init__ runs (see the class): every field is set here
        new.run = self.run
        new.conversation_id = conversation_id
        new.dag_node = self.dag_node
        new.dag_node_type = self.dag_node_type
        new.dag_depth = self.dag_depth
        new.dag_order = self.dag_order
        new.event_depth = self.event_depth + 1
        new.agent_depth = self.agent_depth
        new.phase = self.phase
        new.step = self.step
        new.in_workflow = self.in_workflow
        new.steps = self.steps
        new.cursor = None
        new.handoffs = None
        new.owner = None
        return new

    def ensure_cursor(self) -> Cursor:
        """This scope's cursor, created on first use (the scope becomes an anchor)."""
        cursor = self.cursor
        if cursor is None:
            with _cursor_lock:
                cursor = self.cursor
                if cursor is None:
                    cursor = self.cursor = Cursor()
        return cursor


_cursor_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_cursor_lock")  # a forked child must not find it held


class LazyScope:
    """Stands in the context for the scope of a span's children until someone asks for it.

    Most spans (model and tool calls) start no span of ours under them: their children's
    scope (the parent's with one more event level, owned by the span) is built on first use
    by :meth:`child_scope`, then kept (the same object for every reader, any thread).
    """

    __slots__ = ()

    def child_scope(self) -> Scope | None:
        raise NotImplementedError


def scope_in(value: Any) -> Scope | None:
    """The scope a context's ``_SCOPE_KEY`` value stands for (``None``: not ours)."""
    if isinstance(value, Scope):
        return value
    return value.child_scope() if isinstance(value, LazyScope) else None


class Frame:
    """A node span opened without attaching its context, and the scope of its children.

    ``active`` counts the spans currently running under it through the cursor;
    ``close`` asks for the frame to end, which happens once ``active`` is back to 0 (so a
    step ends after the tool call that completed it, never before its own children).
    ``finish`` (set by the owner) ends the span; it is called exactly once. ``timing`` (set when
    its span kind has a duration metric) and ``error`` (its failure's ``error.type``) feed the
    run-level metrics when it ends.
    """

    __slots__ = ("active", "closing", "cursor", "error", "finish", "kind", "owner", "scope", "span", "timing")

    def __init__(self, span: Any, scope: Scope, kind: str, owner: Any = None,
                 finish: Callable[[Frame], None] | None = None) -> None:
        self.cursor: Cursor | None = None  # the cursor it was pushed on
        self.span = span
        self.scope = scope
        self.kind = kind
        self.owner = owner
        self.finish = finish
        self.active = 0
        self.closing = False
        self.timing: Any = None
        self.error: str | None = None


class Cursor:
    """Stack of open :class:`Frame` s of an anchor scope; ``top`` is where new work goes.

    ``pending`` (optional) is called under the lock when work starts and no frame is open:
    it may push the frame that work belongs to (a plan step announced but not started yet).
    """

    __slots__ = ("__weakref__", "frames", "lock", "pending", "top")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        reset_in_child(self, "lock")
        self.frames: list[Frame] = []
        self.top: Frame | None = None
        self.pending: Callable[[], None] | None = None

    def push(self, frame: Frame) -> None:
        with self.lock:
            frame.cursor = self
            self.frames.append(frame)
            self.top = frame

    def resolve(self) -> Frame | None:
        """The frame new work in the anchor scope belongs to (opening a pending one)."""
        if self.pending is None:
            return self.top
        with self.lock:
            pending = self.pending
            if pending is not None:
                self.pending = None
                # telemetry must never break the app: on error the work just stays in the anchor
                with contextlib.suppress(Exception):
                    pending()
            return self.top

    def enter(self) -> Frame | None:
        """Like :meth:`resolve`, for a span starting now: counted as active until :meth:`leave`."""
        with self.lock:
            frame = self.resolve()
            if frame is not None:
                frame.active += 1
            return frame

    def leave(self, frame: Frame) -> None:
        """A span counted by :meth:`enter` ended; end the frame if it was asked to close."""
        with self.lock:
            frame.active -= 1
            ready = frame.closing and frame.active <= 0
            if ready:
                self._remove(frame)
        if ready:
            _finish(frame)

    def close(self, frame: Frame) -> None:
        """End ``frame`` now, or when its last running child ends."""
        with self.lock:
            if frame.closing or frame not in self.frames:
                return
            frame.closing = True
            ready = frame.active <= 0
            if ready:
                self._remove(frame)
        if ready:
            _finish(frame)

    def close_all(self, frames: list[Frame] | None = None) -> None:
        """End ``frames`` (default: every open frame) now, innermost first, whatever runs under them."""
        with self.lock:
            targets = list(self.frames) if frames is None else [f for f in self.frames if f in frames]
            for frame in targets:
                frame.closing = True
                self._remove(frame)
        for frame in reversed(targets):
            _finish(frame)

    def _remove(self, frame: Frame) -> None:
        if frame in self.frames:
            self.frames.remove(frame)
        self.top = self.frames[-1] if self.frames else None


def _finish(frame: Frame) -> None:
    finish, frame.finish = frame.finish, None
    if finish is not None:
        finish(frame)


def raw_scope(ctx: otel_context.Context | None = None) -> Scope | None:
    """The scope stored in the active context (an anchor's own scope, not its open frame)."""
    return scope_in((get_current() if ctx is None else ctx).get(_SCOPE_KEY))


def current_scope(ctx: otel_context.Context | None = None) -> Scope | None:
    """Where new work stands in the run, or ``None`` outside any run.

    The scope of the active context, or, when that scope is an anchor with an open frame,
    the frame's scope (the work belongs to the frame's node).
    """
    value = scope_in((get_current() if ctx is None else ctx).get(_SCOPE_KEY))
    if value is None:
        return None
    cursor = value.cursor
    if cursor is not None:
        frame = cursor.resolve()
        if frame is not None:
            return frame.scope
    return value


def with_scope(scope: Scope, ctx: otel_context.Context | None = None) -> otel_context.Context:
    return otel_context.set_value(_SCOPE_KEY, scope, ctx)


def new_conversation_id() -> str:
    return uuid.uuid4().hex
