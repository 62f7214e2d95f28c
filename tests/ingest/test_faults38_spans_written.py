"""``spans_written`` counts each stored span of a request once (leftover (4) of the 36th fault campaign).

The ingest counted the spans at each write: a request whose chunk or halving piece was answered 503
after other pieces of it were stored is sent again whole by its client, and the pieces stored the first
time were counted again. The count is now taken per request answered: a request answered 503 counts
nothing, its retry counts what it stores.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel.dag.writer import DatabaseUnavailable
from cmbagent_otel.ingest import IngestServer

from .conftest import post_json


class LockedOnceWriter:
    """An application's own writer (``IngestServer(writer=...)``): refuses spans named ``refused`` and
    reports the database unavailable the first time it is given the span named ``late``."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.locked = True

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        names = [s.name for s in spans]
        if "refused" in names:
            raise ValueError("cannot store a span named refused")
        if "late" in names and self.locked:
            self.locked = False
            raise DatabaseUnavailable("database is locked")
        self.stored.extend(names)


def test_a_request_retried_after_a_503_in_the_halving_is_counted_once() -> None:
    spans = [{"traceId": secrets.token_hex(16), "spanId": secrets.token_hex(8), "name": name, "kind": 1,
              "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"}
             for name in ("early", "other", "refused", "late")]
    doc = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "js"}, "spans": spans}]}]}
    writer = LockedOnceWriter()
    with IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port="off") as srv:
        # the four fail together (refused); [early, other] stored; [refused, late] fails and is halved:
        # [refused] fails, [late] is answered unavailable: 503 with two spans stored
        first, _ = post_json(srv, doc)
        assert first == 503 and writer.stored == ["early", "other"]
        assert srv.spans_written == 0  # answered 503: the client sends it again
        second, answer = post_json(srv, doc)  # the client's retry
        assert second == 200 and answer["partialSuccess"]["rejectedSpans"] in (1, "1"), answer
        # the retry continues the search where the 503 left it (session 41): only [late] is written again
        assert writer.stored == ["early", "other", "late"]
        assert srv.spans_written == 3  # early, other, late: 5 on main (early and other counted twice)
