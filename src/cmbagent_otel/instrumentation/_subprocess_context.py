"""Trace context handed to the processes a code execution starts (``TRACEPARENT`` / ``TRACESTATE``).

While an ``execute_code`` span runs, the W3C trace context of that span is kept in a
contextvar (so per thread and per asyncio task: two executions at once never see each
other's). ``subprocess.Popen.__init__`` is wrapped while instrumented: a process started
under such a span (AG2's local command-line executor, the legacy ``code_utils`` path, a
custom executor that runs a subprocess) gets ``TRACEPARENT`` (and ``TRACESTATE`` when the
span has one) in the environment it is given, or in a copy of ``os.environ`` when it is given
none. ``os.environ`` itself is never changed, and any other process starts untouched. A
scientist's script that builds its context from these variables (the OpenTelemetry
convention for environment-variable carriers) joins the run's trace as a child of the
``execute_code`` span.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger("cmbagent_otel")

TRACEPARENT = "TRACEPARENT"
TRACESTATE = "TRACESTATE"
_ENV_INDEX = 10  # position of ``env`` in Popen's signature: (args, bufsize, executable, stdin, ..., cwd, env)
_propagator = TraceContextTextMapPropagator()
_carrier: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("cmbagent_otel_code_env",
                                                                                 default=None)


def enter(span: Span) -> contextvars.Token[dict[str, str] | None] | None:
    """Processes started from here on (in this context) get ``span``'s trace context; ``None`` if it has none."""
    if not span.get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    _propagator.inject(headers, context=trace.set_span_in_context(span))
    if "traceparent" not in headers:
        return None
    env = {TRACEPARENT: headers["traceparent"]}
    if headers.get("tracestate"):
        env[TRACESTATE] = headers["tracestate"]
    return _carrier.set(env)


def leave(token: contextvars.Token[dict[str, str] | None] | None) -> None:
    if token is not None:
        _carrier.reset(token)


_STR_KEYS = frozenset({str})


def _with_context(env: Any, carrier: Mapping[str, str]) -> Any:
    out: dict[Any, Any] = dict(os.environ if env is None else env)
    # the key types, collected in C, settle the usual all-str environment; only another type (bytes,
    # a subclass) costs the per-key scan (~500 bytecodes per process started, for ~35 variables)
    if not set(map(type, out)) <= _STR_KEYS and any(isinstance(key, bytes) for key in out):
        out.pop(TRACESTATE.encode(), None)
        out.update({k.encode(): v.encode() for k, v in carrier.items()})
        return out
    out.pop(TRACESTATE, None)  # a state that is not this span's must not ride along
    out.update(carrier)
    return out


def popen_init(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``subprocess.Popen.__init__`` wrapper: adds the carrier to the child's environment, if one is set."""
    carrier = _carrier.get()
    if carrier is None:
        return wrapped(*args, **kwargs)
    try:
        if len(args) > _ENV_INDEX:
            args = (*args[:_ENV_INDEX], _with_context(args[_ENV_INDEX], carrier), *args[_ENV_INDEX + 1:])
        else:
            kwargs = {**kwargs, "env": _with_context(kwargs.get("env"), carrier)}
    except Exception:  # telemetry must never change what the app runs: start it as asked
        logger.debug("cmbagent_otel: could not hand the trace context to a subprocess", exc_info=True)
    return wrapped(*args, **kwargs)
