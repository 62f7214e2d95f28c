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
from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class Scope:
    """What a new span needs to know about where it stands in the run."""

    run: RunState
    conversation_id: str | None = None
    dag_node: str | None = None
    dag_node_type: str | None = None
    dag_depth: int = -1
    event_depth: int = 0
    agent_depth: int = 0
    phase: str | None = None
    step: int | None = None
    in_workflow: bool = False

    def evolve(self, **changes: object) -> Scope:
        return replace(self, **changes)  # type: ignore[arg-type]


def current_scope(ctx: otel_context.Context | None = None) -> Scope | None:
    """The scope of the active context, or ``None`` outside any run."""
    value = otel_context.get_value(_SCOPE_KEY, ctx)
    return value if isinstance(value, Scope) else None


def with_scope(scope: Scope, ctx: otel_context.Context | None = None) -> otel_context.Context:
    return otel_context.set_value(_SCOPE_KEY, scope, ctx)


def new_conversation_id() -> str:
    return uuid.uuid4().hex
