"""A process forked while another thread holds one of our locks must not deadlock.

``fork()`` copies the memory of every lock but only the calling thread: a lock another
thread held at that moment stays held in the child, by nobody, for ever. The DAG exporter
holds its lock for a whole export (up to its deadline while the database is locked), so a
multiprocessing child forked during a slow export hung at its first export or flush; the
redaction lock (taken when a secret is learned, from the application's threads and the
export thread) would hang the child's application thread itself. Locks that every thread
may take are made again in a forked child, as the standard library does for its own.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import create_engine, text

from cmbagent_otel import redaction
from cmbagent_otel.processor import DurableBatchSpanProcessor

HANG_GUARD_S = 60  # a child still running after this long is stuck: the test fails instead of hanging


def wait_child(pid: int) -> int:
    """The child's exit code; kills it and returns -1 when it hangs (never a timing assertion:
    the child needs well under a second)."""
    end = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.postgres
def test_child_forked_during_a_slow_export_exports_its_own_spans(tmp_path: Path, pg_url: str) -> None:
    # PostgreSQL: a SQLite connection inherited in the middle of a transaction keeps the
    # child's new connections out of that file (SQLite's own fork rule; see docs/reliability.md)
    exporter = DagSpanExporter(pg_url, spill_dir=tmp_path / "spill", timeout=60)
    processor = DurableBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    tracer.start_span("schema first").end()
    assert provider.force_flush()

    engine = create_engine(pg_url)
    blocker = engine.connect()
    blocker.execute(text("LOCK TABLE execution_events IN ACCESS EXCLUSIVE MODE"))
    tracer.start_span("parent, slow").end()
    flusher = threading.Thread(target=provider.force_flush)
    flusher.start()
    # the export waits for the lock (holding the exporter's lock) once the server says so; this
    # table's lock only: the server is shared (other suites' backends may wait on locks of their own)
    while not blocker.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                   "AND relation = 'execution_events'::regclass")).scalar():
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            tracer.start_span("child").end()
            code = 0 if provider.force_flush() and exporter.stats()["spilled"] == 0 else 2
        finally:
            os._exit(code)
    blocker.rollback()  # the parent's export goes through; the child's must too
    blocker.close()
    engine.dispose()
    try:
        assert wait_child(pid) == 0
    finally:
        flusher.join()
        provider.shutdown()
    assert exporter.stats()["dropped"] == 0 and exporter.stats()["spilled"] == 0
    assert {name for name, in _names(pg_url)} >= {"schema first", "parent, slow", "child"}


def _names(url: str) -> list[tuple[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [(json.loads(m)["span_name"],) if isinstance(m, str) else (m["span_name"],)
                    for m, in conn.execute(text("SELECT meta FROM execution_events"))]
    finally:
        engine.dispose()


def test_child_forked_while_a_secret_is_being_learned_can_redact(tmp_path: Path) -> None:
    held = threading.Event()
    release = threading.Event()

    def learner() -> None:  # another thread of the app inside the redaction lock at fork time
        with redaction._lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=learner)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            redaction.learn_secret("child-learned-secret-value")
            code = 0 if "child-learned-secret-value" not in (redaction.redact("x child-learned-secret-value") or "") \
                else 2
        finally:
            os._exit(code)
    try:
        assert wait_child(pid) == 0
    finally:
        release.set()
        thread.join()
