"""Another instrumentation's secrets never reach the spill store's files.

The DAG mapping scrubs every span when it makes rows, but a batch the database could not take
went to disk as it was: an HTTP client's ``Authorization`` header, a URL with its password, a
``password`` attribute, a key in an exception event of another instrumentation's span sat in
plain text in the spill directory until replayed (found by the sixth campaign; ours are
redacted when recorded). Now they are scrubbed before the file is written, and what replay
stores is what a direct write stores.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

import cmbagent_otel as c
from cmbagent_otel.dag.writer import DagWriter
from cmbagent_otel.spill import SpillStore

from .conftest import dump


def _secrets() -> dict[str, str]:
    return {name: f"Q{secrets.token_hex(12)}" for name in ("header", "url", "password", "event", "status")}


def _run(provider: Any, found: dict[str, str]) -> None:
    tracer = provider.get_tracer("other.instrumentation")
    with c.workflow("spilled foreign spans"), c.phase("control"), c.step(1, "fetch", agent="engineer"), \
            tracer.start_as_current_span("GET /maps") as span:
        span.set_attribute("http.request.header.authorization", (f"Bearer {found['header']}",))
        span.set_attribute("url.full", f"https://user:{found['url']}@data.example.org/maps")
        span.set_attribute("db.password", found["password"])
        span.add_event("exception", {"exception.message": f"refused: api_key={found['event']}"})
        span.set_status(Status(StatusCode.ERROR, f"token={found['status']} was refused"))


def test_foreign_secrets_are_scrubbed_before_a_spill_file_is_written(tmp_path: Path) -> None:
    found = _secrets()
    spill_dir = tmp_path / "spill"
    down = DagSpanExporter("postgresql+psycopg://u:p@127.0.0.1:1/down", timeout=0, spill_dir=spill_dir)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(down))
    c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        _run(provider, found)
    finally:
        c.uninstrument()
        provider.shutdown()
    spans = memory.get_finished_spans()
    assert down.stats()["spilled"] == len(spans) and spans
    files = [p for p in spill_dir.rglob("*") if p.is_file()]
    assert files
    on_disk = b"".join(p.read_bytes() for p in files).decode("latin-1")
    assert "GET /maps" in on_disk  # the foreign span is there
    leaks = [name for name, value in found.items() if value in on_disk]
    assert not leaks, leaks
    # replayed, the rows are those of a direct write of the same spans
    replayed, direct = f"sqlite:///{tmp_path / 'replayed.db'}", f"sqlite:///{tmp_path / 'direct.db'}"
    writer = DagWriter(replayed)
    try:
        outcome = SpillStore(spill_dir).replay(lambda batch: writer.write(batch).spans == len(batch))
    finally:
        writer.close()
    assert outcome[0] == len(spans)
    writer = DagWriter(direct)
    try:
        writer.write(list(spans))
    finally:
        writer.close()
    assert dump(replayed) == dump(direct)
