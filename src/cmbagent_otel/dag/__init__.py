"""Relational DAG export: spans -> cmbagent's tracking tables (see ``docs/dag.md``).

``DagWriter(url).write(spans)`` writes one batch in one transaction;
:class:`DatabaseUnavailable` marks retryable database errors. The OpenTelemetry exporter
wrapping it is ``cmbagent_otel.exporters.dag.DagSpanExporter``.
"""

from __future__ import annotations

from .database import BadDatabaseURL, default_sqlite_path, resolve_url
from .writer import DagWriter, DatabaseUnavailable, WriteResult

__all__ = ["BadDatabaseURL", "DagWriter", "DatabaseUnavailable", "WriteResult", "default_sqlite_path", "resolve_url"]
