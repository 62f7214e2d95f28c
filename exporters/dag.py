"""``DagSpanExporter``: an OpenTelemetry ``SpanExporter`` writing cmbagent's tracking tables.

Use it with a ``BatchSpanProcessor`` (or as the ``cmbagent_dag`` traces exporter entry
point). ``export()`` never raises: operational database errors (down, locked, full) are
retried with exponential backoff until the export deadline; then the batch is written to a
durable spill file (see :mod:`cmbagent_otel.spill`) and replayed by the next successful
export, the next process that exports, or ``cmbagent-otel replay``. While the database
stays unavailable, later batches are tried once and spilled at once, so the batch
processor's queue keeps draining instead of dropping spans.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cmbagent_otel.dag.database import default_sqlite_path
from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable
from cmbagent_otel.spill import SPILL_DIR_ENV, SpillStore

logger = logging.getLogger("cmbagent_otel.dag")

TIMEOUT_ENV = "CMBAGENT_OTEL_EXPORT_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
DEGRADED_S = 5.0  # after a spill, how long later batches skip the retry loop
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0

__all__ = ["DagSpanExporter", "default_spill_dir"]


def default_spill_dir() -> str:
    """``CMBAGENT_OTEL_SPILL_DIR`` or ``<CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/spill``."""
    return os.environ.get(SPILL_DIR_ENV) or str(default_sqlite_path().parent.parent / "spill")


def _timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            return float(raw)
        except ValueError:
            logger.warning("cmbagent_otel: ignoring invalid %s=%r", TIMEOUT_ENV, raw)
    return DEFAULT_TIMEOUT_S


class DagSpanExporter(SpanExporter):
    """Writes each exported batch into the tracking DB (see ``docs/dag.md``).

    ``url``: database URL (argument > ``CMBAGENT_OTEL_DATABASE_URL`` >
    ``CMBAGENT_DATABASE_URL`` > default SQLite file). ``timeout``: seconds one ``export()``
    may spend retrying (argument > ``CMBAGENT_OTEL_EXPORT_TIMEOUT`` > 10). ``migrate``: bring
    the schema to head before the first write. ``spill_dir``: where batches that could not be
    written are kept (argument > ``CMBAGENT_OTEL_SPILL_DIR`` > ``<work dir>/spill``);
    ``spill=False`` drops them instead (counted). Nothing touches the database until the
    first export, so construction never fails on an unreachable database.
    """

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
        self._spill = SpillStore(spill_dir or default_spill_dir()) if spill else None
        self._replay_due = spill
        self._degraded_until = 0.0
        self._writer: DagWriter | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._stats = {"exported": 0, "retried": 0, "spilled": 0, "replayed": 0, "dropped": 0}

    def _get_writer(self) -> DagWriter:
        if self._writer is None:
            self._writer = DagWriter(self._url, migrate=self._migrate)
        return self._writer

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write ``spans`` (or spill them durably); SUCCESS or FAILURE, never an exception."""
        if self._closed.is_set():
            return SpanExportResult.FAILURE
        try:
            with self._lock:
                return self._export(spans)
        except Exception:  # a bug of ours must not reach the batch processor's thread
            logger.exception("cmbagent_otel: DAG export failed unexpectedly")
            self._stats["dropped"] += len(spans)
            return SpanExportResult.FAILURE

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        now = time.monotonic()
        deadline = now if now < self._degraded_until else now + self._timeout
        backoff = INITIAL_BACKOFF_S
        while True:
            try:
                self._get_writer().write(spans)
            except DatabaseUnavailable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return self._give_up(spans, exc)
                self._stats["retried"] += count
                # waits on the shutdown event so shutdown() cuts the backoff short
                self._closed.wait(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except Exception:
                logger.exception("cmbagent_otel: could not write %d spans to the DAG database", count)
                self._stats["dropped"] += count
                return SpanExportResult.FAILURE
            self._stats["exported"] += count
            self._degraded_until = 0.0
            if self._replay_due:
                self._replay()
            return SpanExportResult.SUCCESS

    def _give_up(self, spans: Sequence[ReadableSpan], exc: Exception) -> SpanExportResult:
        count = len(spans)
        if self._spill is not None:
            try:
                path = self._spill.append(spans)
            except OSError:
                logger.exception("cmbagent_otel: could not spill %d spans", count)
            else:
                logger.warning("cmbagent_otel: database unavailable (%s); %d spans kept in %s", exc, count, path)
                self._stats["spilled"] += count
                self._replay_due = True
                self._degraded_until = time.monotonic() + DEGRADED_S
                return SpanExportResult.SUCCESS
        logger.warning("cmbagent_otel: dropping %d spans, database unavailable: %s", count, exc)
        self._stats["dropped"] += count
        return SpanExportResult.FAILURE

    def _write_quietly(self, spans: Sequence[ReadableSpan]) -> bool:
        try:
            self._get_writer().write(spans)
        except DatabaseUnavailable:
            return False
        return True

    def _replay(self) -> None:
        assert self._spill is not None
        replayed, left = self._spill.replay(self._write_quietly)
        self._stats["replayed"] += replayed
        self._replay_due = left > 0
        if replayed:
            logger.info("cmbagent_otel: replayed %d spilled spans into the DAG database", replayed)

    def replay(self) -> tuple[int, int]:
        """Write every pending spill file now; returns ``(spans replayed, files left)``."""
        if self._spill is None:
            return 0, 0
        with self._lock:
            replayed, left = self._spill.replay(self._write_quietly)
            self._stats["replayed"] += replayed
            self._replay_due = left > 0
            return replayed, left

    def stats(self) -> dict[str, int]:
        """Span counts so far: exported (written), retried (per attempt), spilled (kept on
        disk), replayed (written from spill files) and dropped (lost, with a log line)."""
        return dict(self._stats)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here; always True."""
        return True

    def shutdown(self) -> None:
        """Stop exporting and release connections (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        stats = self._stats
        level = logging.WARNING if stats["spilled"] or stats["dropped"] else logging.INFO
        logger.log(level, "cmbagent_otel: DAG exporter shut down: %s", " ".join(f"{k}={v}" for k, v in stats.items()))
