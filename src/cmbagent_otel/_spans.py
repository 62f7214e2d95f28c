"""The one place where cmbagent-otel opens and closes spans.

Both the workflow API and the AG2 wrappers go through :class:`TracedSpan`, so every span
gets the same run bookkeeping (execution order, session, DAG anchors, conversation id)
and the same failure handling: telemetry errors are swallowed and logged, application
exceptions are recorded and then re-raised unchanged by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from . import semconv
from ._context import Frame, RunState, Scope, new_conversation_id, raw_scope, with_scope
from .redaction import redact, truncate
from .version import __version__

logger = logging.getLogger("cmbagent_otel")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


def make_tracer(scope_name: str, provider: trace.TracerProvider | None = None) -> Tracer:
    """The tracer of one instrumentation scope (``semconv.SCOPE_*``) from ``provider`` (``None``: the global one).

    A provider that fails to give one yields a no-op tracer: telemetry off, never an error in the app.
    """
    try:
        return trace.get_tracer(scope_name, __version__, tracer_provider=provider, schema_url=SCHEMA_URL)
    except Exception:
        logger.warning("cmbagent_otel: the tracer provider failed to create a tracer; %s spans are off",
                       scope_name, exc_info=True)
        return trace.NoOpTracer()


class WorkflowTracers:
    """Where the workflow API (``workflow``/``phase``/``step``/``redo``) starts its spans.

    The workflow API is called by the application, not through a patched method, so it has
    no instrumentor of its own: each active instrumentor that was given a provider (the AG2
    and cmbagent instrumentors, through ``instrument(tracer_provider=...)``) binds one here
    and releases it when uninstrumented; the latest binding still held wins, and with none
    the global provider is used. Nothing outlives the instrumentors that bound it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bindings: list[tuple[object, Tracer]] = []
        self._global: Tracer | None = None

    def bind(self, provider: trace.TracerProvider) -> object:
        """Route workflow spans to ``provider`` until :meth:`release` of the returned token."""
        token = object()
        tracer = make_tracer(semconv.SCOPE_WORKFLOW, provider)
        with self._lock:
            self._bindings = [*self._bindings, (token, tracer)]
        return token

    def release(self, token: object) -> None:
        with self._lock:
            self._bindings = [b for b in self._bindings if b[0] is not token]

    def current(self) -> Tracer:
        bindings = self._bindings  # replaced, never mutated: no lock needed to read
        if bindings:
            return bindings[-1][1]
        tracer = self._global
        if tracer is None:  # a proxy: follows the global provider once the application sets one
            tracer = self._global = make_tracer(semconv.SCOPE_WORKFLOW)
        return tracer

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
    nor with a sibling. ``numbered``: the short id is ``<base_id>_<k>``.
    """

    __slots__ = ("base_id", "child", "node_type", "numbered", "order_index", "unique")

    def __init__(self, base_id: str, node_type: str, order_index: int | None = None, unique: bool = True,
                 child: bool = False, numbered: bool = False):
        self.base_id = base_id
        self.node_type = node_type
        self.order_index = order_index
        self.unique = unique
        self.child = child
        self.numbered = numbered


def _clamp(value: int) -> int:
    return value if value <= _INT32 else _INT32


def compose(scope: Scope | None, kind: str, attributes: Mapping[str, Any] | None, node: NodeSpec | None,
            new_conversation: bool, run: RunState | None,
            scope_changes: Mapping[str, Any] | None) -> tuple[dict[str, Any], Scope]:
    """Attributes of a new span standing at ``scope``, and the scope of its children."""
    if run is not None:
        scope = Scope(run=run, in_workflow=True)
    elif scope is None:
        scope = Scope(run=RunState())
    attrs: dict[str, Any] = {
        semconv.SPAN_KIND: kind,
        semconv.EXECUTION_ORDER: scope.run.next_order(),
        semconv.SESSION_ID: scope.run.session_id,
        semconv.GENERIC_SESSION_ID: scope.run.session_id,
    }
    conversation_id = scope.conversation_id
    if new_conversation:
        conversation_id = new_conversation_id()
    if conversation_id is not None:
        attrs[semconv.GEN_AI_CONVERSATION_ID] = conversation_id
    if node is not None:
        order = node.order_index
        base_id = node.base_id
        if node.child:
            k = scope.run.next_child_index(scope.dag_node or "")
            parent_order = scope.dag_order if scope.dag_node is not None else 1
            order = _clamp(parent_order * CHILD_ORDER_BASE + k)
            if node.numbered:
                base_id = f"{base_id}_{k}"
        node_id = scope.run.unique_node_id(base_id) if node.unique else base_id
        depth = scope.dag_depth + 1
        attrs[semconv.DAG_NODE] = node_id
        attrs[semconv.DAG_NODE_TYPE] = node.node_type
        attrs[semconv.DAG_DEPTH] = depth
        if scope.dag_node is not None:
            attrs[semconv.DAG_PARENT_NODE] = scope.dag_node
        if order is not None:
            attrs[semconv.DAG_ORDER_INDEX] = order
        new_scope = scope.evolve(
            dag_node=node_id, dag_node_type=node.node_type, dag_depth=depth, event_depth=0, agent_depth=0,
            conversation_id=conversation_id, dag_order=order or 0,
        )
    else:
        if scope.dag_node is not None:
            attrs[semconv.DAG_NODE] = scope.dag_node
        if run is None:  # the workflow span is the run itself, not an event in it
            attrs[semconv.EVENT_DEPTH] = scope.event_depth
            new_scope = scope.evolve(event_depth=scope.event_depth + 1, conversation_id=conversation_id)
        else:
            new_scope = scope.evolve(conversation_id=conversation_id)
    if scope_changes:
        new_scope = new_scope.evolve(**scope_changes)
    if attributes:
        attrs.update(attributes)
    return attrs, new_scope


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
    return Frame(span, scope, kind_of_frame, owner, finish=end_frame)


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


def detach_anchor(token: object, anchor: Scope, exc: BaseException | None = None) -> None:
    """Close every frame still open on ``anchor`` (recording ``exc``) and detach ``token``; never raises."""
    try:
        cursor = anchor.cursor
        if cursor is not None:
            frames = list(cursor.frames)
            if exc is not None:
                for frame in frames:
                    with contextlib.suppress(Exception):
                        record_exception(frame.span, exc)
            cursor.close_all(frames)
    except Exception:
        logger.debug("cmbagent_otel: could not close anchored frames", exc_info=True)
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:
        logger.debug("cmbagent_otel: could not detach context", exc_info=True)


def end_frame(frame: Frame, exc: BaseException | None = None) -> None:
    """End a frame's span (recording ``exc``); never raises."""
    try:
        if exc is not None and frame.span.is_recording():
            record_exception(frame.span, exc)
    except Exception:
        logger.debug("cmbagent_otel: could not record exception", exc_info=True)
    try:
        frame.span.end()
    except Exception:
        logger.debug("cmbagent_otel: could not end span", exc_info=True)


