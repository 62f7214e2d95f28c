"""Per-run state carried in the OpenTelemetry context.

The state lives inside the OTel ``Context`` (itself a contextvar), so it follows the
active span everywhere OTel context goes: asyncio tasks copy it, and
opentelemetry-instrumentation-threading carries it into threads and executor workers.
There is deliberately no process-global "current run".
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context

from . import semconv

_SCOPE_KEY = otel_context.create_key("cmbagent_otel.scope")


@dataclass
class RunState:
    """Mutable, thread-safe bookkeeping shared by every span of one run (one trace)."""

    session_id: str = semconv.DEFAULT_SESSION_ID
    max_redos: int | None = None
    _order: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _names: Counter[str] = field(default_factory=Counter)
    _phase_index: int = 0

    def next_order(self) -> int:
        """Return the next execution order of this run (1, 2, 3, ...)."""
        with self._lock:
            return next(self._order)

    def unique_node_id(self, base: str) -> str:
        """Return ``base`` the first time it is asked for in this run, then ``base_2``, ..."""
        with self._lock:
            self._names[base] += 1
            count = self._names[base]
        return base if count == 1 else f"{base}_{count}"

    def next_phase_index(self) -> int:
        with self._lock:
            self._phase_index += 1
            return self._phase_index

    def next_child_index(self, parent_node: str) -> int:
        """Sibling position of a new sub-node under ``parent_node`` (1-based)."""
        with self._lock:
            key = f"\x00children:{parent_node}"
            self._names[key] += 1
            return self._names[key]


class Scope:
    """What a new span needs to know about where it stands in the run.

    Treated as immutable: :meth:`evolve` returns a modified copy (hand-written rather than
    ``dataclasses.replace``, which costs several microseconds on every span).
    """

    __slots__ = ("agent_depth", "conversation_id", "dag_depth", "dag_node", "dag_node_type", "event_depth",
                 "in_workflow", "phase", "run", "step")

    def __init__(
        self,
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
    ) -> None:
        self.run = run
        self.conversation_id = conversation_id
        self.dag_node = dag_node
        self.dag_node_type = dag_node_type
        self.dag_depth = dag_depth
        self.event_depth = event_depth
        self.agent_depth = agent_depth
        self.phase = phase
        self.step = step
        self.in_workflow = in_workflow

    def evolve(self, **changes: Any) -> Scope:
        new = Scope.__new__(Scope)
        new.run = self.run
        new.conversation_id = self.conversation_id
        new.dag_node = self.dag_node
        new.dag_node_type = self.dag_node_type
        new.dag_depth = self.dag_depth
        new.event_depth = self.event_depth
        new.agent_depth = self.agent_depth
        new.phase = self.phase
        new.step = self.step
        new.in_workflow = self.in_workflow
        for name, value in changes.items():
            setattr(new, name, value)  # AttributeError for an unknown field (slots)
        return new


def current_scope(ctx: otel_context.Context | None = None) -> Scope | None:
    """The scope of the active context, or ``None`` outside any run."""
    value = otel_context.get_value(_SCOPE_KEY, ctx)
    return value if isinstance(value, Scope) else None


def with_scope(scope: Scope, ctx: otel_context.Context | None = None) -> otel_context.Context:
    return otel_context.set_value(_SCOPE_KEY, scope, ctx)


def new_conversation_id() -> str:
    return uuid.uuid4().hex
