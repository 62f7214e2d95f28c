"""More requests stuck in a search for refused spans than the server keeps searches for (fortieth fault campaign:
session 41's resumable halving, under many clients).

A search cut short by its deadline is kept for its client's retry (``KEPT_SEARCHES``, 16): the retry goes on
from there. The 17th request stuck at once evicted the least recently kept search; retried in turn, as OTLP
clients do, every request found its search evicted by another's, started over from the whole chunk and ended
where it did before: none was ever stored, however often retried, and the clients dropped the spans at their
last retry. A full table now keeps the searches it holds while their clients still retry them (not evicted
before ``KEPT_SEARCH_AGE_S``); the request that finds no room starts over until one is done. Memory stays
bounded by ``KEPT_SEARCHES`` chunks' positions.

The slow database is forced on the server's clock (``clock`` of ``test_faults40_halving_deadline``).
"""

from __future__ import annotations

from types import SimpleNamespace

import cmbagent_otel._ingest_core as ingest_core
from cmbagent_otel.ingest import IngestServer

from .conftest import post_json
from .test_faults40_halving_deadline import SlowRefusingWriter, clock  # noqa: F401 (a fixture)
from .test_faults41_halving_continued import _request

ROUNDS = 12  # alone, each request is stored at its 4th try; the one left without room at first by the 8th


def test_more_stuck_requests_than_kept_searches_are_all_stored(clock: SimpleNamespace) -> None:  # noqa: F811
    """Fails on 4a0d79e: after 12 rounds of retries none of the 17 requests was stored (all 503)."""
    docs = [_request([f"r{r}s{i}" for i in range(15)] + ["refused"]) for r in range(ingest_core.KEPT_SEARCHES + 1)]
    writer = SlowRefusingWriter(clock, per_write=2.0)  # and it stays that slow
    answers: dict[int, list[int]] = {r: [] for r in range(len(docs))}
    with IngestServer(writer=writer, host="127.0.0.1", port=0, grpc_port="off") as srv:
        for _ in range(ROUNDS):  # each client retries its 503 in turn
            for r, doc in enumerate(docs):
                if answers[r][-1:] != [200]:
                    answers[r].append(post_json(srv, doc)[0])
    assert {r: a[-1] for r, a in answers.items()} == {r: 200 for r in answers}, answers
    # a request that started over wrote its first pieces again (idempotent in a real database)
    assert set(writer.stored) == {f"r{r}s{i}" for r in range(len(docs)) for i in range(15)}
    assert srv.spans_written == 15 * len(docs)
