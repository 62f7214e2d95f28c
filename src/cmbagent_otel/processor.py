"""``DurableBatchSpanProcessor``: a batch span processor that never drops a span silently.

The SDK's ``BatchSpanProcessor`` drops a span when its queue is full (a burst, or an
exporter waiting on a locked database) and only logs a deduplicated warning. This one
batches the same way (a worker thread exports a batch when ``max_export_batch_size`` spans
are queued, and whatever is queued every ``schedule_delay_millis``) but, when the queue is
full, the application thread hands the oldest batch to the exporter's ``spill_overflow``
(the DAG exporter writes it to its durable spill store, replayed later) instead of dropping
it. Exporters without that method get the drop counted in :meth:`stats` and logged.

The application thread's cost in the normal path is one deque append and a length check.
When the queue is idle the worker lets the exporter replay spilled batches in slices of
bounded time (``replay_slice``), so a backlog never holds up fresh spans for long.

Settings, argument > environment > default (the DAG defaults are smaller than the SDK's to
keep what a ``kill -9`` can lose small; see ``docs/reliability.md``):

==========================  ===========================================  ===============
argument                    environment                                  default
==========================  ===========================================  ===============
``schedule_delay_millis``   ``CMBAGENT_OTEL_BSP_SCHEDULE_DELAY``, then   1000
                            ``OTEL_BSP_SCHEDULE_DELAY``
``max_queue_size``          ``CMBAGENT_OTEL_BSP_MAX_QUEUE_SIZE``, then   2048
                            ``OTEL_BSP_MAX_QUEUE_SIZE``
``max_export_batch_size``   ``CMBAGENT_OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,  512
                            then ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``
==========================  ===========================================  ===============
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger("cmbagent_otel")

DEFAULT_SCHEDULE_DELAY_MS = 1000
DEFAULT_MAX_QUEUE_SIZE = 2048
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
SHUTDOWN_TIMEOUT_S = 30.0
SHUTDOWN_REPLAY_MS = 10_000  # at shutdown, time given to replaying this run's spill files
_IDLE_REPLAY_S = 1.0


def _setting(value: float | None, names: Sequence[str], default: float, *, minimum: float) -> float:
    if value is not None:
        return max(minimum, float(value))
    for name in names:
        raw = os.environ.get(name)
        if raw:
            try:
                return max(minimum, float(raw))
            except ValueError:
                logger.warning("cmbagent_otel: ignoring invalid %s=%r", name, raw)
    return default


class DurableBatchSpanProcessor(SpanProcessor):
    """Batches finished spans to ``exporter``; a full queue spills (or counts drops), never silently.

    ``exporter`` may offer ``spill_overflow(spans)`` (full queue), ``replay_due()`` and
    ``replay_slice(seconds)`` (idle-time replay), as :class:`DagSpanExporter` does.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
    ) -> None:
        self.exporter = exporter
        self._delay_s = _setting(schedule_delay_millis, ("CMBAGENT_OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_SCHEDULE_DELAY"),
                                 DEFAULT_SCHEDULE_DELAY_MS, minimum=1) / 1000
        self._max_queue = int(_setting(max_queue_size, ("CMBAGENT_OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE"),
                                       DEFAULT_MAX_QUEUE_SIZE, minimum=1))
        self._batch = min(self._max_queue, int(_setting(
            max_export_batch_size, ("CMBAGENT_OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
            DEFAULT_MAX_EXPORT_BATCH_SIZE, minimum=1)))
        self._overflow: Callable[[Sequence[ReadableSpan]], None] | None = getattr(exporter, "spill_overflow", None)
        if hasattr(exporter, "replay_slice"):
            # this processor replays when its queue is idle; replaying after every export
            # would hold up fresh spans while a burst is still arriving
            exporter.replay_after_export = False  # type: ignore[attr-defined]
        self._stats_lock = threading.Lock()
        self._stats = {"overflowed": 0, "dropped": 0}
        self._next_drop_log = 0.0
        self._shutdown = False
        self._init_worker()
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._init_worker)

            def after_in_child() -> None:
                method = weak()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=after_in_child)

    def _init_worker(self) -> None:
        # also run in a forked child: the parent's queued spans are the parent's to export
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._overflow_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="cmbagent-otel-batch", daemon=True)
        self._worker.start()

    # --- application thread --------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished sampled span; when the queue is full, spill the oldest batch."""
        if not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if self._shutdown:
            self._count_dropped(1, "the processor is shut down")
            return
        if len(queue) < self._max_queue:
            queue.append(span)
            if len(queue) >= self._batch and not self._wake.is_set():
                self._wake.set()
            return
        self._spill_oldest(span)

    def _spill_oldest(self, span: ReadableSpan) -> None:
        with self._overflow_lock:
            chunk: list[ReadableSpan] = []
            pop = self._queue.popleft
            try:
                while len(chunk) < self._batch:
                    chunk.append(pop())
            except IndexError:
                pass
        self._queue.append(span)
        if chunk:
            self._take_overflow(chunk)

    def _take_overflow(self, spans: Sequence[ReadableSpan]) -> None:
        with self._stats_lock:
            self._stats["overflowed"] += len(spans)
        if self._overflow is not None:
            token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
            try:
                self._overflow(spans)
                return
            except Exception:
                logger.debug("cmbagent_otel: overflow handler failed", exc_info=True)
            finally:
                detach(token)
        self._count_dropped(len(spans), f"the span queue is full ({self._max_queue})")

    def _count_dropped(self, count: int, why: str) -> None:
        with self._stats_lock:
            self._stats["dropped"] += count
            total = self._stats["dropped"]
            now = time.monotonic()
            log = now >= self._next_drop_log
            if log:
                self._next_drop_log = now + 30.0
        if log:
            logger.warning("cmbagent_otel: dropped %d spans for %s: %s (%d so far)",
                           count, type(self.exporter).__name__, why, total)

    # --- worker ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self._delay_s)
            self._wake.clear()
            if self._shutdown:
                self._drain(everything=True)
                return
            self._drain(everything=not woken)
            if not self._queue and not self._wake.is_set():
                self._idle_replay()

    def _drain(self, *, everything: bool) -> None:
        with self._export_lock:
            while self._queue and (everything or len(self._queue) >= self._batch):
                self._export_one()

    def _export_one(self) -> None:
        batch: list[ReadableSpan] = []
        pop = self._queue.popleft
        try:
            while len(batch) < self._batch:
                batch.append(pop())
        except IndexError:
            pass
        if not batch:
            return
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self.exporter.export(batch)
        except Exception:
            logger.exception("cmbagent_otel: span exporter %s raised", type(self.exporter).__name__)
        finally:
            detach(token)

    def _idle_replay(self) -> None:
        due = getattr(self.exporter, "replay_due", None)
        if due is None:
            return
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            if due():
                self.exporter.replay_slice(min(_IDLE_REPLAY_S, self._delay_s))  # type: ignore[attr-defined]
        except Exception:
            logger.debug("cmbagent_otel: idle replay failed", exc_info=True)
        finally:
            detach(token)

    # --- SpanProcessor ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``queued`` now, ``overflowed`` (taken out of a full queue: spilled, or else dropped)
        and ``dropped`` (full queue and no spill store, or ended after shutdown; logged)."""
        with self._stats_lock:
            return {"queued": len(self._queue), **self._stats}

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued, then let the exporter flush (the DAG exporter replays its spill)."""
        if self._shutdown:
            return False
        deadline = time.monotonic() + timeout_millis / 1000
        with self._export_lock:
            while self._queue:
                if time.monotonic() >= deadline:
                    return False
                self._export_one()
        flush = getattr(self.exporter, "force_flush", None)
        if flush is None:
            return True
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        try:
            return flush(left_ms) is not False  # the SDK's SpanExporter.force_flush returns None
        except Exception:
            logger.debug("cmbagent_otel: exporter force_flush failed", exc_info=True)
            return False

    def shutdown(self) -> None:
        """Export what is queued, stop the worker, let the exporter replay its spill files for
        up to 10 s, then shut it down (idempotent). What is left stays on disk for the next process."""
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(SHUTDOWN_TIMEOUT_S)
        if self._queue:
            # the worker is stuck in an export: keep the rest the overflow way (spilled or counted)
            rest: list[ReadableSpan] = []
            try:
                while True:
                    rest.append(self._queue.popleft())
            except IndexError:
                pass
            if rest:
                self._take_overflow(rest)
        flush = getattr(self.exporter, "force_flush", None)
        if flush is not None and hasattr(self.exporter, "replay_due"):
            try:
                flush(SHUTDOWN_REPLAY_MS)  # write what was spilled while the database is here
            except Exception:
                logger.debug("cmbagent_otel: exporter flush at shutdown failed", exc_info=True)
        try:
            self.exporter.shutdown()
        except Exception:
            logger.debug("cmbagent_otel: exporter shutdown failed", exc_info=True)
