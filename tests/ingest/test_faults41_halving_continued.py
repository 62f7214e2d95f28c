"""A search for the spans a database refuses, cut short, is continued by its client's retry (thirty-ninth
fault campaign; the thirty-seventh campaign's leftovers).

A chunk the database refuses is written in halves until the spans that cause it are found; the search has one
deadline (``HALVING_WAIT``), past which its request is answered 503 and its client sends it again.

* On a database that stays too slow, every retry started the search over from the whole chunk and ended at
  the same place: such a request was never stored. The search cut short is now kept (by the request body's
  digest and the chunk's number) and the retry continues it: every retry stores at least one piece.
* A stopping server did not cut a search short: a request in one took its ``HALVING_WAIT`` (and a write's
  1 s floor) inside the receivers' 5 s grace. It is now answered 503 at its next piece (its search kept).

The slow database is forced on the server's clock (``clock`` of ``test_faults40_halving_deadline``: each
write moves it on), never waited for; the stop is the server's own ``stop()`` from another thread.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel.ingest import IngestServer

from .conftest import post_json
from .test_faults40_halving_deadline import SlowRefusingWriter, clock  # noqa: F401 (a fixture)


def _request(names: list[str]) -> dict[str, Any]:
    spans = [{"traceId": secrets.token_hex(16), "spanId": secrets.token_hex(8), "name": name, "kind": 1,
              "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
             for name in names]
    return {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": spans}]}]}


def test_retries_on_a_database_that_stays_slow_continue_the_search_until_it_is_stored(
        clock: SimpleNamespace) -> None:  # noqa: F811 (the fixture)
    """Fails on 3c387d5: ten retries, each answered 503 after the same three writes; nothing stored."""
    names = [f"s{i}" for i in range(15)] + ["refused"]
    doc = _request(names)
    writer = SlowRefusingWriter(clock, per_write=2.0)  # and it stays that slow
    with IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port="off") as srv:
        answers = []
        for _ in range(10):  # an OTLP client retries a 503 (here, at once)
            status, answer = post_json(srv, doc)
            answers.append(status)
            if status != 503:
                break
        # 503 after [all 16] [s0..s7] [s8..refused]; 503 after [s8..s11] [s12..refused]; 503 after [s12 s13]
        # [s14 refused]; 200 after [s14] [refused], the refused span rejected alone
        assert answers == [503, 503, 503, 200], answers
        assert answer["partialSuccess"]["rejectedSpans"] in (1, "1"), answer
        assert sorted(writer.stored) == sorted(names[:15])  # each stored once: nothing written twice
        assert srv.spans_written == 15 and srv.unavailable_responses == 3


class StoppedMidSearch(SlowRefusingWriter):
    """A writer at the usual speed whose first piece of a search sees the server's ``stop()`` begin."""

    def __init__(self, fake_clock: SimpleNamespace, server: list[IngestServer]) -> None:
        super().__init__(fake_clock, per_write=0.0)
        self.server = server
        self.stopper: threading.Thread | None = None

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        if self.writes == 1 and self.stopper is None:  # the whole chunk failed: its search's first piece
            srv = self.server[0]
            self.stopper = threading.Thread(target=srv.stop, daemon=True)
            self.stopper.start()
            stopping = getattr(srv.core, "stopping", None)  # waited for where there is one to wait for
            if stopping is not None:
                assert stopping.wait(60), "the stop did not begin"
        super().write(spans)


def test_a_stopping_server_answers_a_search_503_at_its_next_piece_and_the_retry_continues_it(
        clock: SimpleNamespace) -> None:  # noqa: F811 (the fixture)
    """Fails on 3c387d5: the request went on with its search through the stop (answered 200 after 9 writes)."""
    names = [f"s{i}" for i in range(15)] + ["refused"]
    doc = _request(names)
    server: list[IngestServer] = []
    writer = StoppedMidSearch(clock, server)
    srv = IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port="off")
    server.append(srv)
    with srv:
        status, _ = post_json(srv, doc)
        assert writer.stopper is not None
        writer.stopper.join(60)
        assert not writer.stopper.is_alive()
        # the whole chunk (refused), then [s0..s7] (its write had begun: stored): the next piece is not written
        assert (status, writer.writes, writer.stored) == (503, 2, names[:8]), (status, writer.writes)
        srv.start()  # served again (the same process): the client's retry continues the search
        status, answer = post_json(srv, doc)
        assert status == 200 and answer["partialSuccess"]["rejectedSpans"] in (1, "1"), answer
        assert sorted(writer.stored) == sorted(names[:15]) and srv.spans_written == 15
