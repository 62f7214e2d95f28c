"""The ingest's first request while the start's schema check waits for the SQLite folder's lock (session 40,
second round; a leftover of the thirty-seventh campaign).

``IngestServer.start()`` checks the schema in a background thread, bounded to ``STARTUP_PREPARE_S`` (10 s).
A new SQLite file is created under the ``flock`` of its folder, which any process that can list the folder can
hold. The check waited for it inside ``DagWriter.engine``, holding the writer's own lock, and the first request
waited for that lock with no bound of its own: answered 503 only when the check gave up, 10 s later, the
OTLP exporters' default timeout (the batch dropped, not retried). Decided: a request waits for the database
no longer than its own ``WRITE_WAIT`` (3 s), then 503 and Retry-After, as every later request; not 503 at
once while the check runs (a PostgreSQL schema check takes a second or two at a start, the first requests
would be refused for nothing). The engine is now made outside the writer's lock.

The lock is a real ``flock`` held by this process (an open file description of its own); the check's bound
is made long, so while the lock is held the check is still waiting, whatever the machine's speed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import cmbagent_otel._ingest_core as ingest_core
from cmbagent_otel.dag.database import BUSY_TIMEOUT_ENV
from cmbagent_otel.ingest import IngestServer
from tests.ingest.conftest import post_json

from .conftest import folder_locked, stored_spans
from .test_faults34_interleavings import audit_actions, flock_tried_by  # noqa: F401 (a fixture)

HANG_S = 120  # a hang guard: every wait below ends long before unless the code hangs


def _span_doc() -> dict[str, object]:
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "s", "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
    return {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "t"}, "spans": [span]}]}]}


@pytest.mark.usefixtures("audit_actions")
def test_the_first_request_is_answered_while_the_start_check_waits_for_the_folder_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on ad3b5cf: the request is not answered while the check waits (the client's 60 s timeout)."""
    monkeypatch.setattr(ingest_core, "STARTUP_PREPARE_S", 600.0)  # the check waits as long as the lock is held
    monkeypatch.setenv(BUSY_TIMEOUT_ENV, "600000")
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    server = IngestServer(url, host="127.0.0.1", port=0, grpc_port="off")
    try:
        with folder_locked(tmp_path):
            server.start()
            check = server.core._startup
            assert isinstance(check, threading.Thread)
            # the check retries the lock until its bound: its next try shows it is waiting there
            assert flock_tried_by(check).wait(HANG_S), "the start's check never tried the folder's lock"
            status, answer = post_json(server, _span_doc())
            assert status == 503, (status, answer)  # retryable, within the request's own WRITE_WAIT
            assert check.is_alive()  # answered while the check still waits, not when it gave up
        assert server.core.startup_error() is None  # the lock let go: the check made the schema
        status, answer = post_json(server, _span_doc())
        assert status == 200, (status, answer)
    finally:
        server.stop()
    assert stored_spans(url)[("ab" * 16, "cd" * 8)]
