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
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Status, StatusCode

from . import environment_variables
from . import semconv as sc
from ._forksafe import reset_in_child
from ._termination import signals_deferred

logger = logging.getLogger("cmbagent_otel")

DEFAULT_LIVE_DELAY_MS = 500  # a started DAG node is exported at most this long after its span started
SHUTDOWN_TIMEOUT_S = 30.0
SHUTDOWN_REPLAY_MS = 10_000  # at shutdown, time given to replaying this run's spill files
_IDLE_REPLAY_S = 1.0


def _setting(value: float | None, name: str, *, minimum: float, maximum: float = math.inf) -> float:
    if value is not None:
        return environment_variables.clamped(value, minimum, maximum)
    return float(environment_variables.get(name))


class _Started:
    """A workflow or DAG-node span that has started: queued by ``on_start`` (one append on the
    application's thread), turned into a snapshot by the worker when it exports."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span


class StartedSpan(ReadableSpan):
    """A started record: the snapshot of a workflow or DAG-node span that has not ended yet
    (no end time, status unset), sent to exporters that take them (``accepts_started_spans``).

    Exporters tell started records from spans by this type, never by a missing end time: a
    span ingested over OTLP may come without one and is still a span.
    """


def is_started(span: ReadableSpan) -> bool:
    """Whether ``span`` is a started record (:class:`StartedSpan`), not a span."""
    return isinstance(span, StartedSpan)


def as_started(span: ReadableSpan, attributes: Any = None) -> StartedSpan:
    """``span`` as a started record (no end time, status unset, no events), e.g. one kept in a
    file; ``attributes`` replace the span's own when given."""
    return StartedSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=span.attributes if attributes is None else attributes, kind=span.kind,
        instrumentation_scope=span.instrumentation_scope, status=Status(StatusCode.UNSET),
        start_time=span.start_time, end_time=None,
    )


def started_snapshot(span: Span) -> ReadableSpan | None:
    """A :class:`StartedSpan` of a span that has not ended (no end time, status unset), or None
    once it has ended (its finished self is queued then)."""
    if span.end_time is not None:
        return None
    attributes = span.attributes
    copy = getattr(attributes, "copy", None)
    return as_started(span, copy() if copy is not None else dict(attributes or {}))


def _snapshots(items: list[Any]) -> list[ReadableSpan]:
    """The batch as the exporter gets it: started records as snapshots (dropped once ended)."""
    if not any(type(item) is _Started for item in items):
        return items
    out = []
    for item in items:
        if type(item) is _Started:
            try:
                snapshot = started_snapshot(item.span)
            except Exception:  # a live hint only: the finished span still comes
                logger.debug("cmbagent_otel: no started record of %r", item.span, exc_info=True)
                continue
            if snapshot is not None:
                out.append(snapshot)
        else:
            out.append(item)
    return out


def _live_setting(value: bool | None) -> bool:
    return bool(value) if value is not None else bool(environment_variables.get(environment_variables.LIVE_DAG))


# The span this thread's last started record was queued for (held weakly): a Ctrl-C raised inside the SDK's
# start_span after on_start, or as it returned, lost the span on its way to its caller, which never ended it,
# and the row of its started record stayed `running` for good (see _spans.start)
_started_here = threading.local()


def take_started_here() -> Span | None:
    """The span the calling thread's last started record was queued for, if it is still alive (and forget it)."""
    ref = _started_here.__dict__.pop("span", None)
    return ref() if ref is not None else None


