"""``DagSpanExporter``: an OpenTelemetry ``SpanExporter`` writing cmbagent's tracking tables.

Use it with :func:`span_processor` (what ``instrument()`` and the ``cmbagent_dag`` entry
point get): a batch processor that never drops a span when its queue is full, but spills
it (see :class:`cmbagent_otel.processor.DurableBatchSpanProcessor`). The SDK's
``BatchSpanProcessor`` works too, but drops spans when its queue is full, before this
exporter sees them.

``export()`` never raises. Retryable database faults (down, locked, full, file deleted,
schema missing; classified by driver error codes in :mod:`cmbagent_otel.dag.errors`) are
retried with exponential backoff until the export deadline, and every wait inside an
attempt (SQLite's busy timeout, PostgreSQL's connect, lock and statement timeouts) is cut
to the time left. Then the batch is written to a durable spill file recorded for this
database (see :mod:`cmbagent_otel.spill`) and replayed, in slices of bounded time, after
later successful exports, by the next process that exports to the same database, or by
``cmbagent-otel replay``. While the database stays unavailable, later batches get one short
attempt and are spilled at once, so the batch processor's queue keeps draining.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cmbagent_otel import environment_variables
from cmbagent_otel._forksafe import reset_in_child
from cmbagent_otel._outage import OutageTally
from cmbagent_otel.dag.database import (
    BadDatabaseURL,
    pinned_url,
    prepare_in_background,
    redacted,
    resolve_url,
    target_of,
)
from cmbagent_otel.dag.halving import write_in_halves
from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable, ForkedInsideSqlite
from cmbagent_otel.processor import StartedSpan, is_started
from cmbagent_otel.spill import SPILL_DIR_ENV, SpillFailed, SpillStore, SpillUnreadable

logger = logging.getLogger("cmbagent_otel.dag")

TIMEOUT_ENV = "CMBAGENT_OTEL_EXPORT_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
DEGRADED_S = 5.0  # after a spill, how long later batches get only one short attempt
DEGRADED_ATTEMPT_S = 0.1  # that attempt's deadline
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
REPLAY_SLICE_S = 1.0  # most time one export (or one idle turn of the processor) spends replaying
LOG_EVERY_S = 30.0  # overflow and drop warnings: the first at once, then at most this often

__all__ = ["DagSpanExporter", "default_spill_dir", "span_processor"]


def default_spill_dir() -> str:
    """``CMBAGENT_OTEL_SPILL_DIR`` or ``<CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/spill``.

    Several databases may share it: every spill file records its database, and each
    exporter replays only its own database's files.
    """
    return str(environment_variables.get(SPILL_DIR_ENV))


def _timeout(value: float | None) -> float:
    if value is not None:  # a wait past MAX_WAIT_S overflows the platform's time_t
        return environment_variables.clamped(value, 0.0, environment_variables.MAX_WAIT_S)
    return float(environment_variables.get(TIMEOUT_ENV))


class _Throttled:
    """A warning logged at once, then at most every ``LOG_EVERY_S`` with the running total."""

    def __init__(self, message: str, level: int = logging.WARNING) -> None:
        self._message = message
        self._level = level
        self._next = 0.0
        self._total = 0
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")

    def __call__(self, count: int, *args: Any) -> None:
        with self._lock:
            self._total += count
            now = time.monotonic()
            if now < self._next:
                return
            self._next = now + LOG_EVERY_S
            total = self._total
        logger.log(self._level, self._message, count, *args, total)


class DagSpanExporter(SpanExporter):
    """Writes each exported batch into the tracking DB (see ``docs/dag.md``).

    Besides finished spans it takes *started* records (spans without an end time, which
    :class:`~cmbagent_otel.processor.DurableBatchSpanProcessor` sends when a workflow or
    DAG-node span starts): their rows show ``running`` until the finished span replaces
    them (the live DAG). Started records are never spilled nor counted in :meth:`stats`.

    ``url``: database URL (argument > ``CMBAGENT_OTEL_DATABASE_URL`` >
    ``CMBAGENT_DATABASE_URL`` > default SQLite file). ``timeout``: seconds one ``export()``
    may spend on a batch, waits included (argument > ``CMBAGENT_OTEL_EXPORT_TIMEOUT`` > 10).
    ``migrate``: bring the schema to head before the first write (and again when it is
    found missing). ``spill_dir``: where batches that could not be written are kept
    (argument > ``CMBAGENT_OTEL_SPILL_DIR`` > ``<work dir>/spill``); ``spill=False`` drops
    them instead (counted and logged). Construction never touches the database (it never
    fails on an unreachable one); :meth:`warm_up` (called by the durable batch processor
    that ``instrument()`` builds) checks and, if needed, migrates the schema in a background
    thread, else the first export does.
    """

    #: the durable batch processor sends started records of workflow and DAG-node spans
    accepts_started_spans = True

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | None = None,
        migrate: bool = True,
        spill: bool = True,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._url = url
        self._timeout = _timeout(timeout)
        self._migrate = migrate
        try:
            self.target: str | None = target_of(url)
            # the writer is made at the first export: its SQLite file must be the one named now,
            # not the one of the working directory the application has moved to by then
            self._url = pinned_url(url)
        except BadDatabaseURL as exc:
            logger.error("cmbagent_otel: %s; the DAG exporter will drop every span", exc)
            self.target = None
        self._spill = SpillStore(spill_dir or default_spill_dir(), self.target) \
            if spill and self.target is not None else None
        self._replay_due = self._spill is not None  # files an earlier process left for this database
        #: replay a slice of pending spill files after each successful export (the durable
        #: processor turns this off and replays when its queue is idle instead)
        self.replay_after_export = True
        self._recovered = False
        self._degraded_until = 0.0
        self._writer: DagWriter | None = None
        self._lock = threading.Lock()  # one batch (export or replay) at a time
        self._stats_lock = threading.Lock()
        reset_in_child(self, "_lock", "_stats_lock")  # a child forked during an export must not hang
        self._closed = threading.Event()
        self._stats = {"exported": 0, "retried": 0, "spilled": 0, "replayed": 0, "dropped": 0}
        self._overflow_log = _Throttled("cmbagent_otel: span queue full, %d spans kept in the spill store %s "
                                        "(%d so far); they are written when the database catches up")
        self._late_log = _Throttled("cmbagent_otel: %d spans ended after the DAG processor shut down, kept in the "
                                    "spill store %s (%d so far); the next process writing this database, or "
                                    "`cmbagent-otel replay`, writes them")
        self._drop_log = _Throttled("cmbagent_otel: dropped %d spans: %s (%d so far)")
        self._spill_failed_log = _Throttled("cmbagent_otel: could not spill %d spans: %s (%d so far)", logging.ERROR)
        self._unreadable_log = _Throttled("cmbagent_otel: the spill store could not be read now (%d time): %s (%s); "
                                          "its files are replayed later (%d times so far)")
        #: while the database is away: one line when it goes and one when it is back, not one per batch
        self._outage = OutageTally()
        self._backlog_replayed = 0  # spans replayed since the last line saying so

    # --- bookkeeping -------------------------------------------------------------------------

    def _count(self, key: str, n: int) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _dropped(self, n: int, why: str) -> None:
        self._count("dropped", n)
        self._drop_log(n, why)

    def _get_writer(self) -> DagWriter:
        with self._stats_lock:  # warm_up() (application thread) and export() may both create it
            if self._writer is None:
                if self._closed.is_set():  # shutdown() has closed the last one: none is opened after it
                    raise DatabaseUnavailable("the exporter is shut down")
                self._writer = DagWriter(self._url, migrate=self._migrate)
            return self._writer

    def warm_up(self) -> threading.Thread | None:
        """Connect and check (or migrate) the schema in a background thread, once per
        database per process, so that no export (and no application thread) pays for it
        during a run. Returns the thread (None when there is nothing to do). Never raises."""
        if self.target is None or not self._migrate or self._closed.is_set():
            return None
        try:
            writer = self._get_writer()
            return prepare_in_background(writer.prepare, writer.url)
        except Exception:
            logger.debug("cmbagent_otel: could not start the schema preparation", exc_info=True)
            return None

    def _keep(self, spans: Sequence[ReadableSpan], why: str) -> int:
        """Spill ``spans``; returns how many are on disk (the rest are counted dropped).
        Started records (:class:`~cmbagent_otel.processor.StartedSpan`) are left out: the finished
        span carries the final row."""
        spans = [s for s in spans if not is_started(s)]
        if not spans:
            return 0
        if self._spill is None:
            self._dropped(len(spans), why)
            return 0
        try:
            self._spill.append(spans)
        except SpillFailed as exc:
            self._count("spilled", exc.spilled)
            self._spill_failed_log(len(spans) - exc.spilled, exc)
            self._dropped(len(spans) - exc.spilled, f"{why}, and the spill store failed ({exc.strerror})")
            if exc.spilled:
                self._replay_due = True
            return exc.spilled
        except Exception as exc:
            logger.exception("cmbagent_otel: could not spill %d spans", len(spans))
            self._dropped(len(spans), f"{why}, and the spill store failed ({exc})")
            return 0
        self._count("spilled", len(spans))
        self._replay_due = True
        return len(spans)

    # --- SpanExporter ------------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write ``spans`` (or spill them durably); SUCCESS or FAILURE, never an exception."""
        try:
            if not self._closed.is_set():
                with self._lock:
                    # checked again: shutdown() may have run while this export waited for the
                    # lock, and closed the writer it found; one opened now would never be closed
                    if not self._closed.is_set():
                        return self._export(spans)
            kept = self._keep(spans, "the exporter is shut down") if spans else 0
            return SpanExportResult.SUCCESS if kept == _finished(spans) else SpanExportResult.FAILURE
        except Exception:  # a bug of ours, or not a sequence of spans: never the caller's thread
            logger.exception("cmbagent_otel: DAG export failed unexpectedly")
            self._dropped(_finished(spans), "unexpected error (logged above)")
            return SpanExportResult.FAILURE

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        count = _finished(spans)
        if self.target is None:
            self._dropped(count, "invalid database URL")
            return SpanExportResult.FAILURE
        now = time.monotonic()
        deadline = now + (DEGRADED_ATTEMPT_S if now < self._degraded_until else self._timeout)
        backoff = INITIAL_BACKOFF_S
        first: DatabaseUnavailable | None = None
        while True:
            try:
                self._get_writer().write(spans, timeout=max(0.0, deadline - time.monotonic()))
            except DatabaseUnavailable as exc:
                first = first or exc
                remaining = deadline - time.monotonic()
                # a child forked inside our SQLite calls never writes SQLite: its batches are spilled at once
                if remaining <= 0 or self._closed.is_set() or isinstance(exc, ForkedInsideSqlite):
                    return self._give_up(spans, _why(first, exc))
                self._count("retried", count)
                # waits on the shutdown event so shutdown() cuts the backoff short
                self._closed.wait(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except Exception as exc:
                stored, dropped = self._isolate(spans, exc, deadline)
                self._count("exported", stored)
                return SpanExportResult.FAILURE if dropped else SpanExportResult.SUCCESS
            self._count("exported", count)
            self._degraded_until = 0.0
            if self._outage.ongoing:
                self._outage_over()
            if self.replay_after_export and self._due():
                self._replay(min(REPLAY_SLICE_S, self._timeout))
            return SpanExportResult.SUCCESS

    def _give_up(self, spans: Sequence[ReadableSpan], exc: Exception | str) -> SpanExportResult:
        count = _finished(spans)
        self._degraded_until = time.monotonic() + DEGRADED_S
        kept = self._keep(spans, f"database unavailable: {exc}")
        if kept:
            self._outage_spilled(exc, kept)
        return SpanExportResult.SUCCESS if kept == count else SpanExportResult.FAILURE

    def _outage_spilled(self, why: Exception | str, kept: int) -> None:
        """Say once per outage that batches go to the spill store (a long outage used to log a
        line per batch); the later batches of the outage are counted for :meth:`_outage_over`."""
        if not self._outage.failed(kept):
            logger.debug("cmbagent_otel: %s; %d more spans kept in the spill store", why, kept)
            return
        logger.warning("cmbagent_otel: %s; %d spans kept in the spill store %s, and so will later batches be "
                       "until the database is back (one line says so then)", why, kept,
                       self._spill.directory if self._spill else None)

    def _outage_over(self) -> None:
        outage = self._outage.recovered()
        if outage is None:
            return
        logger.warning("cmbagent_otel: the DAG database %s is back after %.1f s; %d spans (%d batches) "
                       "kept in the spill store meanwhile are written from it now",
                       redacted(resolve_url(self._url)), outage.seconds(), outage.spans, outage.batches)

    def _isolate(self, spans: Sequence[ReadableSpan], exc: Exception, deadline: float) -> tuple[int, int]:
        """A non-retryable error: write the batch in halves so only the spans that cause it
        are dropped (each with a log line); past the deadline the rest are spilled again.
        Returns ``(spans written, spans dropped)``; the caller counts the written ones."""
        logger.error("cmbagent_otel: could not write %d spans to the DAG database %s: %s", len(spans),
                     redacted(resolve_url(self._url)), exc, exc_info=exc)
        stored = dropped = 0

        def write(piece: list[ReadableSpan]) -> bool:
            nonlocal stored
            if time.monotonic() >= deadline or self._closed.is_set():
                self._keep(piece, "database refused a batch")
                return True
            try:
                self._get_writer().write(piece, timeout=max(0.0, deadline - time.monotonic()))
            except DatabaseUnavailable:
                self._keep(piece, "database unavailable")
            except Exception:
                return False
            else:
                stored += _finished(piece)
            return True

        def drop(span: ReadableSpan) -> None:
            nonlocal dropped
            if is_started(span):
                return  # a started record: the finished span carries the row
            logger.error("cmbagent_otel: dropping span %r (trace %032x span %016x): it cannot be written",
                         getattr(span, "name", "?"), span.context.trace_id, span.context.span_id)
            self._dropped(1, "a span the database refuses (logged above)")
            dropped += 1

        write_in_halves(spans, write, drop)
        return stored, dropped

    # --- the durable processor's overflow -------------------------------------------------------

    def spill_overflow(self, spans: Sequence[ReadableSpan], *, late: bool = False) -> None:
        """Keep spans a full processor queue could not take, or (``late``) spans ended after the
        processor shut down (called in the application's thread): one spill file per call,
        counted ``spilled``; ``dropped`` with a log line only when the spill store itself fails
        (or ``spill=False``)."""
        try:
            kept = self._keep(spans, "ended after shutdown" if late else "span queue full")
            if kept:
                (self._late_log if late else self._overflow_log)(kept, self._spill.directory if self._spill else None)
        except Exception:
            logger.debug("cmbagent_otel: overflow spill failed", exc_info=True)

    # --- replay --------------------------------------------------------------------------------

    def _write_for_replay(self, end: float) -> Any:
        def write(spans: Sequence[ReadableSpan]) -> bool | int:
            limit = max(0.0, min(end - time.monotonic(), self._timeout))
            try:
                self._get_writer().write(spans, timeout=limit)
            except DatabaseUnavailable:
                return False
            except Exception as exc:
                # the spans the database refuses are dropped (logged); the rest are written
                # or, past the deadline, spilled again: either way this file is done
                stored, _ = self._isolate(spans, exc, time.monotonic() + max(limit, DEGRADED_ATTEMPT_S))
                return stored  # the spill store counts these as replayed
            return True

        return write

    def _on_rejected(self, path: Any, count: int) -> None:
        self._dropped(count, f"spill file {path} holds spans that cannot be written (kept as .bad)")

    def _replay(self, budget_s: float | None) -> tuple[int, int]:
        """Replay this database's spill files for at most ``budget_s`` (None: all of them)."""
        if self._spill is None:
            return 0, 0
        end = time.monotonic() + budget_s if budget_s is not None else float("inf")
        try:
            if not self._recovered:
                self._spill.recover()
                self._recovered = True
                legacy = self._spill.legacy()
                if legacy:
                    logger.warning("cmbagent_otel: %d spill files in %s do not record their database; write them "
                                   "with `cmbagent-otel replay --to URL`", len(legacy), self._spill.directory)
            replayed, left = self._spill.replay(self._write_for_replay(end), budget_s=budget_s,
                                                on_rejected=self._on_rejected)
        except SpillUnreadable as exc:  # the folder cannot be listed now: its files wait, none is lost
            self._unreadable_log(1, self._spill.directory, exc.strerror or exc)
            self._replay_due = True
            return 0, 1
        self._count("replayed", replayed)
        self._replay_due = left > 0
        # one line per backlog, not per slice (a long outage's backlog takes many slices)
        self._backlog_replayed += replayed
        if not left and self._backlog_replayed:
            logger.info("cmbagent_otel: replayed %d spilled spans into the DAG database; none of its spill "
                        "files are left", self._backlog_replayed)
            self._backlog_replayed = 0
        return replayed, left

    def replay(self) -> tuple[int, int]:
        """Write every pending spill file of this database now; returns ``(spans replayed, files left)``."""
        if self._spill is None or self._closed.is_set():
            return 0, 0
        with self._lock:
            return self._replay(None)

    def replay_due(self) -> bool:
        """Whether spill files of this database may be waiting (the processor replays when idle)."""
        return self._spill is not None and not self._closed.is_set() and self._due()

    def _due(self) -> bool:
        """Whether spill files of this database may be waiting: this exporter's own, or, once this process has
        forked, a child's (the folder is listed: a child's files come later, when its exports give up)."""
        if self._replay_due or not _forked[0] or self._spill is None:
            return self._replay_due
        try:
            if self._spill.pending():
                self._replay_due = True  # never set back here: an export spilling meanwhile sets it too
        except Exception:  # not now (a later look lists it again); never the export's result
            logger.debug("cmbagent_otel: could not list the spill store", exc_info=True)
        return self._replay_due

    def replay_slice(self, budget_s: float = REPLAY_SLICE_S) -> tuple[int, int]:
        """Replay for at most ``budget_s`` seconds: ``(spans replayed, files left)``. Never raises."""
        if not self.replay_due():
            return 0, 0
        try:
            with self._lock:
                return self._replay(budget_s)
        except Exception:
            logger.exception("cmbagent_otel: replay failed unexpectedly")
            return 0, 0

    def stats(self) -> dict[str, int]:
        """Span counts so far: exported (written), retried (per attempt), spilled (kept on
        disk: after a failed export or from a full queue), replayed (written from spill
        files) and dropped (lost, each time with a log line)."""
        with self._stats_lock:
            return dict(self._stats)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Replay pending spill files of this database within ``timeout_millis``; True when none are left."""
        deadline = time.monotonic() + timeout_millis / 1000
        while self.replay_due():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            replayed, files_left = self.replay_slice(min(REPLAY_SLICE_S, left))
            if not files_left or not replayed:
                break  # done, or the database refuses: the files wait for a later export
        return not self.replay_due()

    def shutdown(self) -> None:
        """Stop exporting and release connections (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        stats = self.stats()
        level = logging.WARNING if stats["spilled"] or stats["dropped"] else logging.INFO
        logger.log(level, "cmbagent_otel: DAG exporter shut down: %s", " ".join(f"{k}={v}" for k, v in stats.items()))


# Whether this process has forked. A child forked while this process was inside a SQLite transaction on the DAG
# database cannot write that file (SQLite keeps the file's lock state in the process, and the child inherits it
# held by a connection that is not there): its batches go to the spill store, later, and this process is the
# one still writing that database. Its exporters then list the spill folder after each export and when idle,
# not only after spilling themselves (DagSpanExporter._due).
_forked = [False]


def _after_fork_in_parent() -> None:
    _forked[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=_after_fork_in_parent)

_is_started_record = StartedSpan.__instancecheck__  # isinstance(span, StartedSpan), as is_started asks


def _finished(spans: Sequence[ReadableSpan]) -> int:
    """How many of ``spans`` are spans (not started records); 0 when ``spans`` cannot be read."""
    try:
        # is_started's test, run in C for each span (no Python frame per span of every batch)
        return len(spans) - sum(map(_is_started_record, spans))
    except Exception:
        pass
    try:  # an iterable without a length
        return sum(1 for span in spans if not is_started(span))
    except Exception:
        return 0


def span_processor(exporter: DagSpanExporter | None = None, **settings: Any) -> Any:
    """A :class:`~cmbagent_otel.processor.DurableBatchSpanProcessor` for ``exporter`` (a new
    ``DagSpanExporter()`` by default): a full queue spills instead of dropping.

    ``settings``: ``max_queue_size``, ``schedule_delay_millis``, ``max_export_batch_size``
    (see :mod:`cmbagent_otel.processor` for their environment variables and defaults).
    """
    from cmbagent_otel.processor import DurableBatchSpanProcessor

    return DurableBatchSpanProcessor(exporter or DagSpanExporter(), **settings)


def _why(first: DatabaseUnavailable, last: DatabaseUnavailable) -> str:
    """Why a batch could not be written: the first attempt's error, which names the cause, and the
    last's when it differs (the last attempt runs with what is left of the deadline, so it mostly ends
    in a statement or lock timeout, which alone hid e.g. ``permission denied for schema``)."""
    if str(first) == str(last):
        return str(last)
    return f"{first} (last attempt: {str(last).partition('): ')[2] or last})"
