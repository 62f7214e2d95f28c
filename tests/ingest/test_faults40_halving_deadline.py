"""The search for the spans a database refuses has one deadline (thirty-seventh fault campaign; the
thirty-sixth campaign's Left (3)).

A chunk the database refuses is written in halves until the spans that cause it are found (~20 writes
for 1,000 spans with one such span). Each piece had a ``WRITE_WAIT`` (3 s) of its own: on a slow database
a request took as long as all its pieces together, past the OTLP exporters' 10 s (the client gave up and
sent it again while it was still being written) and a stopping server's 5 s grace. The halving now ends
within ``HALVING_WAIT`` of its start; past it the request is answered 503 and its client retries it.

The slow database is forced on the server's clock, not waited for: every write of the writer moves the
clock of ``cmbagent_otel._ingest_core`` on by 2 s (a database taking 2 s per transaction).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel import _ingest_core
from cmbagent_otel.ingest import IngestServer

from .conftest import post_json


class SlowRefusingWriter:
    """An application's own writer (``IngestServer(writer=...)``) on a slow database: each write takes
    ``per_write`` seconds of the server's clock, and a batch holding the span named ``refused`` fails."""

    def __init__(self, clock: SimpleNamespace, per_write: float) -> None:
        self.clock = clock
        self.per_write = per_write
        self.writes = 0
        self.stored: list[str] = []

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        self.writes += 1
        self.clock.offset += self.per_write
        names = [s.name for s in spans]
        if "refused" in names:
            raise ValueError("cannot store a span named refused")
        self.stored.extend(names)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The ingest core's ``time``: the real one, ``offset`` seconds ahead (never behind: the HTTP side's
    times, taken on the real clock, stay in the past)."""
    fake = SimpleNamespace(offset=0.0)
    fake.monotonic = lambda: time.monotonic() + fake.offset
    monkeypatch.setattr(_ingest_core, "time", fake)
    return fake


def test_a_slow_database_ends_the_halving_at_its_deadline_and_the_retry_stores(clock: SimpleNamespace) -> None:
    names = [f"s{i}" for i in range(15)] + ["refused"]
    spans = [{"traceId": secrets.token_hex(16), "spanId": secrets.token_hex(8), "name": name, "kind": 1,
              "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
             for name in names]
    doc = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": spans}]}]}
    writer = SlowRefusingWriter(clock, per_write=2.0)
    with IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port="off") as srv:
        status, _ = post_json(srv, doc)
        # the 16 together (2 s, refused), then [s0..s7] (2 s, stored), [s8..refused] (2 s, refused): 4 s of
        # halving, past HALVING_WAIT. On main 86547de: 200 after 9 writes, 18 s on the server's clock
        assert (status, writer.writes) == (503, 3), (status, writer.writes, clock.offset)
        assert clock.offset <= _ingest_core.WRITE_WAIT + 1.0 + _ingest_core.HALVING_WAIT + 1.0
        assert writer.stored == names[:8]
        assert srv.spans_written == 0 and srv.unavailable_responses == 1
        writer.per_write = 0.0  # the database answers at its usual speed again: the client's retry
        status, answer = post_json(srv, doc)
        assert status == 200 and answer["partialSuccess"]["rejectedSpans"] in (1, "1"), answer
        # the retry continues the search (session 41): s0..s7, stored by the request answered 503, are not
        # written again, and count for the request answered 200
        assert sorted(writer.stored[8:]) == sorted(names[8:15]) and srv.spans_written == 15
