"""The one place where cmbagent-otel opens and closes spans.

Both the workflow API and the AG2 wrappers go through :class:`TracedSpan`, so every span
gets the same run bookkeeping (execution order, session, DAG anchors, conversation id)
and the same failure handling: telemetry errors are swallowed and logged, application
exceptions are recorded and then re-raised unchanged by the caller.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from . import semconv
from ._context import RunState, Scope, current_scope, new_conversation_id, with_scope
from .redaction import redact, truncate
from .version import __version__

logger = logging.getLogger("cmbagent_otel")

_tracer_provider: trace.TracerProvider | None = None
_tracer: Tracer | None = None


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Route cmbagent-otel's spans to ``provider`` (``None``: the global provider)."""
    global _tracer_provider, _tracer
    _tracer_provider = provider
    _tracer = None


def get_tracer() -> Tracer:
    global _tracer
    tracer = _tracer
    if tracer is None:
        tracer = trace.get_tracer(
            semconv.INSTRUMENTATION_NAME,
            __version__,
            tracer_provider=_tracer_provider,
            schema_url="https://opentelemetry.io/schemas/1.37.0",
        )
        _tracer = tracer
    return tracer


class NodeSpec:
    """Describes a span that is itself a node of the run's DAG."""

    __slots__ = ("base_id", "node_type", "order_index", "unique")

    def __init__(self, base_id: str, node_type: str, order_index: int | None = None, unique: bool = True):
        self.base_id = base_id
        self.node_type = node_type
        self.order_index = order_index
        self.unique = unique


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
    context, or start an implicit one when there is none.
    """

    __slots__ = ("_attrs", "_kind", "_name", "_new_conversation", "_node", "_run", "_scope_changes",
                 "_token", "scope", "span")

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
    ) -> None:
        self._name = name
        self._kind = kind
        self._attrs = attributes
        self._node = node
        self._new_conversation = new_conversation
        self._run = run
        self._scope_changes = scope_changes
        self._token: object | None = None
        self.span: Span = trace.INVALID_SPAN
        self.scope: Scope | None = None

    def __enter__(self) -> TracedSpan:
        try:
            self._start()
        except Exception:  # telemetry must never break the app
            logger.debug("cmbagent_otel: could not start span %s", self._name, exc_info=True)
        return self

    def _start(self) -> None:
        parent = current_scope()
        if self._run is not None:
            scope = Scope(run=self._run, in_workflow=True)
        elif parent is None:
            scope = Scope(run=RunState())
        else:
            scope = parent
        attrs: dict[str, Any] = {
            semconv.SPAN_KIND: self._kind,
            semconv.EXECUTION_ORDER: scope.run.next_order(),
            semconv.SESSION_ID: scope.run.session_id,
        }
        conversation_id = scope.conversation_id
        if self._new_conversation:
            conversation_id = new_conversation_id()
        if conversation_id is not None:
            attrs[semconv.GEN_AI_CONVERSATION_ID] = conversation_id
        node = self._node
        if node is not None:
            node_id = scope.run.unique_node_id(node.base_id) if node.unique else node.base_id
            depth = scope.dag_depth + 1
            attrs[semconv.DAG_NODE] = node_id
            attrs[semconv.DAG_NODE_TYPE] = node.node_type
            attrs[semconv.DAG_DEPTH] = depth
            if scope.dag_node is not None:
                attrs[semconv.DAG_PARENT_NODE] = scope.dag_node
            if node.order_index is not None:
                attrs[semconv.DAG_ORDER_INDEX] = node.order_index
            new_scope = scope.evolve(
                dag_node=node_id, dag_node_type=node.node_type, dag_depth=depth, event_depth=0, agent_depth=0,
                conversation_id=conversation_id,
            )
        else:
            if scope.dag_node is not None:
                attrs[semconv.DAG_NODE] = scope.dag_node
            if self._run is None:  # the workflow span is the run itself, not an event in it
                attrs[semconv.EVENT_DEPTH] = scope.event_depth
                new_scope = scope.evolve(event_depth=scope.event_depth + 1, conversation_id=conversation_id)
            else:
                new_scope = scope.evolve(conversation_id=conversation_id)
        if self._scope_changes:
            new_scope = new_scope.evolve(**self._scope_changes)
        if self._attrs:
            attrs.update(self._attrs)
        self.span = get_tracer().start_span(self._name, kind=SpanKind.INTERNAL, attributes=attrs)
        self.scope = new_scope
        ctx = with_scope(new_scope, trace.set_span_in_context(self.span))
        self._token = otel_context.attach(ctx)

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
                record_exception(self.span, exc)
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
        # returning None lets the application's exception propagate unchanged
