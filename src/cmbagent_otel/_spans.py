"""The one place where cmbagent-otel opens and closes spans.

Both the workflow API and the AG2 wrappers go through :class:`TracedSpan`, so every span
gets the same run bookkeeping (execution order, session, DAG anchors, conversation id)
and the same failure handling: telemetry errors are swallowed and logged, application
exceptions are recorded and then re-raised unchanged by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping
from time import perf_counter, time_ns
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from . import semconv
from ._context import (
    _GIL,
    _SCOPE_KEY,
    CHILDREN_KEY,
    SPAN_KEY,
    Frame,
    LazyScope,
    RunState,
    Scope,
    attach,
    detach,
    get_current,
    new_conversation_id,
    raw_scope,
    scope_in,
    span_context,
    with_scope,
)
from ._forksafe import reset_in_child
from ._specialise import specialise
from ._termination import MONOTONIC_START, claim_duration
from .metrics import TIMED_KINDS, RunMetrics, run_metrics
from .redaction import learn_encoded_in, register_request_credentials, safe_text, truncate

# the keys start() sets on every span, read as module globals (one lookup each, not a global and a module
# attribute): a dozen per span
from .semconv import (
    DAG_DEPTH,
    DAG_NODE,
    DAG_NODE_TYPE,
    DAG_ORDER_INDEX,
    DAG_PARENT_NODE,
    EVENT_DEPTH,
    EXECUTION_ORDER,
    GEN_AI_CONVERSATION_ID,
    GENERIC_SESSION_ID,
    SESSION_ID,
    SPAN_KIND,
)
from .version import __version__

logger = logging.getLogger("cmbagent_otel")


def make_tracer(scope_name: str, provider: trace.TracerProvider | None = None) -> Tracer:
    """The tracer of one instrumentation scope (``semconv.SCOPE_*``) from ``provider`` (``None``: the global one).

    A provider that fails to give one yields a no-op tracer: telemetry off, never an error in the app.
    """
    try:
        return trace.get_tracer(scope_name, __version__, tracer_provider=provider, schema_url=semconv.SCHEMA_URL)
    except Exception:
        logger.warning("cmbagent_otel: the tracer provider failed to create a tracer; %s spans are off",
                       scope_name, exc_info=True)
        return trace.NoOpTracer()


_GLOBAL_METRICS: Any = object()  # a binding that leaves the run metrics to the global meter provider


class _LateSpan(trace.NonRecordingSpan):
    """The span of a workflow block opened while no tracer provider records (before ``instrument()``,
    no global provider): it keeps what the span would have been (name, parent context, attributes,
    start time) and starts it, with that start time, as soon as it is asked for its context or state
    once a provider records (a block or an AG2 span opened under it, the block's end). Before, such a
    block recorded nothing, and the steps opened in it after ``instrument()`` named a parent node whose
    span never came: a placeholder node ``running`` for ever in a finished run, each step a run of its
    own. Never on a span's way once instrumented: only blocks opened with no provider at all are late."""

    def __init__(self, name: str, context: Context | None, kind: SpanKind,
                 attributes: Mapping[str, Any] | None) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self._late: tuple[Any, ...] | None = (name, context, kind, dict(attributes or {}), time_ns())
        self._real: Span | None = None

    def _resolve(self) -> Span | None:
        real = self._real
        if real is not None or self._late is None:
            return real
        tracer = workflow_tracers.current()
        if type(tracer) is _LateTracer:
            return None
        with _late_lock:
            late, self._late = self._late, None
            if late is not None:
                name, context, kind, attributes, started = late
                try:
                    self._real = tracer.start_span(name, context, kind, attributes, start_time=started)
                except Exception:
                    logger.debug("cmbagent_otel: could not start the late span %s", name, exc_info=True)
        return self._real

    def __getattr__(self, name: str) -> Any:  # a ReadableSpan's fields (context, attributes...) once started
        real = self.__dict__.get("_real")
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)

    def get_span_context(self) -> trace.SpanContext:
        real = self._resolve()
        return real.get_span_context() if real is not None else trace.INVALID_SPAN_CONTEXT

    def is_recording(self) -> bool:
        real = self._resolve()
        return real is not None and real.is_recording()

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: Any) -> None:
        real, late = self._resolve(), self._late
        if real is not None:
            real.set_attribute(key, value)
        elif late is not None:
            late[3][key] = value

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        real = self._resolve()
        if real is not None:
            real.add_event(name, attributes, timestamp)

    def update_name(self, name: str) -> None:
        real = self._resolve()
        if real is not None:
            real.update_name(name)

    def set_status(self, status: Any, description: str | None = None) -> None:
        real = self._resolve()
        if real is not None:
            real.set_status(status, description)

    def record_exception(self, exception: BaseException, attributes: Any = None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        real = self._resolve()
        if real is not None:
            real.record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        real = self._resolve()
        self._late = None  # ended: never started later
        if real is not None:
            real.end(end_time)


class _LateTracer(trace.NoOpTracer):
    """What the workflow API starts its spans with while no provider records: :class:`_LateSpan`."""

    def start_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Any = None, links: Any = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> Span:
        return _LateSpan(name, context, kind, attributes)


_LATE_TRACER = _LateTracer()
_late_lock = threading.RLock()  # a late span starts its late parent first, under the same lock
reset_in_child(sys.modules[__name__], "_late_lock")


class WorkflowTracers:
    """Where the workflow API (``workflow``/``phase``/``step``/``redo``) starts its spans and
    records its run-level metrics.

    The workflow API is called by the application, not through a patched method, so it has
    no instrumentor of its own: each active instrumentor that was given a provider (the AG2
    and cmbagent instrumentors, through ``instrument(tracer_provider=...)``) binds one here
    and releases it when uninstrumented; the latest binding still held wins, and with none
    the global providers are used. A binding also carries the run metrics of the meter
    provider it was given (``None``: metrics off). Nothing outlives the instrumentors that bound it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")
        # (token, tracer, run metrics[, provider, meter provider, metrics on]): the latest wins
        self._bindings: list[tuple[Any, ...]] = []
        self._global: Tracer | None = None
        self._global_metrics: RunMetrics | None = None

    def bind(self, provider: trace.TracerProvider | None, metrics: RunMetrics | None = _GLOBAL_METRICS) -> object:
        """Route workflow spans to ``provider`` (``None``: the global one) and run metrics to
        ``metrics`` (default: the global meter provider's; ``None``: none) until :meth:`release`
        of the returned token."""
        token = object()
        tracer = make_tracer(semconv.SCOPE_WORKFLOW, provider)
        with self._lock:
            self._bindings = [*self._bindings, (token, tracer, metrics)]
        return token

    def bind_providers(self, provider: trace.TracerProvider | None, meter_provider: Any, metrics_on: bool) -> object:
        """:meth:`bind` to ``provider`` and the run metrics of ``meter_provider`` (``None``: the global
        one; none when not ``metrics_on``), sharing the tracer and the run metrics of a binding still
        held for the same providers: ``instrument()`` binds through itself, the AG2 and the cmbagent
        instrumentors, and one tracer and one set of instruments serve all three."""
        token = object()
        with self._lock:
            shared = next((b for b in reversed(self._bindings)
                           if len(b) > 3 and b[3] is provider and b[4] is meter_provider and b[5] == metrics_on),
                          None)
        if shared is not None:
            tracer, metrics = shared[1], shared[2]
        else:
            tracer = make_tracer(semconv.SCOPE_WORKFLOW, provider)
            metrics = run_metrics(meter_provider) if metrics_on else None
        with self._lock:
            self._bindings = [*self._bindings, (token, tracer, metrics, provider, meter_provider, metrics_on)]
        return token

    def release(self, token: object) -> None:
        with self._lock:
            self._bindings = [b for b in self._bindings if b[0] is not token]

    def current(self) -> Tracer:
        bindings = self._bindings  # replaced, never mutated: no lock needed to read
        if bindings:
            return bindings[-1][1]
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return _LATE_TRACER  # no provider at all yet: the blocks' spans wait for one (_LateSpan)
        tracer = self._global
        if tracer is None:  # a proxy: follows the global provider once the application sets one
            tracer = self._global = make_tracer(semconv.SCOPE_WORKFLOW)
        return tracer

    def current_metrics(self) -> RunMetrics | None:
        """The run metrics of the latest binding (``None``: metrics off), else the global meter provider's."""
        bindings = self._bindings
        metrics = bindings[-1][2] if bindings else _GLOBAL_METRICS
        if metrics is not _GLOBAL_METRICS:
            return metrics  # type: ignore[no-any-return]
        found = self._global_metrics
        if found is None:  # proxy instruments: follow the global meter provider once one is set
            found = self._global_metrics = run_metrics(None)
        return found

    @contextlib.contextmanager
    def routed_to(self, provider: trace.TracerProvider) -> Iterator[None]:
        """Workflow spans go to ``provider`` inside the block (tests, embedding applications)."""
        token = self.bind(provider)
        try:
            yield
        finally:
            self.release(token)


workflow_tracers = WorkflowTracers()


_INT32 = 2**31 - 1
CHILD_ORDER_BASE = 1000  # a child of node P gets order_index order(P) * 1000 + k (docs/spans.md)


class NodeSpec:
    """Describes a span that is itself a node of the run's DAG.

    ``order_index`` ``None`` with ``child`` true: the node is the k-th child (sub-agent,
    redo, top-level conversation) of the enclosing node P and gets ``order(P) * 1000 + k``
    (``1000 + k`` when there is no enclosing node), so it never collides with a step number
    nor with a sibling. ``numbered``: the short id is ``<base_id>_<k>``. ``kept``: a block's node, started again
    when its start is interrupted (the workflow API's): the run's numbers it takes are kept as they are taken
    (see :func:`_name_node`); ``taken``: those an interrupted start of it took, taken again rather than anew.
    """

    __slots__ = ("base_id", "child", "children_key", "kept", "node_type", "numbered", "order_index", "taken",
                 "unique")

    def __init__(self, base_id: str, node_type: str, order_index: int | None = None, unique: bool = True,
                 child: bool = False, numbered: bool = False, parent: str | None = None, kept: bool = False,
                 taken: tuple[int, ...] = ()):
        self.base_id = base_id
        self.node_type = node_type
        self.order_index = order_index
        self.unique = unique
        self.child = child
        self.numbered = numbered
        self.kept = kept
        self.taken = taken
        # a spec only ever used under one parent node (``parent``) keeps its run counter's key: no string
        # built and hashed per node
        self.children_key = CHILDREN_KEY + parent if child and parent is not None else None


def _event_attributes(scope: Scope, kind: str, attributes: Mapping[str, Any] | None, new_conversation: bool,
                      scope_changes: Mapping[str, Any] | None) -> tuple[dict[str, Any], Scope]:
    """``compose`` for an execution event (not a DAG node, not a run's root) in ``scope``."""
    state = scope.run
    session = state.session_id
    conversation_id = new_conversation_id() if new_conversation else scope.conversation_id
    attrs: dict[str, Any] = {
        SPAN_KIND: kind, EXECUTION_ORDER: state.next_order(),
        SESSION_ID: session, GENERIC_SESSION_ID: session,
    }
    if conversation_id is not None:
        attrs[GEN_AI_CONVERSATION_ID] = conversation_id
    if scope.dag_node is not None:
        attrs[DAG_NODE] = scope.dag_node
    attrs[EVENT_DEPTH] = scope.event_depth
    new_scope = scope.child_event(conversation_id)
    if scope_changes:
        for name, value in scope_changes.items():  # a fresh scope nobody holds yet
            setattr(new_scope, name, value)
    if attributes:
        attrs.update(attributes)
    return attrs, new_scope


def compose(scope: Scope | None, kind: str, attributes: Mapping[str, Any] | None, node: NodeSpec | None,
            new_conversation: bool, run: RunState | None,
            scope_changes: Mapping[str, Any] | None, taken: list[int] | None = None) -> tuple[dict[str, Any], Scope]:
    """Attributes of a new span standing at ``scope``, and the scope of its children. ``taken``: where the
    run's numbers a DAG node takes are kept as they are taken (see :func:`_name_node`)."""
    if run is not None:
        scope = Scope.build(run, in_workflow=True)
    elif scope is None:
        scope = Scope.build(RunState())
    if node is None and run is None:  # an execution event: most spans
        return _event_attributes(scope, kind, attributes, new_conversation, scope_changes)
    state = scope.run
    session = state.session_id
    conversation_id = new_conversation_id() if new_conversation else scope.conversation_id
    attrs: dict[str, Any] = {
        SPAN_KIND: kind,
        EXECUTION_ORDER: state.next_order(),
        SESSION_ID: session,
        GENERIC_SESSION_ID: session,
    }
    if conversation_id is not None:
        attrs[GEN_AI_CONVERSATION_ID] = conversation_id
    if node is not None:
        if taken is None:
            taken = _numbers_for(node)
        node_id, depth, order = _name_node(state, scope, node, taken)
        _set_node(attrs, node, node_id, depth, scope.dag_node, order)
        new_scope = scope.child_node(node_id, node, depth, order, conversation_id)
    else:  # the workflow span: the run itself, not an event in it
        if scope.dag_node is not None:
            attrs[DAG_NODE] = scope.dag_node
        new_scope = scope.evolve(conversation_id=conversation_id)
    if scope_changes:
        for name, value in scope_changes.items():  # a fresh scope nobody holds yet
            setattr(new_scope, name, value)
    if attributes:
        attrs.update(attributes)
    return attrs, new_scope


# what a node that is not ``kept`` passes _name_node for the numbers it takes: never written (no list made per node)
_UNKEPT: list[int] = []


def _numbers_for(node: NodeSpec) -> list[int]:
    """Where :func:`_name_node` keeps the run's numbers ``node`` takes: a fresh list for a ``kept`` node (a
    block's, retried when its start is interrupted), else :data:`_UNKEPT`. One ``return`` at its end: written
    into the generated starts (:func:`start_of`)."""
    return [] if node.kept else _UNKEPT


def _name_node(state: RunState, scope: Scope, node: NodeSpec, taken: list[int]) -> tuple[str, int, int | None]:
    """A DAG node's id, depth and order_index under ``scope`` (a child takes the next index among its
    parent's children, a unique id the next number for its base: ``a``, then ``a_2``).

    A ``kept`` node's numbers go into ``taken`` (the caller's list: the child index, then the id's number),
    each in the one C call that takes it (``RunState.take``): a ``KeyboardInterrupt`` raised as ``next()``
    returned, or as this returned, lost the number with the return value, and the workflow API's retry of
    the interrupted start (:func:`retake_node`) took the next one. ``node.taken``: those its first start took.
    The other nodes (no retry: an agent turn) take theirs with ``next()``, ~2,000 instructions less each, and
    pass :data:`_UNKEPT`."""
    order = node.order_index
    base_id = node.base_id
    kept = node.kept
    if kept and node.taken:  # a retried start's: what its interrupted start took
        taken.extend(node.taken)
    if node.child:  # next_child_index and (below) unique_node_id written out: every sub-agent turn
        if kept:
            if not taken:
                state.take(CHILDREN_KEY + (scope.dag_node or ""), taken)
            k = taken[0]
        elif _GIL:
            key = node.children_key
            k = next(state._counters[key if key is not None else CHILDREN_KEY + (scope.dag_node or "")])
        else:
            k = state.next_child_index(scope.dag_node or "")
        parent_order = scope.dag_order if scope.dag_node is not None else 1
        order = min(parent_order * CHILD_ORDER_BASE + k, _INT32)
        if node.numbered:
            base_id = f"{base_id}_{k}"
    if not node.unique:
        node_id = base_id
    else:
        if kept:
            if len(taken) == node.child:  # not taken yet (a child's index is the first)
                state.take(base_id, taken)
            count = taken[-1]
        elif _GIL:
            count = next(state._counters[base_id])
        else:
            count = state._next(base_id)
        node_id = base_id if count == 1 else f"{base_id}_{count}"
    return node_id, scope.dag_depth + 1, order


def _set_node(attrs: dict[str, Any], node: NodeSpec, node_id: str, depth: int, parent: str | None,
              order: int | None) -> None:
    """Write a DAG node span's node attributes (see :func:`_name_node`) into ``attrs``."""
    attrs[DAG_NODE] = node_id
    attrs[DAG_NODE_TYPE] = node.node_type
    attrs[DAG_DEPTH] = depth
    if parent is not None:
        attrs[DAG_PARENT_NODE] = parent
    if order is not None:
        attrs[DAG_ORDER_INDEX] = order


def _timing(kind: str, attributes: Mapping[str, Any] | None, scope: Scope, span: Any) -> tuple[Any, ...] | None:
    """What a span of ``kind`` needs to record its run-level duration metric when it ends (``None``: none).
    The monotonic start is kept on ``span`` too, for the signal handler ending it (:data:`MONOTONIC_START`):
    its wall-clock start may be an NTP step or a resumed VM away from now."""
    if kind not in TIMED_KINDS:
        return None
    metrics = workflow_tracers.current_metrics()
    if metrics is None:
        return None
    started = perf_counter()
    fields = getattr(span, "__dict__", None)
    if type(fields) is dict:
        fields[MONOTONIC_START] = started
    return metrics, kind, attributes, scope.run.name, started


def _record_timing(timing: tuple[Any, ...], error_type: str | None) -> None:
    metrics, kind, attributes, workflow_name, started = timing
    metrics.ended(kind, attributes, perf_counter() - started, error_type, workflow_name)


def open_frame(name: str, kind: str, attributes: Mapping[str, Any] | None, node: NodeSpec | None,
               parent_scope: Scope | None, parent_span: Span | None, kind_of_frame: str, owner: Any = None,
               scope_changes: Mapping[str, Any] | None = None, run: RunState | None = None,
               tracer: Tracer | None = None) -> Frame:
    """Start a span under ``parent_span`` (explicit parent, nothing attached) as a :class:`Frame`.

    ``parent_span`` ``None``: the active span is the parent (a new run's root). The caller
    pushes the frame on a cursor (or keeps it); ending it (:meth:`Frame.finish`, directly or
    via the cursor) ends the span.
    """
    attrs, scope = compose(parent_scope, kind, attributes, node, False, run, scope_changes)
    parent = trace.set_span_in_context(parent_span) if parent_span is not None else None
    span = (tracer or workflow_tracers.current()).start_span(name, context=parent, kind=SpanKind.INTERNAL,
                                                            attributes=attrs)
    if node is not None or run is not None:
        try:
            _track(_ref(span, _untrack))  # a run or DAG-node span, for the signal handler (_termination)
        except Exception:  # another SDK's span that takes no weak reference, or no hash
            logger.debug("cmbagent_otel: cannot track span %s", name, exc_info=True)
    frame = Frame(span, scope, kind_of_frame, owner, finish=end_frame)
    try:
        frame.timing = _timing(kind, attrs, scope, span)
    except Exception:
        logger.debug("cmbagent_otel: no duration metric for %s", name, exc_info=True)
    return frame


def effective_parent() -> tuple[Scope | None, Span]:
    """Where new work stands now: the innermost open frame of the active anchor, else the active scope and span."""
    scope = raw_scope()
    if scope is not None and scope.cursor is not None:
        frame = scope.cursor.resolve()
        if frame is not None:
            return frame.scope, frame.span
    return scope, trace.get_current_span()


def attach_anchor() -> tuple[object, Scope] | None:
    """Attach a copy of the current scope that is an anchor with its own cursor; ``None`` outside any run.

    Frames pushed on its cursor parent the work started directly in it; the caller closes
    them and detaches the token (strictly last-in-first-out, in the same block).
    """
    scope, span = effective_parent()
    if scope is None:
        return None
    anchor = scope.evolve()
    anchor.ensure_cursor()
    return otel_context.attach(with_scope(anchor, trace.set_span_in_context(span))), anchor


def close_anchored(anchor: Scope, exc: BaseException | None = None) -> None:
    """Close every frame still open on ``anchor``, recording ``exc`` (the exception that ended the block
    that anchored them); never raises."""
    try:
        cursor = anchor.cursor
        if cursor is not None:
            frames = list(cursor.frames)
            if exc is not None:
                for frame in frames:
                    with contextlib.suppress(Exception):
                        record_exception(frame.span, exc)
                    frame.error = frame.error or error_type(exc)
            cursor.close_all(frames)
    except Exception:
        logger.debug("cmbagent_otel: could not close anchored frames", exc_info=True)


def detach_anchor(token: object, anchor: Scope, exc: BaseException | None = None) -> None:
    """Close every frame still open on ``anchor`` (recording ``exc``) and detach ``token``; never raises."""
    close_anchored(anchor, exc)
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:
        logger.debug("cmbagent_otel: could not detach context", exc_info=True)


def end_frame(frame: Frame, exc: BaseException | None = None) -> None:
    """End a frame's span (recording ``exc``); never raises."""
    try:
        if exc is not None:
            frame.error = frame.error or error_type(exc)
            if frame.span.is_recording():
                record_exception(frame.span, exc)
    except Exception:
        logger.debug("cmbagent_otel: could not record exception", exc_info=True)
    try:
        frame.span.end()
    except Exception:
        logger.debug("cmbagent_otel: could not end span", exc_info=True)
    timing, frame.timing = frame.timing, None
    if timing is not None and claim_duration(frame.span, frame):
        try:
            _record_timing(timing, frame.error)
        except Exception:
            logger.debug("cmbagent_otel: could not record a duration", exc_info=True)


def fail_frame(frame: Frame, description: str, error_type: str = "error") -> None:
    """Mark a frame's span failed without an exception (its duration metric gets ``error_type``); never raises."""
    frame.error = error_type
    try:
        frame.span.set_status(Status(StatusCode.ERROR, safe_text(description, 1024)))
        frame.span.set_attribute(semconv.ERROR_TYPE, error_type)
    except Exception:
        logger.debug("cmbagent_otel: could not mark a span failed", exc_info=True)


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, or what ``traceback`` prints for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def error_type(exc: BaseException) -> str:
    """``exc``'s type name for ``error.type`` (spans, events, metrics), redacted and bounded: a class made at
    run time (``type(name, ...)``) may carry any text, of any length. Only exception paths call it."""
    return safe_text(type(exc).__qualname__, 256) or "error"


def record_exception(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` (secrets redacted) and mark the span failed."""
    # the credentials its HTTP request carried (an Azure AD token, an httpx auth's password): a server's
    # error may quote them, and nothing else registered them
    register_request_credentials(exc)
    # safe_text reads a bounded prefix: a message of megabytes costs what its kept part does
    text = exception_text(exc)
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    learn_encoded_in(trace)  # a learned password it quotes base64- or hex-encoded (its causes' too)
    message = safe_text(text) or ""
    stack = safe_text(trace, 16384) or ""
    del trace  # the SDK formats it again below: a huge message must not be held twice meanwhile
    # the type's names too: a class made at run time (type(name, ...)) may carry any text, of any length
    type_name = error_type(exc)
    module = type(exc).__module__
    qualified = f"{safe_text(str(module), 256)}.{type_name}" if module and module != "builtins" else type_name
    attributes = {"exception.type": qualified, "exception.message": message, "exception.stacktrace": stack}
    try:
        span.record_exception(exc, attributes=attributes)
    except Exception:  # the SDK's own str(exc) raised: the same event without it
        span.add_event("exception", attributes)
    span.set_status(Status(StatusCode.ERROR, status_message(type_name, message)))
    span.set_attribute(semconv.ERROR_TYPE, type_name)


def status_message(type_name: str, message: str) -> str:
    """A failed span's status message: ``<Type>: <message>``, or the type alone for an exception without a
    message (``KeyboardInterrupt``, ``CancelledError``): the SDK's ``f"{type}: {exc}"`` leaves those ending in
    ``": "``, which the run's and nodes' ``error`` in cmbagent's UI then show."""
    return truncate(f"{type_name}: {message}" if message else type_name, 1024) or type_name


# --- sampling decided before anything is built ------------------------------------------------
def _reference_is_recording(self: Any) -> bool:
    return self._end_time is None  # type: ignore[no-any-return]


class _NoSpan:
    """No span is of this type: :data:`END_TIME_SPAN` when the SDK's span cannot be read directly."""


def _end_time_span() -> type:
    """The SDK's span class when its ``is_recording()`` is exactly ``return self._end_time is None``
    (same bytecode, names and constants as :func:`_reference_is_recording`), else :class:`_NoSpan`."""
    try:
        from opentelemetry.sdk.trace import _Span

        code, reference = _Span.is_recording.__code__, _reference_is_recording.__code__
        if (code.co_code, code.co_names, code.co_consts, code.co_argcount) == (
                reference.co_code, reference.co_names, reference.co_consts, reference.co_argcount):
            return _Span
    except Exception:
        logger.debug("cmbagent_otel: the SDK's span class is not the one expected", exc_info=True)
    return _NoSpan


# A wrapper asks whether the current span records on every call: for a span of exactly this class it
# reads ``span._end_time is None``, what its is_recording() returns, for ~300 instructions less than
# the method call
END_TIME_SPAN = _end_time_span()


_UNKNOWN, _ALWAYS, _PARENT = 0, 1, 2


def _sampler_kind(sampler: Any) -> tuple[int, bool]:
    """(what a sampler decides without looking at the span, whether it drops root spans)."""
    if sampler is sampling.ALWAYS_OFF:
        return _ALWAYS, True
    # the SDK's ParentBased itself: a subclass may decide otherwise (keep every agent turn, say), and its
    # spans were dropped ahead as its delegates would have dropped them
    if type(sampler) is sampling.ParentBased:
        # private fields of the SDK's ParentBased: anything unexpected means "cannot tell"
        not_sampled = (getattr(sampler, "_remote_parent_not_sampled", None),
                       getattr(sampler, "_local_parent_not_sampled", None))
        if all(d is sampling.ALWAYS_OFF for d in not_sampled):
            return _PARENT, getattr(sampler, "_root", None) is sampling.ALWAYS_OFF
    return _UNKNOWN, False


class SamplingProbe:
    """Tells, before any attribute is built, that a span started now through ``tracer`` cannot be
    recording: the tracer is a no-op one (no SDK provider, ``OTEL_SDK_DISABLED``), its sampler
    drops everything (``always_off``), or it follows the parent (``parentbased_*``, the default)
    and the parent is not sampled. Anything it cannot tell for sure (a custom sampler, another
    tracing implementation) counts as "may record": the full path then runs and the SDK decides.
    """

    __slots__ = ("_kind", "_last", "_root_drops", "_tracer", "drops_all", "follows_parent")

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._kind: int | None = None
        self._root_drops = False
        # known to be parent-based (the SDK's default sampler): a recording parent means "may record",
        # which a caller can tell without calling drops(); False until classified
        self.follows_parent = False
        # known to drop every span (a no-op tracer, ``always_off``): a caller can tell without calling
        # drops(), as it can a recording parent; False until classified
        self.drops_all = False
        # (parent span, decision) of the last non-recording parent: an unsampled chat asks about the
        # same parent again and again (one tuple, so threads never pair a span with another's answer);
        # a recording parent answers is_recording() first, nothing cached
        self._last: tuple[Any, bool] = (None, False)

    def _classify(self) -> tuple[int, bool]:
        tracer = self._tracer
        if isinstance(tracer, trace.ProxyTracer):  # global provider: may be set any time
            real = getattr(tracer, "_tracer", None)
            if real is None or real is getattr(tracer, "_noop_tracer", None):
                return (_ALWAYS, True) if real is not None else (_UNKNOWN, False)
            tracer = real
            # the global provider is set once: a proxy's real delegate, and so its sampler, never change
            self._tracer = tracer
        # the classes themselves, not subclasses: one may start spans its own way (see _sampler_kind)
        if type(tracer) is trace.NoOpTracer:
            kind, root = _ALWAYS, True
        elif type(tracer) is SdkTracer:
            kind, root = _sampler_kind(getattr(tracer, "sampler", None))
        else:
            kind, root = _UNKNOWN, False
        self._kind, self._root_drops = kind, root
        self.follows_parent = kind == _PARENT and SPAN_KEY is not None
        self.drops_all = kind == _ALWAYS
        return kind, root

    def drops(self, ctx: otel_context.Context) -> bool:
        """Whether a span started in ``ctx`` now is sure not to be recorded."""
        kind = self._kind
        root = self._root_drops
        if kind is None:
            kind, root = self._classify()
        if kind == _UNKNOWN:
            return False
        if kind == _ALWAYS:
            return True
        span = ctx.get(SPAN_KEY) if SPAN_KEY is not None else trace.get_current_span(ctx)
        if span is None:
            return root
        if span.is_recording():
            return False  # a recording parent: the full path, the SDK decides (sampled, in practice)
        last = self._last
        if last[0] is span:
            return last[1]
        span_context = span.get_span_context()
        decision = root if not span_context.is_valid else not span_context.trace_flags.sampled
        self._last = (span, decision)
        return decision


_copy = dict.copy

# the keys start() sets itself, before a span's own attributes
_START_KEYS = frozenset({SPAN_KIND, EXECUTION_ORDER, SESSION_ID, GENERIC_SESSION_ID,
                         GEN_AI_CONVERSATION_ID, DAG_NODE, EVENT_DEPTH, DAG_NODE_TYPE,
                         DAG_DEPTH, DAG_PARENT_NODE, DAG_ORDER_INDEX})


class SharedAttributes(dict):  # type: ignore[type-arg]
    """Attributes that many spans start with (an agent's, a model config's), never changed once built.

    :func:`start` gives such a span a copy of a template (the keys it sets itself, then these)
    instead of filling a new dict and updating it with these: the same attributes in the same
    order for about half the instructions. Templates are built on first use, one per shape (which
    optional keys the span has). Attributes naming one of start()'s own keys take the plain path.
    """

    __slots__ = ("templates",)

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        super().__init__(attributes)
        self.templates: list[dict[str, Any] | None] | None = None if _START_KEYS.intersection(self) else [None] * 16

    def template(self, shape: int) -> dict[str, Any]:
        """The template of ``shape``: 1 a conversation id, 2 a parent DAG node; for a DAG node (8) 4 an order index."""
        keys = [SPAN_KIND, EXECUTION_ORDER, SESSION_ID, GENERIC_SESSION_ID]
        if shape & 1:
            keys.append(GEN_AI_CONVERSATION_ID)
        if shape & 8:
            keys += (DAG_NODE, DAG_NODE_TYPE, DAG_DEPTH)
            if shape & 2:
                keys.append(DAG_PARENT_NODE)
            if shape & 4:
                keys.append(DAG_ORDER_INDEX)
        else:
            if shape & 2:
                keys.append(DAG_NODE)
            keys.append(EVENT_DEPTH)
        template: dict[str, Any] = dict.fromkeys(keys)
        template.update(self)
        self.templates[shape] = template  # type: ignore[index]  # threads may both build it: the same dict
        return template


# Spans that seldom have spans of ours under them: their children's scope is built on first use. Others
# (agent turns, conversations...) build it at once: their children read it many times, a lazy one
# costs each read two calls more.
LEAF_KINDS = frozenset({semconv.KIND_LLM, semconv.KIND_TOOL, semconv.KIND_CODE, semconv.KIND_HUMAN_INPUT})
_child_scope_lock = threading.Lock()  # a lazy child scope is built once, whichever thread asks first
reset_in_child(sys.modules[__name__], "_child_scope_lock")

# The run and DAG-node spans of ours started in this process (workflow, phase, step, redo, sub-agent
# turn, conversation node): those still open when SIGTERM/SIGHUP stops the process are ended failed
# (_termination), or their rows would stay `executing`/`running` for ever. Weak references whose
# callback is the set's own discard: a span leaves it when it is dropped, and neither entering nor
# leaving runs Python code (a WeakSet's add and removal callback cost ~20 bytecodes per span more).
# Model, tool and code spans never enter it. A forked child opened none of them.
_open_node_spans: set[weakref.ref[Span]] = set()
_track = _open_node_spans.add
_untrack = _open_node_spans.discard
_ref = weakref.ref


def _ended_by_the_parent(end_time: int | None = None) -> None:
    """``end()`` of a forked child's copy of a span its parent opened (see :func:`_disown_in_child`)."""


def _disown_in_child() -> None:
    """After a ``fork()``, the run and node spans open in the parent are the parent's to end and export. The
    child holds copies of them; leaving the blocks it was forked in ended its copies too, and its exporter
    wrote them with the same ids over the parent's rows (a failure in the child showed the parent's step
    failed). Their ``end()`` does nothing in the child (an instance attribute: no cost to other spans);
    the child's own spans still go under them."""
    for ref in list(_open_node_spans):
        span = ref()
        if span is not None:
            with contextlib.suppress(Exception):
                span.end = _ended_by_the_parent
    _open_node_spans.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_in_child)


def open_node_spans() -> list[Span]:
    """The run and DAG-node spans of ours started in this process and not dropped yet (ended or not)."""
    spans = (ref() for ref in list(_open_node_spans))  # list(): one C-level copy, other threads may add
    return [span for span in spans if span is not None]


def start(self: Any, name: str, kind: str, attributes: Mapping[str, Any] | None, node: NodeSpec | None,
          scope_changes: Mapping[str, Any] | None, tracer: Tracer | None, span_kind: SpanKind,
          ctx: otel_context.Context | None, new_conversation: bool = False, run: RunState | None = None,
          known: Scope | None = None) -> Any:
    """Start ``self`` (a new :class:`TracedSpan`, or a subclass's, made by ``cls.__new__``: no ``__init__``
    needed) as ``TracedSpan(name, kind, attributes, node=..., ...).__enter__()`` would, and return it.

    The instrumentation's hot builders call this directly: one call where constructing with keywords
    (a dict of them, ``type.__call__``, ``__init__``) and then ``__enter__`` (reading back every field)
    took three. The span's inputs are never stored: only what ending it and its children's scope need.
    ``known``: the scope ``ctx`` holds, already read by the caller, a :class:`Scope` without a cursor
    (``None``: read here).

    Its source is also the source of the hot span types' starts (:func:`start_of`, generated from it and
    from :func:`_numbers_for`, :func:`_name_node`, :func:`_set_node` and ``Scope.child_node``, which are written into
    them): a change here is a change there; those helpers keep their one ``return`` at their end (else they are not
    written in).
    """
    # every field is set once, on the way (a failed start sets the ones it did not reach: _unstarted)
    frame = None
    try:  # telemetry must never break the app
        scope = known
        if scope is None:
            if ctx is None:
                ctx = get_current()
            if run is None:
                scope = ctx.get(_SCOPE_KEY)
                if type(scope) is not Scope:
                    scope = scope_in(scope)  # not ours (None), or a span's children's scope not built yet
            parent_ctx = ctx
            if scope is not None:
                cursor = scope.cursor
                if cursor is not None:
                    # work started directly in an anchor scope belongs to its innermost open frame
                    frame = cursor.enter()
                    if frame is not None:
                        scope = frame.scope
                        parent_ctx = span_context(ctx, frame.span)
        else:  # an agent turn: its builder read the scope (no anchor, so no frame)
            parent_ctx = ctx
        self._frame = frame
        self._error = None
        if scope is not None and run is None and not new_conversation:
            # a span inside a run in the same conversation, nearly every span: compose() (its event
            # case and its DAG-node case) written out
            state = scope.run
            conversation_id = scope.conversation_id
            session = state.session_id
            dag_node = scope.dag_node
            if node is not None:  # its order decides the attributes' template below
                # a block's node: the run's numbers it takes, kept as taken for a retry (_keep_taken)
                numbers = _numbers_for(node)
                node_id, depth, order = _name_node(state, scope, node, numbers)
            templates = attributes.templates if type(attributes) is SharedAttributes else None
            if templates is not None:
                # a copy of the attributes with this shape's keys in front (values set below): the
                # same dict, in the same key order, as filling an empty one and updating it with
                # the attributes, for ~3,000 instructions less
                shape = (conversation_id is not None) + 2 * (dag_node is not None)
                if node is not None:
                    shape += 8 + 4 * (order is not None)
                attrs = _copy(templates[shape] or attributes.template(shape))
            else:
                attrs = {}
            attrs[SPAN_KIND] = kind
            attrs[EXECUTION_ORDER] = next(state._order) if _GIL else state.next_order()
            attrs[SESSION_ID] = session
            attrs[GENERIC_SESSION_ID] = session
            if conversation_id is not None:
                attrs[GEN_AI_CONVERSATION_ID] = conversation_id
            if node is None:
                if dag_node is not None:
                    attrs[DAG_NODE] = dag_node
                attrs[EVENT_DEPTH] = scope.event_depth
                # None: the same scope one event level down, built on first use (child_scope)
                new_scope = None if kind in LEAF_KINDS and not scope_changes else scope.child_event(conversation_id)
            else:
                _set_node(attrs, node, node_id, depth, dag_node, order)
                # through the class (the same function: every scope is a Scope): written into the generated starts
                new_scope = Scope.child_node(scope, node_id, node, depth, order, conversation_id)
            if scope_changes:
                for field, value in scope_changes.items():  # a fresh scope nobody holds yet
                    setattr(new_scope, field, value)
            if templates is None and attributes:
                attrs.update(attributes)
        else:
            numbers = _UNKEPT if node is None else _numbers_for(node)
            attrs, new_scope = compose(scope, kind, attributes, node, new_conversation, run, scope_changes, numbers)
        # positional, in the order the API's Tracer.start_span declares: no keyword matching per span
        span = (tracer or workflow_tracers.current()).start_span(name, parent_ctx, span_kind, attrs)
        self.span = span
        held: Scope | TracedSpan = self  # what the context holds for the children's scope
        if new_scope is None:
            self._scope = None
            self._parent_scope = scope
        else:
            self._scope = held = new_scope
            self._parent_scope = None
            new_scope.owner = span
        if SPAN_KEY is None:
            self._token = attach(with_scope(held, span_context(parent_ctx, span)))  # type: ignore[arg-type]
        else:  # one new Context, from a plain dict filled first: two dict.__setitem__ calls on a Context
            # (a slot wrapper: an argument tuple each) cost ~900 instructions more per span
            # dict.copy: a plain dict as dict() gives, ~590 instructions less per span (dict()'s type call)
            try:
                values = _copy(parent_ctx)
            except TypeError:  # not a dict: any other mapping a runtime context was given
                values = dict(parent_ctx)
            values[SPAN_KEY] = span
            values[_SCOPE_KEY] = held
            self._token = attach(Context(values))
        self._timing = _timing(kind, attrs, new_scope or scope, span) if kind in TIMED_KINDS else None
        if new_scope is not None and (node is not None or run is not None):  # last: the span is set up
            _track(_ref(span, _untrack))  # a run or DAG-node span, for the signal handler (_termination)
    except Exception:
        logger.debug("cmbagent_otel: could not start span %s", name, exc_info=True)
        _unstarted(self, frame)
    except BaseException as exc:  # raised asynchronously (Ctrl-C's KeyboardInterrupt from a signal handler)
        try:
            sent, parent = attrs, parent_ctx  # what the SDK's start_span was given, if start got that far
        except NameError:  # (UnboundLocalError)
            sent = None
        if sent is not None:
            _lost_in_start_span(self, name, sent, parent)
        try:
            taken = node_id, order  # the DAG node id and order _name_node took, if start got that far
        except NameError:  # (UnboundLocalError)
            taken = None
        try:
            numbers_taken = numbers  # the run's numbers taken for the node (before its id was named), if any
        except NameError:  # (UnboundLocalError)
            numbers_taken = None
        _keep_taken(self, node, taken, sent, numbers_taken)
        _interrupted(self, frame, ctx, exc)
        raise  # unchanged: the application's
    return self


def _keep_taken(self: Any, node: NodeSpec | None, taken: tuple[str, int | None] | None,
                sent: Mapping[str, Any] | None, numbers: list[int] | None = None) -> None:
    """When :func:`start` was interrupted before its span started, after it named the span's DAG node (a
    unique id takes the run's next number for its base: ``a``, then ``a_2``; a child the next index among
    its parent's children): keep that id and order for a retry of this start (:func:`retake_node`); before it
    named it, the run's ``numbers`` it took for it (:func:`_name_node`), for the retry to take them again.
    Never raises."""
    try:
        if node is None or getattr(self, "span", trace.INVALID_SPAN) is not trace.INVALID_SPAN:
            return
        if taken is None and sent is not None:  # described by compose(): its attributes hold them
            taken = sent.get(DAG_NODE), sent.get(DAG_ORDER_INDEX)
        if taken is not None and type(taken[0]) is str:
            self._taken = taken
        elif numbers:
            self._taken = tuple(numbers)
    except Exception:
        logger.debug("cmbagent_otel: could not keep the node id of an interrupted start", exc_info=True)


def retake_node(traced: TracedSpan) -> None:
    """Before ``traced`` is started again after an interrupted start (the workflow API records a block
    interrupted there, failed): its DAG node keeps the id that start took (see :func:`_keep_taken`). A
    second start named it anew: ``a_2``, ``step_1_2``, with no node ``a`` at all. Never raises."""
    try:
        taken = getattr(traced, "_taken", None)
        node = traced._node
        if taken is None or node is None:
            return
        del traced._taken
        if type(taken[0]) is int:  # only the numbers: named from them again, none taken anew
            retaken = NodeSpec(node.base_id, node.node_type, node.order_index, node.unique, node.child, node.numbered,
                               kept=True, taken=taken)
            retaken.children_key = node.children_key
            traced._node = retaken
            return
        node_id, order = taken
        # the same id and order as the first start's (a child's order is the index it took), no number taken
        traced._node = NodeSpec(node_id, node.node_type, order, unique=False)
    except Exception:
        logger.debug("cmbagent_otel: could not keep the node id of an interrupted start", exc_info=True)


def _lost_in_start_span(self: Any, name: str, sent: Mapping[str, Any], parent: otel_context.Context | None) -> None:
    """When :func:`start` was interrupted inside the SDK's ``start_span`` after the span started (its span
    processors' ``on_start`` ran) or as it returned, before ``self.span`` held it: take that span back, so
    ``_interrupted`` ends it. Lost, it never ended, and the live DAG's started record (queued by our
    processor's ``on_start``) left its node ``running`` for good, beside the node of the span the block
    then started and ended for the interrupt. Only a span our processor saw start can be found (in this
    thread, the last one, still alive: the interrupted frames hold it); it must be this one: the same
    name, parent and execution order (an interrupt before the SDK was called finds an earlier span, which
    may still be open). Never raises."""
    try:
        if getattr(self, "span", trace.INVALID_SPAN) is not trace.INVALID_SPAN:
            return  # start got the span: nothing lost
        from .processor import take_started_here

        span = take_started_here()
        if span is None or span.name != name or span.end_time is not None:
            return
        attributes = span.attributes or {}
        if attributes.get(EXECUTION_ORDER) != sent.get(EXECUTION_ORDER):
            return
        expected = trace.get_current_span(parent).get_span_context()
        found = span.parent
        if (found.span_id, found.trace_id) != (expected.span_id, expected.trace_id) if found is not None \
                else expected.is_valid:
            return
        self.span = span
    except Exception:
        logger.debug("cmbagent_otel: could not find a span lost in an interrupted start", exc_info=True)


_ANY_NODE: Any = object()
# module names start() reads that never change once imported: their tests fold in a span type's start
_START_CONSTANTS = ("_GIL", "SPAN_KEY", "LEAF_KINDS", "TIMED_KINDS")


def start_of(kind: str, span_kind: SpanKind, node: Any = _ANY_NODE) -> Callable[..., Any]:
    """:func:`start` for the spans of one type, generated from its source (:mod:`._specialise`).

    Called ``start_x(self, name, attributes, node, tracer, ctx, known=None)`` (``node`` absent when
    fixed to ``None``): ``kind`` and ``span_kind`` fixed, no run, no new conversation, no scope change,
    and every test those decide folded away, with the DAG node's naming and its children's scope written in.
    Any other argument (no scope, an anchor's frame, attributes not shared) takes start()'s own path within it: the same
    spans, attributes and context as :func:`start`, for fewer bytecodes per span.
    """
    fixed: dict[str, Any] = {"kind": kind, "span_kind": span_kind, "scope_changes": None,
                             "new_conversation": False, "run": None}
    if node is None:
        fixed["node"] = None
    return specialise(start, f"start_{kind}" + ("_event" if node is None else ""), fixed,
                      constants=_START_CONSTANTS,
                      inline=() if node is None else (_numbers_for, _name_node, _set_node, Scope.child_node))


def _interrupted(self: Any, frame: Frame | None, ctx: otel_context.Context | None, exc: BaseException) -> None:
    """:func:`start` was interrupted by ``exc`` (a signal handler's ``KeyboardInterrupt``, at any call of it): the
    caller never gets the span to end, so the span started here ends now, failed, and the context it
    attached is detached; left as they were, the span stayed open and current in the thread, and an
    application catching the exception (a notebook cell) ran its next chats as that span's children."""
    _unstarted(self, frame)
    if self._token is None and ctx is not None:
        span = self.span
        try:
            current = get_current()
            if current is not ctx and span is not trace.INVALID_SPAN and trace.get_current_span(current) is span:
                # interrupted right after attach() returned, before its token was kept: back to the context the
                # span was started in (what the caller holds as current); that token is never reset
                attach(ctx)
        except Exception:
            logger.debug("cmbagent_otel: could not restore the context of an interrupted start", exc_info=True)
    end_interrupted(self, exc)


def end_interrupted(traced: TracedSpan, exc: BaseException) -> None:
    """End ``traced``, started (its context attached), for ``exc``: raised asynchronously (a signal handler's
    ``KeyboardInterrupt``) before the caller's ``try``/``with`` that ends it was reached, by :func:`start`
    or by what a subclass's ``__enter__`` does after it. Its own ``__exit__``, so a subclass undoes its
    bookkeeping too; never raises (the caller re-raises ``exc`` unchanged)."""
    try:
        traced.__exit__(type(exc), exc, exc.__traceback__)
    except Exception:  # a subclass's exit meeting a field its interrupted enter did not set
        logger.debug("cmbagent_otel: could not end an interrupted span", exc_info=True)


# what start() leaves in a field it did not reach
_FIELD_DEFAULTS = (("_token", None), ("_timing", None), ("_error", None), ("span", trace.INVALID_SPAN),
                   ("_scope", None), ("_parent_scope", None))


def _unstarted(self: Any, frame: Frame | None) -> None:
    """After a failed :func:`start`: every field it had not set yet gets its default (the frame it entered
    is kept, so ending the span leaves it)."""
    self._frame = frame
    for field, value in _FIELD_DEFAULTS:
        try:
            getattr(self, field)
        except AttributeError:
            setattr(self, field, value)


class TracedSpan(LazyScope):
    """Context manager that opens a span with cmbagent-otel's bookkeeping.

    ``kind`` is the ``cmbagent.span.kind`` value. ``node`` makes the span a DAG node;
    otherwise it is an execution event. ``new_conversation`` starts a new
    ``gen_ai.conversation.id`` for the span and its descendants. ``run`` is used when the
    span starts a new run (workflow spans); other spans join the run of the active
    context, or start an implicit one when there is none. ``tracer`` is the instrumentor's
    (built from the provider it was given); ``None``: the workflow API's
    (:data:`workflow_tracers`). ``span_kind``: the OTel span kind (model calls are CLIENT).
    ``context``: the current context as the caller already read it (read at start otherwise).

    Starting reads the context once and attaches one new Context (the span and the scope of
    its children); workflow and step spans also time themselves for the run-level metrics.
    A model, tool, code or human-input span (:data:`LEAF_KINDS`) that changes nothing in its
    children's scope puts itself in the context instead: the scope is built if a span of ours
    asks for it (:class:`~cmbagent_otel._context.LazyScope`), the same one for every reader.
    """

    # _taken: set only by an interrupted start (_keep_taken), never in __init__
    __slots__ = ("_attrs", "_ctx", "_error", "_frame", "_kind", "_name", "_new_conversation", "_node",
                 "_parent_scope", "_run", "_scope", "_scope_changes", "_span_kind", "_taken", "_timing", "_token",
                 "_tracer", "span")

    def __init__(
        self,
        name: str,
        kind: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        node: NodeSpec | None = None,
        new_conversation: bool = False,
        run: RunState | None = None,
        scope_changes: Mapping[str, Any] | None = None,
        tracer: Tracer | None = None,
        span_kind: SpanKind = SpanKind.INTERNAL,
        context: otel_context.Context | None = None,
    ) -> None:
        self._tracer = tracer
        self._span_kind = span_kind
        self._name = name
        self._kind = kind
        self._attrs = attributes
        self._node = node
        self._new_conversation = new_conversation
        self._run = run
        self._scope_changes = scope_changes
        self._ctx = context
        self._token = None
        self._frame = None
        self._timing = None
        self._error = None
        self.span = trace.INVALID_SPAN
        self._scope = None
        self._parent_scope = None  # set when the children's scope is built on first use

    @property
    def scope(self) -> Scope | None:
        """The scope of this span's children (``None`` before it started, or when it could not)."""
        return self._scope if self._scope is not None else self.child_scope()

    @property
    def steps(self) -> Any:
        """The plan-step tracker of the chat this span's children run in (without building a lazy scope)."""
        scope = self._scope if self._scope is not None else self._parent_scope
        return scope.steps if scope is not None else None

    def child_scope(self) -> Scope | None:
        scope = self._scope
        parent = self._parent_scope
        if scope is None and parent is not None:
            with _child_scope_lock:
                scope = self._scope
                if scope is None:
                    scope = parent.child_event(parent.conversation_id)
                    scope.owner = self.span
                    self._scope = scope
        return scope

    def __enter__(self) -> TracedSpan:
        ctx, self._ctx = self._ctx, None
        return start(self, self._name, self._kind, self._attrs, self._node, self._scope_changes, self._tracer,
                     self._span_kind, ctx, self._new_conversation, self._run)

    def start_detached(self, parent_scope: Scope | None, parent_span: Span | None, frame_kind: str,
                       owner: Any = None) -> Frame:
        """Start this span as a :class:`Frame` under ``parent_span`` instead of entering it (nothing attached)."""
        frame = open_frame(self._name, self._kind, self._attrs, self._node, parent_scope, parent_span, frame_kind,
                           owner, self._scope_changes, self._run, self._tracer)
        self.span, self._scope = frame.span, frame.scope
        self._frame = None
        self._timing = frame  # fail() marks the frame: its duration metric is recorded when it ends
        return frame

    def _exception(self, exc: BaseException) -> None:
        """The wrapped call raised ``exc`` (re-raised unchanged afterwards); subclasses may judge it no failure."""
        record_exception(self.span, exc)

    def set(self, key: str, value: Any) -> None:
        """Set an attribute, ignoring ``None`` and any telemetry error."""
        if value is None:
            return
        try:
            self.span.set_attribute(key, value)
        except Exception:
            logger.debug("cmbagent_otel: could not set %s", key, exc_info=True)

    def fail(self, description: str, error_type: str | None = None) -> None:
        """Mark the span failed without an exception (e.g. a non-zero exit code)."""
        self._error = error_type or "error"
        if isinstance(self._timing, Frame):
            self._timing.error = self._error
        try:
            self.span.set_status(Status(StatusCode.ERROR, safe_text(description, 1024)))
            self.span.set_attribute(semconv.ERROR_TYPE, self._error)
        except Exception:
            logger.debug("cmbagent_otel: could not set status", exc_info=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self.span
        try:
            if exc is not None and span.is_recording():
                self._exception(exc)
        except Exception:
            logger.debug("cmbagent_otel: could not record exception", exc_info=True)
        finally:
            try:
                span.end()
            except Exception:
                logger.debug("cmbagent_otel: could not end span", exc_info=True)
            finally:
                # also when a Ctrl-C comes out of span.end(): the span processors' on_end run there (an
                # application's SimpleSpanProcessor exports in it), and the ended span stayed current
                token = self._token
                if token is not None:
                    self._token = None
                    try:
                        detach(token)
                    except Exception:  # a token of another context (an async generator's): nothing to undo
                        logger.debug("cmbagent_otel: could not detach context", exc_info=True)
                frame = self._frame
                if frame is not None:
                    self._frame = None
                    try:
                        frame.cursor.leave(frame)  # type: ignore[union-attr]
                    except Exception:
                        logger.debug("cmbagent_otel: could not release frame", exc_info=True)
            timing = self._timing
            if timing is not None and not isinstance(timing, Frame):
                self._timing = None
                try:
                    if claim_duration(span, self):  # not ended for it meanwhile (at exit, at a shutdown)
                        _record_timing(timing, self._error or (error_type(exc) if exc is not None else None))
                except Exception:
                    logger.debug("cmbagent_otel: could not record a duration", exc_info=True)
        # returning None lets the application's exception propagate unchanged


class TracedSpanShell(TracedSpan):
    """A :class:`TracedSpan` for :func:`start`, made by a plain class call: no ``__init__`` to run
    (start() sets every field), ~300 instructions less per span than ``object.__new__(TracedSpan)``."""

    __slots__ = ()
    __init__ = object.__init__  # type: ignore[assignment]
