"""Export what was recorded when the process is told to stop (SIGTERM, SIGHUP).

Python's default for SIGTERM and SIGHUP ends the process at once, without ``atexit``: the
spans queued for the batch processors (up to a second of them, with the DAG processor's
defaults) and the run and DAG-node rows of the live DAG were lost, with nothing saying so,
whenever a container, a job scheduler, ``timeout`` or a closed terminal stopped the run.
``instrument()`` now puts a handler in place of the default one (never in place of the
application's own, and only from the main thread); it flushes the tracer provider, within
the export deadline and from another thread (the signal may arrive while the main thread
holds a lock the flush needs), then restores the default and sends the same signal again,
so the process still ends by that signal, with no application code run in between.

Before the flush, the run and DAG-node spans of ours still open (the run, its phase, its
current step, a sub-agent turn) are ended with ERROR status, ``stopped by SIGTERM`` and
``error.type=stopped_by_signal``: they would never end otherwise, and their rows would show
the run ``executing`` and its nodes ``running`` for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from opentelemetry.trace import Status, StatusCode

from . import environment_variables as env
from . import semconv

logger = logging.getLogger("cmbagent_otel")

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_target: dict[str, Any] = {"provider": None}

STOPPED_BY_SIGNAL = "stopped_by_signal"  # error.type of a span ended because a signal stopped the process


def install(provider: Any) -> None:
    """End our open run and node spans failed and flush ``provider`` when SIGTERM/SIGHUP ends the process
    (where their handler is the default)."""
    _target["provider"] = provider
    if not env.get(env.FLUSH_ON_SIGNAL) or threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _on_signal)


def uninstall() -> None:
    """Put the default back where our handler still is (the application may have replaced it)."""
    _target["provider"] = None
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, signal.SIG_DFL)


def _on_signal(signum: int, frame: Any) -> None:
    with contextlib.suppress(Exception):
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    try:
        _flush(_signal_name(signum))
    finally:
        os.kill(os.getpid(), signum)  # ends the process as the default would have


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except Exception:
        return f"signal {signum}"


def end_open_spans(reason: str) -> int:
    """End the run and DAG-node spans of ours still open, failed with ``reason``, innermost first; never
    raises. Returns how many it ended."""
    from ._spans import open_node_spans

    try:
        spans = [span for span in open_node_spans() if span.is_recording()]
    except Exception:
        logger.debug("cmbagent_otel: could not read the open spans", exc_info=True)
        return 0
    with contextlib.suppress(Exception):
        spans.sort(key=lambda span: getattr(span, "start_time", None) or 0, reverse=True)  # children first
    ended = 0
    for span in spans:
        try:
            if span.status.status_code is StatusCode.UNSET:  # a failure recorded before keeps its reason
                span.set_status(Status(StatusCode.ERROR, reason))
                span.set_attribute(semconv.ERROR_TYPE, STOPPED_BY_SIGNAL)
            span.end()
            ended += 1
        except Exception:
            logger.debug("cmbagent_otel: could not end an open span", exc_info=True)
    return ended


def _flush(signal_name: str = "a signal") -> None:
    provider = _target["provider"]
    flush = getattr(provider, "force_flush", None)
    timeout = float(env.get(env.EXPORT_TIMEOUT))

    def end() -> None:
        end_open_spans(f"stopped by {signal_name}")

    def run() -> None:
        with contextlib.suppress(Exception):
            flush(int(timeout * 1000))

    # neither in the handler itself: the main thread may have been stopped holding a lock they wait
    # for (a span's, a processor's, an exporter's); then each wait ends at its deadline. The spans are
    # ended in a thread of their own, so one whose lock is held never keeps the rest from the flush.
    _in_thread(end, "cmbagent-otel-signal-end", min(1.0, timeout))
    if flush is not None:
        _in_thread(run, "cmbagent-otel-signal-flush", timeout + 1.0)


def _in_thread(target: Any, name: str, wait: float) -> None:
    worker = threading.Thread(target=target, name=name, daemon=True)
    try:
        worker.start()
        worker.join(wait)
    except Exception:
        logger.debug("cmbagent_otel: %s failed", name, exc_info=True)
