"""Fault-injection suite: every span produced is checked against an independent record.

Each test runs a traced workflow through the DAG exporter behind its durable batch
processor, injects one fault, and ends by comparing what the database holds with the record
every ended span was written to (by a processor that sees spans before the DAG processor
does): every span stored exactly once, or counted dropped with a log line (only when the
spill store's own disk is full too).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, create_engine, event, text

from cmbagent_otel import _spans, phase, redo, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.dag.writer import DagWriter
from cmbagent_otel.processor import DurableBatchSpanProcessor
from cmbagent_otel.spill import SpillStore

from .conftest import cli, dump, expected_keys, read_record, read_started, reference, spawn, stored_spans


@contextlib.contextmanager
def traced(exporter: DagSpanExporter, **settings: int) -> Iterator[
        tuple[TracerProvider, InMemorySpanExporter, DurableBatchSpanProcessor]]:
    """cmbagent-otel's spans go to an in-memory record (first) and the DAG exporter's processor."""
    record = InMemorySpanExporter()
    processor = DurableBatchSpanProcessor(exporter, **settings)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(record))
    provider.add_span_processor(processor)
    try:
        with _spans.workflow_tracers.routed_to(provider):
            yield provider, record, processor
    finally:
        provider.shutdown()  # drains the queue and replays what was spilled


def steps(first: int, last: int, calls: int = 4) -> None:
    for number in range(first, last + 1):
        with step(number, f"step {number}"):
            for call in range(calls):
                with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call,
                                                         "gen_ai.request.model": "m"}):
                    pass


# --- a burst past the queue ---------------------------------------------------------------------------

@contextlib.contextmanager
def first_commit_held_until(released: threading.Event) -> Iterator[None]:
    """The database slower than the application: the exporter thread's first commit waits until
    ``released`` is set, or the block ends (a commit in the application's thread is never held)."""
    app = threading.current_thread()
    held = [False]

    def on_commit(conn) -> None:
        if not held[0] and threading.current_thread() is not app:
            held[0] = True
            released.wait()  # no timeout: a held commit let go early could drain the queue mid-burst

    event.listen(Engine, "commit", on_commit)
    try:
        yield
    finally:
        released.set()
        event.remove(Engine, "commit", on_commit)


def test_burst_past_the_queue_is_stored_exactly_once(tmp_path):
    """5,002 spans while the exporter's first commit is held: the queue (2048) certainly fills (at most
    one batch of 512 is out of it), the oldest batches go to spill files from the application thread,
    then every span is in the database exactly once, usage counted once, no spill file left."""
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    upgrade(url)
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill")
    burst_over = threading.Event()
    with traced(exporter) as (provider, record, processor), first_commit_held_until(burst_over):
        with workflow("burst", mode="planning-control"), phase("control"):
            steps(1, 50, calls=99)  # 50 * 100 + phase + workflow = 5,002 spans
        queue = processor.stats()
        burst_over.set()
        assert provider.force_flush(300_000)
    spans = record.get_finished_spans()
    assert len(spans) == 5_002
    assert queue["overflowed"] >= 5_002 - 2_048 - 512 and queue["dropped"] == 0
    stats = exporter.stats()
    assert stats["dropped"] == 0 and stats["spilled"] == queue["overflowed"] == stats["replayed"]
    assert stats["exported"] + stats["replayed"] == len(spans)
    assert stored_spans(url) == expected_keys(spans)
    with sqlite3.connect(tmp_path / "cmbagent.db") as conn:  # usage counted once: no cost row twice
        assert conn.execute("SELECT SUM(prompt_tokens) FROM cost_records").fetchone()[0] == 50 * sum(range(99))
    assert SpillStore(tmp_path / "spill").pending() == []


# --- the SQLite file deleted mid-run -----------------------------------------------------------------

@contextlib.contextmanager
def delete_file_at_commit(db_path: Path, commit_number: int) -> Iterator[list[int]]:
    """Unlink ``db_path`` just before the ``commit_number``-th commit of a connection to it: that
    transaction commits into the deleted file, as when someone removes the DB mid-write."""
    seen = [0]

    def on_commit(conn) -> None:
        url = conn.engine.url
        if url.get_backend_name() == "sqlite" and Path(url.database) == db_path:
            seen[0] += 1
            if seen[0] == commit_number:
                db_path.unlink()

    event.listen(Engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(Engine, "commit", on_commit)


def test_database_file_deleted_mid_run_loses_nothing_after_the_deletion(tmp_path, caplog):
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    exporter = DagSpanExporter(url, spill_dir=tmp_path / "spill")
    with traced(exporter, max_export_batch_size=64) as (provider, record, _), \
            workflow("deleted", mode="planning-control"), phase("control"):
        steps(1, 2)
        assert provider.force_flush()
        before = len(record.get_finished_spans())
        db_path.unlink()  # between batches
        steps(3, 4)
        assert provider.force_flush()
        between = len(record.get_finished_spans())
        with delete_file_at_commit(db_path, 1) as commits:
            steps(5, 6)  # this batch commits into the deleted file: it must be written again
            assert provider.force_flush()
        assert commits[0] >= 2
        steps(7, 8)
    spans = record.get_finished_spans()
    stats = exporter.stats()
    assert stats["exported"] == len(spans) and stats["dropped"] == stats["spilled"] == 0
    # the deleted files took the earlier batches with them; every later span is in the new file
    assert stored_spans(url) == expected_keys(spans[between:])
    assert not set(expected_keys(spans[:before])) & set(stored_spans(url))
    assert "was deleted or replaced" in caplog.text


# --- locked past the export deadline -----------------------------------------------------------------

# Holds a lock for HOLD_S seconds (or until told), far past the 0.5 s export deadline: if an
# export waited for the lock instead of its deadline, it would return only after the release.
HOLD_S = 20
SQLITE_HOLDER = f"""
import select, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
select.select([sys.stdin], [], [], {HOLD_S})
conn.execute("ROLLBACK")
"""
PG_HOLDER = f"""
import select, sys
from sqlalchemy import create_engine, text
with create_engine(sys.argv[1]).connect() as conn:
    conn.execute(text("LOCK TABLE execution_events IN ACCESS EXCLUSIVE MODE"))
    print("LOCKED", flush=True)
    select.select([sys.stdin], [], [], {HOLD_S})
    conn.rollback()
"""


@contextlib.contextmanager
def lock_held(script: str, target: str) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([sys.executable, "-c", script, target], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        yield holder
    finally:
        holder.stdin.write("release\n")
        holder.stdin.flush()
        holder.wait(timeout=60)


def test_sqlite_locked_past_the_deadline_spills_within_it_and_replays(tmp_path, monkeypatch):
    monkeypatch.delenv("CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS", raising=False)  # SQLite may wait 30 s
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    exporter = DagSpanExporter(url, timeout=0.5, spill_dir=tmp_path / "spill")
    with traced(exporter, max_export_batch_size=64) as (provider, record, _), \
            workflow("locked", mode="planning-control"), phase("control"):
        steps(1, 2)
        assert provider.force_flush()
        with lock_held(SQLITE_HOLDER, str(db_path)) as holder:
            steps(3, 6)
            provider.force_flush(1000)
            # every wait fitted the 0.5 s deadline: the exports gave up while the lock was still held
            assert holder.poll() is None
            assert exporter.stats()["spilled"] > 0
        steps(7, 8)
    spans = record.get_finished_spans()
    stats = exporter.stats()
    assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"]
    assert stats["exported"] + stats["replayed"] == len(spans)
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")


@pytest.mark.postgres
def test_postgres_locked_past_the_deadline_spills_within_it_and_replays(tmp_path, pg_schema):
    with pg_schema() as url, pg_schema() as ref_url:
        upgrade(url)
        exporter = DagSpanExporter(url, timeout=0.5, spill_dir=tmp_path / "spill")
        with traced(exporter, max_export_batch_size=64) as (provider, record, _), \
                workflow("locked", mode="planning-control"), phase("control"):
            steps(1, 2)
            assert provider.force_flush()
            with lock_held(PG_HOLDER, url) as holder:
                steps(3, 6)
                provider.force_flush(1000)
                assert holder.poll() is None  # lock_timeout / statement_timeout fitted the deadline
                assert exporter.stats()["spilled"] > 0
            steps(7, 8)
        spans = record.get_finished_spans()
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"]
        assert stats["exported"] + stats["replayed"] == len(spans)
        assert dump(url) == reference(spans, ref_url)


# --- disk full -------------------------------------------------------------------------------------

@contextlib.contextmanager
def database_full(db_path: Path) -> Iterator[None]:
    """Cap connections to ``db_path`` at the file's current size: writes fail with SQLite's
    'database or disk is full' (SQLITE_FULL), as on a full disk. On exit the space comes back
    (the cap is lifted on the connections it was set on, as when a full disk is cleaned up)."""
    pages = sqlite3.connect(db_path).execute("PRAGMA page_count").fetchone()[0]
    capped = []

    def cap(dbapi_connection, connection_record) -> None:
        if Path(dbapi_connection.execute("PRAGMA database_list").fetchone()[2]) == db_path:
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")
            capped.append(dbapi_connection)

    event.listen(Engine, "connect", cap)
    try:
        yield
    finally:
        event.remove(Engine, "connect", cap)
        for conn in capped:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                conn.execute("PRAGMA max_page_count = 1073741823")


@contextlib.contextmanager
def other_filesystem(path: Path, size: str = "8m") -> Iterator[Path]:
    """A directory on its own small tmpfs when this process may mount one (root), else a plain one."""
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    ).returncode == 0
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_database_disk_full_spills_to_another_disk_then_replays(tmp_path):
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    with other_filesystem(tmp_path / "spilldisk") as spill_dir:
        full = database_full(db_path)
        full.__enter__()  # before the processor's warm-up opens the first connection
        exporter = DagSpanExporter(url, timeout=0.3, spill_dir=spill_dir)
        with traced(exporter, max_export_batch_size=64) as (provider, record, _), \
                workflow("full", mode="planning-control"), phase("control"):
            try:
                steps(1, 4)
                assert provider.force_flush(2000) is False  # spilled, not replayable yet
                assert exporter.stats()["spilled"] > 0
            finally:
                full.__exit__(None, None, None)
            steps(5, 6)
        spans = record.get_finished_spans()
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"]
        assert SpillStore(spill_dir).pending() == []
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")


def test_database_and_spill_disk_full_counts_every_lost_span_with_a_log_line(tmp_path):
    """Both disks full (RLIMIT_FSIZE in the child: no file it writes may grow past 4 KiB, the
    database and its WAL included): spans are stored, spilled or counted dropped with a log
    line; afterwards the spilled ones are replayed and nothing is unaccounted for."""
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)  # the schema alone is larger than the limit: the database cannot grow
    spill_dir = tmp_path / "spill"
    # small batches fit in a spill file, batches of the even steps' large spans do not
    child = spawn(url, spill_dir, "-", fsize=4096, steps=6, calls=16, batch=8, payload=2000, timeout=0.3)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    done = [line for line in err.splitlines() if line.startswith("DONE ")]
    stats = json.loads(done[0].split()[1])
    record = tmp_path / "record.jsonl"
    record.write_text(out)
    spans, _ = read_record(record)
    assert stats["dropped"] > 0 and stats["spilled"] > 0, err  # the spill disk was full too, for large files
    assert "dropped" in err and "spill store failed" in err  # ... and every drop has its log line
    stored = stored_spans(url)
    assert stats["exported"] == sum(stored.values())
    # space is back: what was spilled is replayed, and nothing is stored twice
    replay = cli("--db", url, "replay", "--spill-dir", str(spill_dir))
    assert replay.returncode == 0, replay.stderr
    stored = stored_spans(url)
    assert set(stored) <= set(expected_keys(spans)) and set(stored.values()) == {1}
    assert len(spans) - len(stored) == stats["dropped"]


# --- kill -9 -----------------------------------------------------------------------------------------

def test_kill_9_between_batches_loses_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    upgrade(url)
    spill_dir, record = tmp_path / "spill", tmp_path / "record.jsonl"
    child = spawn(url, spill_dir, str(record), sync=1, steps=5, calls=6)
    try:
        assert child.stdout.readline().strip() == "READY"
        for number in (1, 2, 3):
            line = child.stdout.readline().split()
            assert line[:2] == ["FLUSHED", str(number)], line or child.stderr.read()
            if number < 3:
                child.stdin.write("go\n")
                child.stdin.flush()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    spans, marks = read_record(record)
    assert len(spans) == marks[-1]  # nothing ended after the last flush
    replay = cli("--db", url, "replay", "--spill-dir", str(spill_dir))
    assert replay.returncode == 0, replay.stderr
    # the workflow and phase never ended: the live DAG left them running, as a started record writes them
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db", read_started(record))


def test_kill_9_at_any_moment_loses_at_most_the_queue(tmp_path):
    """Killed at an arbitrary moment (mid-burst, mid-export, maybe mid-spill): the spans lost
    are only those not yet exported or spilled, at most the queue plus a batch in flight, and
    nothing is stored twice. A half-written spill file is cleaned up by the next replay."""
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    upgrade(url)
    spill_dir, record = tmp_path / "spill", tmp_path / "record.jsonl"
    queue, batch = 256, 32
    child = spawn(url, spill_dir, str(record), steps=400, calls=10, queue=queue, batch=batch, delay_ms=20,
                  signal_at=150)
    try:
        assert child.stdout.readline().strip() == "READY"
        assert child.stdout.readline().strip() == "AT 150", child.stderr.read()
        child.send_signal(signal.SIGKILL)  # it is still producing: killed wherever it is
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    replay = cli("--db", url, "replay", "--spill-dir", str(spill_dir))
    assert replay.returncode == 0, replay.stderr
    assert not spill_dir.exists() or not list(spill_dir.glob("*.tmp"))
    spans, _ = read_record(record)
    stored = stored_spans(url)
    assert set(stored) <= set(expected_keys(spans)) and set(stored.values()) == {1}
    assert len(spans) - len(stored) <= queue + 2 * batch


# --- several writers at once -------------------------------------------------------------------------

def _run_processes(url: str, tmp_path: Path, count: int = 4) -> list[ReadableSpan]:
    spill_dir = tmp_path / "spill"
    children = [spawn(url, spill_dir, str(tmp_path / f"record{i}.jsonl"), start=1, session="shared_session",
                      steps=6, calls=5, batch=8, delay_ms=5, timeout=10) for i in range(count)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "READY", child.stderr.read()
        for child in children:  # all start at once
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert "Traceback" not in err, err
    stats = [json.loads(out.split("DONE ", 1)[1].split()[0]) for out, _ in results]
    assert all(s["dropped"] == 0 for s in stats), stats
    spans: list[ReadableSpan] = []
    for i in range(count):
        spans.extend(read_record(tmp_path / f"record{i}.jsonl")[0])
    return spans


@pytest.mark.postgres
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-schema", "existing-session"])
def test_four_processes_write_one_session_into_postgres(tmp_path, fresh, pg_schema):
    with pg_schema() as url, pg_schema() as ref_url:
        if not fresh:  # else they also race to migrate the schema and to create the session
            for target in (url, ref_url):
                upgrade(target)
                create_session(target, "shared_session")
        spans = _run_processes(url, tmp_path)
        assert dump(url) == reference(spans, ref_url)


def test_four_processes_write_one_session_into_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    spans = _run_processes(url, tmp_path)
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")


def create_session(url: str, session_id: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, name, created_at, last_active_at, status) "
                          "VALUES (:id, :id, :t, :t, 'active')"), {"id": session_id, "t": datetime(2026, 1, 1)})
    engine.dispose()