def record_exception(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` (secrets redacted) and mark the span failed."""
    message = redact(str(exc)) or ""
    stack = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))) or ""
    span.record_exception(
        exc,
        attributes={"exception.message": truncate(message) or "", "exception.stacktrace": truncate(stack, 16384) or ""},
    )
    type_name = type(exc).__qualname__
    span.set_status(Status(StatusCode.ERROR, truncate(f"{type_name}: {message}", 1024)))
    span.set_attribute(semconv.ERROR_TYPE, type_name)


class TracedSpan:
    """Context manager that opens a span with cmbagent-otel's bookkeeping.

    ``kind`` is the ``cmbagent.span.kind`` value. ``node`` makes the span a DAG node;
    otherwise it is an execution event. ``new_conversation`` starts a new
    ``gen_ai.conversation.id`` for the span and its descendants. ``run`` is used when the
    span starts a new run (workflow spans); other spans join the run of the active
    context, or start an implicit one when there is none. ``tracer`` is the instrumentor's
    (built from the provider it was given); ``None``: the workflow API's
    (:data:`workflow_tracers`). ``span_kind``: the OTel span kind (model calls are CLIENT).
    """

    __slots__ = ("_attrs", "_frame", "_kind", "_name", "_new_conversation", "_node", "_run",
                 "_scope_changes", "_span_kind", "_token", "_tracer", "scope", "span")

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
        self._token: object | None = None
        self._frame: Frame | None = None
        self.span: Span = trace.INVALID_SPAN
        self.scope: Scope | None = None

    def __enter__(self) -> TracedSpan:
        try:
            self._start()
        except Exception:  # telemetry must never break the app
            logger.debug("cmbagent_otel: could not start span %s", self._name, exc_info=True)
        return self

    def _start(self) -> None:
        scope = raw_scope() if self._run is None else None
        parent_ctx = None
        if scope is not None:
            cursor = scope.cursor
            if cursor is not None:
                # work started directly in an anchor scope belongs to its innermost open frame
                frame = cursor.enter()
                if frame is not None:
                    self._frame = frame
                    scope = frame.scope
                    parent_ctx = trace.set_span_in_context(frame.span)
        attrs, new_scope = compose(scope, self._kind, self._attrs, self._node, self._new_conversation, self._run,
                                   self._scope_changes)
        tracer = self._tracer or workflow_tracers.current()
        self.span = tracer.start_span(self._name, context=parent_ctx, kind=self._span_kind, attributes=attrs)
        self.scope = new_scope
        ctx = with_scope(new_scope, trace.set_span_in_context(self.span, parent_ctx))
        self._token = otel_context.attach(ctx)

    def start_detached(self, parent_scope: Scope | None, parent_span: Span | None, frame_kind: str,
                       owner: Any = None) -> Frame:
        """Start this span as a :class:`Frame` under ``parent_span`` instead of entering it (nothing attached)."""
        frame = open_frame(self._name, self._kind, self._attrs, self._node, parent_scope, parent_span, frame_kind,
                           owner, self._scope_changes, self._run, self._tracer)
        self.span, self.scope = frame.span, frame.scope
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

    def set_many(self, attributes: dict[str, Any]) -> None:
        """Set several attributes in one call (cheaper than one ``set`` each)."""
        if not attributes:
            return
        try:
            self.span.set_attributes(attributes)
        except Exception:
            logger.debug("cmbagent_otel: could not set attributes", exc_info=True)

    def fail(self, description: str, error_type: str | None = None) -> None:
        """Mark the span failed without an exception (e.g. a non-zero exit code)."""
        try:
            self.span.set_status(Status(StatusCode.ERROR, truncate(redact(description), 1024)))
            self.span.set_attribute(semconv.ERROR_TYPE, error_type or "error")
        except Exception:
            logger.debug("cmbagent_otel: could not set status", exc_info=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and self.span.is_recording():
                self._exception(exc)
        except Exception:
            logger.debug("cmbagent_otel: could not record exception", exc_info=True)
        finally:
            try:
                self.span.end()
            except Exception:
                logger.debug("cmbagent_otel: could not end span", exc_info=True)
            if self._token is not None:
                try:
                    otel_context.detach(self._token)  # type: ignore[arg-type]
                except Exception:
                    logger.debug("cmbagent_otel: could not detach context", exc_info=True)
                self._token = None
            frame = self._frame
            if frame is not None:
                self._frame = None
                try:
                    frame.cursor.leave(frame)  # type: ignore[union-attr]
                except Exception:
                    logger.debug("cmbagent_otel: could not release frame", exc_info=True)
        # returning None lets the application's exception propagate unchanged
