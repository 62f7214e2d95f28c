"""The ingest server's start-time schema check under a database that hangs, then answers again
(thirty-sixth fault campaign).

``IngestServer.start()`` checks the schema in the background, bounded to ``STARTUP_PREPARE_S``
(10 s): that check holds the schema lock, so requests wait for it and are answered 503 while it
lasts. ``cmbagent-otel ingest`` ran a second check of its own at its start (to name a database
it cannot write), bounded to 30 s: it took the lock when the first let go, and a connection
attempt of it that hung kept every request at 503 for the rest of its 30 s, while the database
answered again (on main d1ab575). The CLI now reports what the start's own check found.

The relay (:mod:`.relay`) holds the connection attempts (no answer, no reset) and then
forgets them: new connections reach the real PostgreSQL, those begun before stay silent.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy.engine import make_url

import cmbagent_otel._ingest_core as ingest_core
from cmbagent_otel.cli.ingest import _check_database
from cmbagent_otel.dag.database import redacted, storable_url
from cmbagent_otel.ingest import IngestServer
from tests.ingest.conftest import post_json

from .relay import Relay

pytestmark = pytest.mark.postgres

HANG_S = 120  # a hang guard: every wait below ends long before unless the code hangs


def _wait_for(condition: object, what: str) -> None:
    end = time.monotonic() + HANG_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            pytest.fail(f"still waiting for {what} after {HANG_S} s")
        time.sleep(0.01)


def _span_doc() -> dict[str, object]:
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "s", "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
    return {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "t"}, "spans": [span]}]}]}


def test_a_database_answering_again_is_written_once_the_start_check_gives_up(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ingest_core, "STARTUP_PREPARE_S", 2.0)  # the bound under test, made short
    parsed = make_url(pg_url)
    with Relay((parsed.host or "127.0.0.1", parsed.port or 5432)) as relay:
        relay.freeze()
        url = parsed.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        caplog.set_level(logging.WARNING, logger="cmbagent_otel.ingest")
        with IngestServer(url, host="127.0.0.1", port=0, grpc_port="off") as srv:
            # what `cmbagent-otel ingest` runs next to the server's start
            check = threading.Thread(target=_check_database, args=(srv, redacted(storable_url(url))), daemon=True)
            check.start()
            start_check = [t for t in threading.enumerate() if t.name == "cmbagent-otel-schema"]
            for thread in start_check:
                thread.join(HANG_S)
            assert not any(t.is_alive() for t in start_check), "the start's check outlived its bound"
            # the CLI's check is over, or has an attempt of its own in flight (main d1ab575)
            _wait_for(lambda: not check.is_alive() or relay.accepted >= 2, "the CLI's check")
            relay.forget()  # the database answers again; attempts begun before stay silent
            status, answer = post_json(srv, _span_doc())
            assert status == 200, (status, answer)  # 503 on d1ab575 for the rest of the CLI's 30 s
        check.join(HANG_S)
        assert not check.is_alive()
    lines = [r.getMessage() for r in caplog.records if "cannot write to" in r.getMessage()]
    # the database is still named at the start, with the reason its check met
    assert len(lines) == 1 and f"127.0.0.1:{relay.port}" in lines[0] and "503" in lines[0], lines
