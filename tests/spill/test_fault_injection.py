"""No data loss: the database becomes unavailable mid-run, the process is killed, and in the
end every span is in the database exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, create_engine, event

from cmbagent_otel import _spans, phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.dag.writer import DagWriter, dump_tables
from cmbagent_otel.processor import as_started
from cmbagent_otel.spill import SpillStore, record_to_span

CHILD = Path(__file__).with_name("killed_app.py")


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection: every writer gets 'database is locked'."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def dump(url: str) -> dict:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return dump_tables(conn)
    finally:
        engine.dispose()


def reference(spans, tmp_path: Path) -> dict:
    url = f"sqlite:///{tmp_path}/reference.db"
    writer = DagWriter(url)
    writer.write(spans)
    writer.close()
    return dump(url)


@pytest.fixture
def provider_with_memory() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        yield provider, memory
    finally:
        provider.shutdown()


@pytest.fixture
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS", "50")


def test_database_locked_mid_run_spills_then_replays_exactly_once(tmp_path, short_lock_wait):
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    spill_dir = tmp_path / "spill"
    exporter = DagSpanExporter(url, timeout=0.2, spill_dir=spill_dir)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    routed = _spans.workflow_tracers.routed_to(provider)
    routed.__enter__()
    try:
        with workflow("outage", mode="planning-control"), phase("control"):
            for number in (1, 2, 3):
                with step(number, f"step {number}"):
                    for call in range(4):
                        with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call}):
                            pass
                if number == 2:
                    with locked(db_path):
                        assert provider.force_flush()
                        assert SpillStore(spill_dir).pending(), "the locked batch must be on disk"
                else:
                    assert provider.force_flush()
        assert provider.force_flush()
    finally:
        routed.__exit__(None, None, None)
        provider.shutdown()
    stats = exporter.stats()
    assert stats["spilled"] > 0 and stats["replayed"] == stats["spilled"] and stats["dropped"] == 0
    assert SpillStore(spill_dir).pending() == []
    assert dump(url) == reference(memory.get_finished_spans(), tmp_path)


def test_process_killed_between_batches_loses_nothing(tmp_path, short_lock_wait):
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    spill_dir, record = tmp_path / "spill", tmp_path / "spans.jsonl"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    child = subprocess.Popen([sys.executable, str(CHILD), url, str(spill_dir), str(record)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split()[:2] == ["FLUSHED", "1"]
        with locked(db_path):
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline().split()
            assert line[:2] == ["FLUSHED", "2"] and int(line[2]) > 0  # step 2's batch was spilled
            child.send_signal(signal.SIGKILL)  # killed between batches, the database still locked
            assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert SpillStore(spill_dir).pending()

    cli = Path(sys.executable).with_name("cmbagent-otel")
    replay = subprocess.run([str(cli), "--db", url, "replay", "--spill-dir", str(spill_dir)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert replay.returncode == 0, replay.stderr
    assert "0 spill files left" in replay.stdout
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    produced = [record_to_span(r) for r in lines if "started" not in r]
    assert len(produced) == 2 * 4  # two finished steps of (step + 3 chats); workflow/phase never ended
    ended = {(s.context.trace_id, s.context.span_id) for s in produced}
    # the workflow and phase never ended: the live DAG's started records left them running
    open_spans = [s for s in (as_started(record_to_span(r["started"])) for r in lines if "started" in r)
                  if (s.context.trace_id, s.context.span_id) not in ended]
    assert [s.name for s in open_spans] == ["workflow killed", "phase control"]
    produced = open_spans + produced
    assert dump(url) == reference(produced, tmp_path)
    # replaying again (a second process starting) changes nothing
    again = subprocess.run([str(cli), "--db", url, "replay", "--spill-dir", str(spill_dir)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and dump(url) == reference(produced, tmp_path)


@contextlib.contextmanager
def database_full(db_path: Path) -> Iterator[None]:
    """Cap every new connection to ``db_path`` at its current size: writes fail with SQLite's
    'database or disk is full' (SQLITE_FULL), as on a full disk."""
    pages = sqlite3.connect(db_path).execute("PRAGMA page_count").fetchone()[0]

    def cap(dbapi_connection, connection_record) -> None:
        if Path(dbapi_connection.execute("PRAGMA database_list").fetchone()[2]) == db_path:
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(Engine, "connect", cap)
    try:
        yield
    finally:
        event.remove(Engine, "connect", cap)


def test_database_full_spills_then_replays_exactly_once(tmp_path, provider_with_memory, caplog):
    provider, memory = provider_with_memory
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    spill_dir = tmp_path / "spill"
    routed = _spans.workflow_tracers.routed_to(provider)
    routed.__enter__()
    try:
        with workflow("full disk", mode="planning-control"), phase("control"), step(1, "fit"):
            for call in range(20):
                with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call}):
                    pass
    finally:
        routed.__exit__(None, None, None)
    spans = memory.get_finished_spans()

    with database_full(db_path):
        exporter = DagSpanExporter(url, timeout=0.2, spill_dir=spill_dir)
        assert exporter.export(spans) is SpanExportResult.SUCCESS  # kept on disk, not lost
        exporter.shutdown()
    stats = exporter.stats()
    assert stats["retried"] > 0 and stats["spilled"] == len(spans) and stats["dropped"] == 0
    assert "database or disk is full" in caplog.text  # SQLite's own SQLITE_FULL error, retried then spilled
    assert SpillStore(spill_dir).pending()
    assert dump(url)["execution_events"] == []

    # space is back: the next process replays the spill into the database, exactly once
    later = DagSpanExporter(url, spill_dir=spill_dir)
    assert later.replay() == (len(spans), 0)
    later.shutdown()
    assert dump(url) == reference(spans, tmp_path)