def _write_concurrently(url: str, slices: list[list[ReadableSpan]]) -> list[BaseException]:
    """Each slice written by its own DagWriter in its own thread, all starting together."""
    writers = [DagWriter(url) for _ in slices]
    barrier = threading.Barrier(len(slices))
    errors: list[BaseException] = []

    def work(writer: DagWriter, part: list[ReadableSpan]) -> None:
        try:
            barrier.wait()
            writer.write(part, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w, part)) for w, part in zip(writers, slices, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in writers:
        writer.close()
    return errors


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_writers_of_one_run_converge(tmp_path, backend, capture, pg_schema):
    """Four writers (ingest threads, or processes behind a collector) store disjoint slices of
    the same run at once: run, session state, edges, costs and branch rows come out as one
    writer storing everything gives."""
    with workflow("shared run", mode="planning-control", session_id="s1", max_redos=2), phase("control"):
        for number in range(1, 5):
            with step(number, f"step {number}"):
                for call in range(3):
                    with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call,
                                                             "gen_ai.request.model": "m"}):
                        pass
                with redo(number, 1, hypothesis="again"), TracedSpan("chat r", "llm", {"gen_ai.request.model": "m"}):
                    pass
    spans = capture.spans
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url, ref_url = f"sqlite:///{tmp_path}/c.db", f"sqlite:///{tmp_path}/ref.db"
        else:
            url, ref_url = stack.enter_context(pg_schema()), stack.enter_context(pg_schema())
        upgrade(url)
        # the session exists already, so nothing makes the writers wait for each other before
        # they create the run and the session state
        for target in (url, ref_url):
            upgrade(target)
            create_session(target, "s1")
        for _ in range(3):
            assert _write_concurrently(url, [spans[i::4] for i in range(4)]) == []
        assert dump(url) == reference(spans, ref_url)
