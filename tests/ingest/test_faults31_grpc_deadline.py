"""Thirty-first fault campaign: a gRPC call whose client deadline passed is not stored afterwards.

A gRPC call whose message had arrived waited for one of the receiver's ``workers`` without any limit.
When every worker was busy (a long write) past the call's deadline, its client got DEADLINE_EXCEEDED
and sent the batch again (OTLP exporters retry it) or counted it lost, yet the receiver stored the
first copy as soon as a worker was free: each batch twice, or "lost" data that was stored. The wait
for a worker now ends at the call's deadline, and a call no longer active (deadline passed, cancelled
by its client) when it gets a worker is not stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from cmbagent_otel.ingest import IngestServer

from .test_ingest_slow_clients import EXPORT, WAIT, pb_body, stored, wait_in_flight


def _until(condition: Callable[[], bool], limit: float = WAIT) -> bool:
    """Whether ``condition`` held within ``limit`` seconds (polled)."""
    end = time.monotonic() + limit
    pause = threading.Event()  # never set: a bounded pause between polls
    while not condition():
        if time.monotonic() > end:
            return False
        pause.wait(0.01)
    return True


def test_a_grpc_call_whose_deadline_passed_waiting_for_a_worker_is_not_stored(tmp_path: Path) -> None:
    """The one worker is held (as a long write holds it) while a call waits for it past its deadline.
    The case is forced, not hoped for: a call whose message the server had not yet received when its
    deadline passed (a loaded machine) is tried again with a longer deadline, so the assertion is only
    made on a call that did wait for a worker. Fails on 5bc025a with ``(False, True)``: the call still
    waiting at the bound, then stored once the worker was free."""
    db = tmp_path / "g.db"
    with IngestServer(f"sqlite:///{db}", port=0, grpc_port=0, request_timeout=600, workers=1) as srv, \
            grpc.insecure_channel(srv.grpc_endpoint) as channel:
        assert srv.port is not None
        export = channel.unary_unary(EXPORT)
        first, first_trace = pb_body()
        export(first, timeout=WAIT)  # the schema made, a call stored
        assert first_trace in stored(db)
        workers = srv._grpc._service._workers  # the receiver's worker places: the one there is, taken
        workers.acquire()
        try:
            deadline = 1.0
            while True:
                assert _until(lambda: srv.core.pending == 0)  # an earlier attempt's call is gone
                expired = srv.core.expired_calls
                body, trace_id = pb_body()
                call = export.future(body, timeout=deadline)
                waited = _until(lambda: srv.core.pending == 1 or call.done())  # noqa: B023 (used at once)
                if waited and srv.core.pending == 1:
                    break  # the server has the message and waits for the worker
                assert call.exception() is not None and call.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert deadline < 64, "the server never received a message before its deadline"
                deadline *= 2
            code = call.exception(timeout=WAIT).code()  # type: ignore[union-attr]
            given_up = _until(lambda: srv.core.pending == 0)
        finally:
            workers.release()
        wait_in_flight(srv.port, 0)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (given_up, trace_id in stored(db)) == (True, False)
        assert srv.core.expired_calls == expired + 1
        # the client's retry is stored, once
        reply = export(body, timeout=WAIT)
        assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
        assert trace_id in stored(db)
