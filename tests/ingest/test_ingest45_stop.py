"""The gRPC receiver's stop and the calls it meets (session 45), in process: a call that reaches the
service once the stop has begun must be refused (UNAVAILABLE: its client sends it again), never answered
OK with nothing stored."""

from __future__ import annotations

import threading
from types import FrameType
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from cmbagent_otel._ingest_grpc import TraceService
from tests.ingest.test_ingest43_lifecycle import server_for, spans

WAIT = 60.0
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def test_a_call_reaching_the_service_as_the_stop_begins_is_refused_not_dropped(sqlite_url: str) -> None:
    """The call's thread is held (a profile hook, as a busy machine holds it) as it enters
    TraceService._receive, until the stop has cancelled the calls waiting for their message; grpcio's grace
    still lets it run. It found the service stopping and returned an empty answer: the client got OK and
    the spans were never stored."""
    arrived, cancelled, proceed = threading.Event(), threading.Event(), threading.Event()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is TraceService._receive.__code__ and not arrived.is_set():
            arrived.set()
            proceed.wait(WAIT)
        elif event == "return" and frame.f_code is TraceService.cancel_waiting.__code__:
            cancelled.set()

    server = server_for(sqlite_url).start()
    threading.setprofile(hook)  # the threads started from now on: grpcio's call threads, the stopper
    try:
        with grpc.insecure_channel(server.grpc_endpoint) as channel:
            call = channel.unary_unary(EXPORT).future(encode_spans(spans()).SerializeToString(), timeout=WAIT)
            assert arrived.wait(WAIT)
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            assert cancelled.wait(WAIT)
            proceed.set()
            with pytest.raises(grpc.RpcError) as info:
                call.result(WAIT)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            stopper.join(WAIT)
            assert not stopper.is_alive()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        proceed.set()
        server.stop()
    assert server.spans_written == 0