class DurableBatchSpanProcessor(SpanProcessor):
    """Batches finished spans to ``exporter``; a full queue spills (or counts drops), never silently.

    ``exporter`` may offer ``spill_overflow(spans)`` (full queue), ``replay_due()`` and
    ``replay_slice(seconds)`` (idle-time replay), and ``warm_up()`` (called once here, to
    prepare in the background what the first export would otherwise pay for), as
    :class:`DagSpanExporter` does.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        live: bool | None = None,
    ) -> None:
        self.exporter = exporter
        self._delay_s = _setting(schedule_delay_millis, environment_variables.BSP_SCHEDULE_DELAY, minimum=1,
                                 maximum=environment_variables.MAX_WAIT_S * 1000) / 1000
        self._max_queue = int(_setting(max_queue_size, environment_variables.BSP_MAX_QUEUE_SIZE, minimum=1))
        self._batch = min(self._max_queue, int(_setting(
            max_export_batch_size, environment_variables.BSP_MAX_EXPORT_BATCH_SIZE, minimum=1)))
        self._overflow: Callable[..., None] | None = getattr(exporter, "spill_overflow", None)
        # the live DAG: started records of workflow and DAG-node spans, for exporters that want them
        self._live = _live_setting(live) and bool(getattr(exporter, "accepts_started_spans", False))
        self._live_delay_s = DEFAULT_LIVE_DELAY_MS / 1000
        self._live_due: float | None = None
        if hasattr(exporter, "replay_slice"):
            # this processor replays when its queue is idle; replaying after every export
            # would hold up fresh spans while a burst is still arriving
            exporter.replay_after_export = False  # type: ignore[attr-defined]
        self._stats_lock = threading.Lock()
        reset_in_child(self, "_stats_lock")  # the other locks are made again by _init_worker
        self._stats = {"overflowed": 0, "dropped": 0}
        warm_up = getattr(exporter, "warm_up", None)
        if warm_up is not None:
            # the DAG exporter checks (or migrates) its schema in the background now, so the
            # first export during the run does not
            try:
                warm_up()
            except Exception:
                logger.debug("cmbagent_otel: exporter warm-up failed", exc_info=True)
        self._next_drop_log = 0.0
        self._shutdown = False
        self._late = 0  # spans ended after shutdown, sent to the overflow path
        self._init_worker()
        _running.add(self)

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
        """Queue a started record of a workflow or DAG-node span (the live DAG), so its row
        shows ``running`` while it runs; the export follows within ~0.5 s. Other spans: nothing."""
        if not self._live or self._shutdown or not span.context.trace_flags.sampled:
            return
        try:
            attrs = span.attributes
            if sc.DAG_NODE_TYPE not in attrs and attrs.get(sc.SPAN_KIND) != sc.KIND_WORKFLOW:
                return
        except Exception:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            return  # a full queue: the finished span still comes, the live record is not worth a spill
        _started_here.span = weakref.ref(span)  # see take_started_here
        queue.append(_Started(span))  # type: ignore[arg-type]
        if self._live_due is None:
            self._live_due = time.monotonic() + self._live_delay_s
            self._wake.set()  # the worker plans its next export by the due time

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished sampled span; when the queue is full, spill the oldest batch."""
        if not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if self._shutdown:
            # no worker any more (an application atexit hook registered before instrument() runs
            # after the provider's): the full-queue path keeps it (the DAG exporter spills it), a
            # queue's worth at most (a daemon thread still running at exit is not given the disk)
            if self._late < self._max_queue:
                self._late += 1
                self._take_overflow([span])
            else:
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
        # started records are live hints, not spans: never spilled (the finished span is)
        spans = [s for s in spans if type(s) is not _Started]
        if not spans:
            return
        with self._stats_lock:
            self._stats["overflowed"] += len(spans)
        if self._overflow is not None:
            token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
            try:
                if self._shutdown:
                    self._overflow(spans, late=True)
                else:
                    self._overflow(spans)
                return
            except Exception:
                logger.debug("cmbagent_otel: overflow handler failed", exc_info=True)
            finally:
                detach(token)
        self._count_dropped(len(spans), "the processor is shut down" if self._shutdown
                            else f"the span queue is full ({self._max_queue})")

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
            timeout = self._delay_s
            due = self._live_due
            if due is not None:
                timeout = max(0.0, min(timeout, due - time.monotonic()))
            woken = self._wake.wait(timeout)
            self._wake.clear()
            if self._shutdown:
                self._drain(everything=True)
                return
            due = self._live_due
            live = due is not None and time.monotonic() >= due
            if live:
                self._live_due = None
            self._drain(everything=live or not woken)
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
        try:
            batch = _snapshots(batch)
        except Exception:  # never lose the popped spans to a bug of ours: they take the overflow path
            logger.exception("cmbagent_otel: could not prepare a batch for %s", type(self.exporter).__name__)
            self._take_overflow(batch)
            return
        if not batch:
            return
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self.exporter.export(batch)
        except Exception:
            logger.exception("cmbagent_otel: span exporter %s raised", type(self.exporter).__name__)
            self._count_dropped(sum(1 for s in batch if not is_started(s)), "the exporter raised")
        except BaseException:
            # Ctrl-C (or the app's own signal handler raising) in a thread that exports (a force_flush in
            # the main thread): the batch was popped from the queue and vanished; keep it the overflow
            # way (spilled: written later, at most again, which changes nothing), then let it propagate
            self._take_overflow(batch)
            raise
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
        """``queued`` now, ``overflowed`` (taken out of a full queue, or ended after shutdown:
        spilled, or else dropped) and ``dropped`` (those when the exporter has no spill store; logged)."""
        with self._stats_lock:
            return {"queued": len(self._queue), **self._stats}

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued, then let the exporter flush (the DAG exporter replays its spill)."""
        if self._shutdown:
            return False
        deadline = time.monotonic() + timeout_millis / 1000
        with signals_deferred(), self._export_lock:
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
        _running.discard(self)
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


# The processors whose worker runs (not shut down): a forked child starts its own worker for each
# (the parent's queued spans are the parent's). One fork hook for all of them: os.register_at_fork
# cannot unregister, and a hook per processor kept one closure per processor ever made (one per
# instrument() call) and ran them all at every fork.
_running: weakref.WeakSet[DurableBatchSpanProcessor] = weakref.WeakSet()


def _restart_workers_in_child() -> None:
    for processor in list(_running):
        try:
            processor._init_worker()
        except Exception:
            logger.debug("cmbagent_otel: batch worker not restarted in the forked child", exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_workers_in_child)
