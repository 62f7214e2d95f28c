"""Durable spill files: span batches that could not be written are kept on disk and replayed.

A spill file is one batch as JSON lines, written to ``*.tmp``, fsynced, then renamed, so a
file either exists complete or not at all (a crash mid-write leaves only a ``.tmp`` that is
ignored). Replay deletes a file only after its batch was written; because the DAG writer is
idempotent (row ids derive from trace and span ids), replaying a batch twice, or a batch
that partly reached the database before, still leaves every span in the database once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

logger = logging.getLogger("cmbagent_otel")

SPILL_DIR_ENV = "CMBAGENT_OTEL_SPILL_DIR"
SUFFIX = ".jsonl"
FORMAT_VERSION = 1


def _attrs(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in dict(value or {}).items():
        out[str(key)] = list(item) if isinstance(item, tuple) else item
    return out


def _context(ctx: SpanContext | None) -> list[Any] | None:
    if ctx is None:
        return None
    return [format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags), ctx.is_remote]


def _from_context(raw: list[Any] | None) -> SpanContext | None:
    if not raw:
        return None
    return SpanContext(int(raw[0], 16), int(raw[1], 16), bool(raw[3]), TraceFlags(int(raw[2])))


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """A JSON-safe dict holding everything the exporters read from ``span``."""
    scope = span.instrumentation_scope
    return {
        "v": FORMAT_VERSION,
        "name": span.name,
        "context": _context(span.context),
        "parent": _context(span.parent),
        "kind": span.kind.name if span.kind is not None else "INTERNAL",
        "start": span.start_time,
        "end": span.end_time,
        "attributes": _attrs(span.attributes),
        "status": [span.status.status_code.name, span.status.description],
        "events": [{"name": e.name, "timestamp": e.timestamp, "attributes": _attrs(e.attributes)}
                   for e in span.events],
        "links": [{"context": _context(link.context), "attributes": _attrs(link.attributes)} for link in span.links],
        "resource": _attrs(span.resource.attributes if span.resource is not None else {}),
        "scope": [scope.name, scope.version] if scope is not None else None,
    }


def _tuples(value: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def record_to_span(record: dict[str, Any]) -> ReadableSpan:
    """Rebuild a ``ReadableSpan`` from :func:`span_to_record` output."""
    code, description = record.get("status") or ["UNSET", None]
    status_code = StatusCode[code]
    scope = record.get("scope")
    return ReadableSpan(
        name=record["name"],
        context=_from_context(record.get("context")),
        parent=_from_context(record.get("parent")),
        resource=Resource(_tuples(record.get("resource") or {})),
        attributes=_tuples(record.get("attributes") or {}),
        events=[Event(e["name"], _tuples(e.get("attributes") or {}), e.get("timestamp"))
                for e in record.get("events") or []],
        links=[Link(_from_context(link["context"]), _tuples(link.get("attributes") or {}))  # type: ignore[arg-type]
               for link in record.get("links") or []],
        kind=SpanKind[record.get("kind") or "INTERNAL"],
        status=Status(status_code, description if status_code is StatusCode.ERROR else None),
        start_time=record.get("start"),
        end_time=record.get("end"),
        instrumentation_scope=InstrumentationScope(scope[0], scope[1]) if scope else None,
    )


class SpillStore:
    """A directory of durable spill files (one batch per file)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._seq = 0

    def append(self, spans: Sequence[ReadableSpan]) -> Path:
        """Write ``spans`` durably as one new spill file; returns its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._seq += 1
            seq = self._seq
        final = self.directory / f"spill-{time.time_ns():020d}-{os.getpid()}-{seq:06d}{SUFFIX}"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for span in spans:
                handle.write(json.dumps(span_to_record(span), ensure_ascii=False, default=repr))
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return final

    def pending(self) -> list[Path]:
        """Complete spill files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))

    @staticmethod
    def read(path: Path) -> list[ReadableSpan]:
        spans = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    spans.append(record_to_span(json.loads(line)))
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    raise ValueError(f"{path}:{number}: not a spill record ({exc})") from exc
        return spans

    def replay(self, write: Callable[[Sequence[ReadableSpan]], bool]) -> tuple[int, int]:
        """Feed every pending file to ``write`` (True = stored); delete the stored ones.

        Returns ``(spans replayed, files left)``. Stops at the first file ``write`` refuses,
        keeping it and the newer ones for the next attempt. A corrupt file is renamed to
        ``*.bad`` and skipped, never deleted.
        """
        replayed = 0
        files = self.pending()
        for index, path in enumerate(files):
            try:
                spans = self.read(path)
            except (OSError, ValueError):
                logger.warning("cmbagent_otel: unreadable spill file %s kept as .bad", path, exc_info=True)
                path.rename(path.with_name(path.name + ".bad"))
                continue
            if not write(spans):
                return replayed, len(files) - index
            path.unlink(missing_ok=True)
            replayed += len(spans)
        return replayed, 0

    def __iter__(self) -> Iterator[Path]:
        return iter(self.pending())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
