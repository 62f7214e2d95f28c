"""A client with many addresses cannot keep the OTLP receivers full.

The per-address caps (requests in flight, connections) stop one address; an attacker with
many (a /64 of IPv6, a botnet; here 64 loopback addresses) could still open uvicorn's whole
``limit_concurrency`` worth of connections and send nothing, and every other client got
uvicorn's 503 until the header deadline (30 s by default) closed them, again and again. A
connection arriving at the cap now closes the one that has waited longest for its request
headers; requests being read or answered are never closed.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from cmbagent_otel.ingest import MAX_CONNECTIONS, MAX_GRPC_REQUESTS, IngestServer

from .test_ingest_slow_clients import (
    EXPORT,
    WAIT,
    _stalled_call,
    connect,
    patient,
    pb_body,
    post,
    stored,
    wait_in_flight,
)

__all__ = ["patient"]  # the fixture


def test_idle_connections_from_many_addresses_do_not_lock_others_out(patient: tuple[IngestServer, Path]) -> None:
    srv, db = patient
    assert srv.port is not None
    per_address = 16  # the patient server's cap: 8 connections x 2 requests in flight
    addresses = [f"127.0.{1 + i // 200}.{1 + i % 200}" for i in range(MAX_CONNECTIONS // per_address)]
    with ExitStack() as stack:
        idle: list[socket.socket] = []
        for address in addresses:
            for _ in range(per_address):
                sock = connect(srv.port, address)  # connected, never sends a byte
                stack.callback(sock.close)
                idle.append(sock)
        assert len(idle) == MAX_CONNECTIONS
        body, trace_id = pb_body()
        status, _, reply = post(srv.port, body)  # before: uvicorn's 503 while the idle ones stayed
        assert status == 200, reply
        assert trace_id in stored(db)
        # the oldest idle connections made room: the server closed them (EOF), none was reset
        idle[0].settimeout(60)
        assert idle[0].recv(1) == b""
    wait_in_flight(srv.port, 0)


def _sent_while_refused_as_busy(channel: grpc.Channel, body: bytes) -> bytes:
    """``body`` exported, sent again while grpcio answers RESOURCE_EXHAUSTED (as an OTLP exporter retries it):
    a call it has cancelled may still count against its limit for a moment on a busy machine. No pause
    between attempts: each waits for a round trip, and the attempts end with the first call's deadline."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return channel.unary_unary(EXPORT)(body, timeout=max(deadline - time.monotonic(), 0.1))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() >= deadline:
                raise


def test_grpc_calls_that_never_send_cannot_fill_the_receiver(tmp_path: Path) -> None:
    """gRPC: grpcio turns calls away (RESOURCE_EXHAUSTED) once MAX_GRPC_REQUESTS are in flight.
    Calls that never send their message (one address here, allowed all of them; in the wild
    many addresses under their own caps) held every place until the deadline. A call arriving
    when the receiver's waiting room is full now cancels the oldest waiting one."""
    release = threading.Event()
    db = tmp_path / "grpc.db"
    with IngestServer(f"sqlite:///{db}", port=0, grpc_port=0, request_timeout=600, workers=1,
                      max_requests_per_client=MAX_GRPC_REQUESTS) as srv, \
            grpc.insecure_channel(srv.grpc_endpoint) as channel:
        assert srv.port is not None
        room = MAX_GRPC_REQUESTS - 3  # the waiting room of a 1-worker receiver
        stalled = []
        try:
            ended: queue.Queue[grpc.Future] = queue.Queue()
            stalled.extend(_stalled_call(channel, release) for _ in range(MAX_GRPC_REQUESTS))
            for call in stalled:
                call.add_done_callback(ended.put)
            wait_in_flight(srv.port, room)  # before: all 64 stayed
            # the three oldest at the server (not always the first three sent) are cancelled as the last
            # three come in, and the fourth as the new call comes in; grpcio counts a cancelled call as
            # in flight until it has ended, so the new call goes once the first three have (a call not
            # cancelled ends at its deadline, 600 s)
            first = [ended.get(timeout=2 * WAIT) for _ in range(3)]
            body, trace_id = pb_body()
            with grpc.insecure_channel(srv.grpc_endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                reply = _sent_while_refused_as_busy(other, body)  # before: RESOURCE_EXHAUSTED until 600 s
            assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
            assert trace_id in stored(db)
            first.append(ended.get(timeout=2 * WAIT))  # its end may reach this client after the reply
            assert [call.exception().code() for call in first] == [grpc.StatusCode.CANCELLED] * 4
            assert sum(call.done() for call in stalled) == 4
        finally:
            release.set()
            for call in stalled:
                call.cancel()
