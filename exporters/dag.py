"""``DagSpanExporter``: an OpenTelemetry ``SpanExporter`` writing cmbagent's tracking tables.

Use it with a ``BatchSpanProcessor`` (or as the ``cmbagent_dag`` traces exporter entry
point). ``export()`` never raises: operational database errors are retried with
exponential backoff until the export deadline, then the batch is reported as FAILURE.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cmbagent_otel.dag.writer import DagWriter, DatabaseUnavailable

logger = logging.getLogger("cmbagent_otel.dag")

TIMEOUT_ENV = "CMBAGENT_OTEL_EXPORT_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0

__all__ = ["DagSpanExporter"]


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
    may spend retrying (argument > ``CMBAGENT_OTEL_EXPORT_TIMEOUT`` > 30). ``migrate``: bring
    the schema to head before the first write. Nothing touches the database until the first
    export, so construction never fails on an unreachable database.
    """

    def __init__(self, url: str | None = None, *, timeout: float | None = None, migrate: bool = True) -> None:
        self._url = url
        self._timeout = _timeout(timeout)
        self._migrate = migrate
        self._writer: DagWriter | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._exported = 0
        self._retried = 0
        self._failed = 0

    def _get_writer(self) -> DagWriter:
        if self._writer is None:
            self._writer = DagWriter(self._url, migrate=self._migrate)
        return self._writer

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write ``spans``; SUCCESS or FAILURE, never an exception."""
        if self._closed.is_set():
            return SpanExportResult.FAILURE
        count = len(spans)
        deadline = time.monotonic() + self._timeout
        backoff = INITIAL_BACKOFF_S
        with self._lock:
            while True:
                try:
                    self._get_writer().write(spans)
                    self._exported += count
                    return SpanExportResult.SUCCESS
                except DatabaseUnavailable as exc:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed.is_set():
                        logger.warning("cmbagent_otel: dropping %d spans, database unavailable: %s", count, exc)
                        self._failed += count
                        return SpanExportResult.FAILURE
                    self._retried += count
                    # waits on the shutdown event so shutdown() cuts the backoff short
                    self._closed.wait(min(backoff, remaining))
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                except Exception:
                    logger.exception("cmbagent_otel: could not write %d spans to the DAG database", count)
                    self._failed += count
                    return SpanExportResult.FAILURE

    def stats(self) -> dict[str, int]:
        """Counts of spans exported, retried (per attempt) and failed so far."""
        return {"exported": self._exported, "retried": self._retried, "failed": self._failed}

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
