"""Slow and stalling clients against the ingest server over real loopback sockets: a client
that drips its request (headers or body, HTTP or gRPC) is answered or cut off at the
request deadline, holds no memory for what it has not sent, cannot take every place from
one address, and never keeps others from being served; stopping the server with such
clients connected is quiet and quick."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from cmbagent_otel.ingest import IngestServer

from .conftest import IngestProcess, finished, main_thread_asleep, sigterm_onto_a_grpc_thread

MiB = 1 << 20
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
WAIT = 60.0  # bound of every wait for the server (generous: the machine is shared)

_trace_ids = iter(range(1, 1 << 60))


def pb_body(spans: int = 2) -> tuple[bytes, str]:
    """A protobuf request of ``spans`` spans of a fresh trace, and that trace's id in hex."""
    trace_id = next(_trace_ids) << 64 | 0x5107
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = trace_id.to_bytes(16, "big")
        span.span_id = (i + 1).to_bytes(8, "big")
        span.name = f"slow-client span {i}"
        span.start_time_unix_nano, span.end_time_unix_nano = 1_000_000_000, 2_000_000_000
    return request.SerializeToString(), f"{trace_id:032x}"


def head(length: int, path: str = "/v1/traces") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` (any 127.0.0.0/8 address is loopback: a distinct client)."""
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One response (status, headers, body), or None when the server closed without one."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        raw_head, _, body = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return None
    return int(lines[0].split()[1]), headers, body


def post(port: int, body: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    with connect(port, source) as sock:
        sock.sendall(head(len(body)) + body)
        response = read_response(sock)
    assert response is not None, "no response"
    return response


def health(port: int) -> dict[str, int]:
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(sock)
    assert response is not None and response[0] == 200
    return json.loads(response[2])  # type: ignore[no-any-return]


def wait_in_flight(port: int, count: int) -> dict[str, int]:
    """Poll /health until ``count`` requests are in flight (at most WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    pause = threading.Event()  # never set: a bounded pause between polls
    while True:
        state = health(port)
        if state["in_flight"] == count:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"in_flight never reached {count}: {state}")
        pause.wait(0.01)


def stored(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {json.loads(m)["trace_id"] for (m,) in conn.execute("select meta from execution_events")}


class Dripper:
    """A client that sends a request head promising ``length`` bytes, then some body bytes, then stalls."""

    def __init__(self, port: int, source: str = "127.0.0.1", length: int = 16 * MiB, sent: bytes = b"\x0a") -> None:
        self.sock = connect(port, source)
        self.sock.sendall(head(length) + sent)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[tuple[IngestServer, Path]]:
    """A server whose deadlines are long: what drippers hold while others are served."""
    db = tmp_path / "patient.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port=0, request_timeout=600,
                      max_requests_per_client=2) as srv:
        yield srv, db


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[tuple[IngestServer, Path]]:
    """A server with a 1 s request deadline."""
    db = tmp_path / "strict.db"
    with IngestServer(f"sqlite:///{db}", host="127.0.0.1", port=0, grpc_port=0, request_timeout=1,
                      min_rate=1 << 30) as srv:
        yield srv, db


def test_drippers_from_many_addresses_hold_no_memory_and_block_nobody(patient: tuple[IngestServer, Path]) -> None:
    """Eight clients (four addresses) each promise 16 MiB and send one byte: before, four of
    them took every place (and, at 32 MiB reserved each, the whole memory budget)."""
    srv, db = patient
    assert srv.port is not None
    with ExitStack() as stack:
        for i in range(8):
            stack.callback(Dripper(srv.port, f"127.0.0.{10 + i // 2}").close)
        state = wait_in_flight(srv.port, 8)
        assert state["memory_reserved"] < MiB, state  # what arrived, not what was promised
        body, trace_id = pb_body()
        status, _, reply = post(srv.port, body)
        assert status == 200, reply
        assert trace_id in stored(db)
        assert health(srv.port)["in_flight"] == 8  # the drippers are still there
    wait_in_flight(srv.port, 0)  # their hang-ups free every place and byte
    assert health(srv.port)["memory_reserved"] == 0


def test_one_address_gets_a_capped_number_of_places(patient: tuple[IngestServer, Path]) -> None:
    srv, db = patient
    assert srv.port is not None
    with ExitStack() as stack:
        for _ in range(2):
            stack.callback(Dripper(srv.port, "127.0.0.20").close)
        wait_in_flight(srv.port, 2)
        body, trace_id = pb_body()
        status, headers, reply = post(srv.port, body, "127.0.0.20")
        assert status == 503 and headers["retry-after"], reply
        assert b"2 requests from 127.0.0.20 in flight" in reply
        status, _, _ = post(srv.port, body, "127.0.0.21")  # another client is served
        assert status == 200 and trace_id in stored(db)


def test_one_address_gets_a_capped_number_of_connections(patient: tuple[IngestServer, Path]) -> None:
    """8 connections per request place (2 here): the 17th idle connection is closed at once."""
    srv, _ = patient
    assert srv.port is not None
    with ExitStack() as stack:
        for _ in range(16):
            stack.enter_context(connect(srv.port, "127.0.0.30"))
        with connect(srv.port, "127.0.0.30") as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(extra) is None
        assert health(srv.port)["status"] == "ok"  # from another address


def test_a_dripping_body_is_answered_408_at_the_deadline(strict: tuple[IngestServer, Path]) -> None:
    """One byte now and then (before, each byte restarted a 30 s idle timeout for ever)."""
    srv, db = strict
    assert srv.port is not None
    dripper = Dripper(srv.port)
    try:
        dripper.sock.settimeout(0.2)
        response = None
        for _ in range(int(WAIT / 0.2)):  # a byte every 0.2 s until the server answers
            try:
                response = read_response(dripper.sock)
                break
            except TimeoutError:
                dripper.sock.sendall(b"\x00")
        assert response is not None and response[0] == 408, response
        assert b"too slow" in response[2]
    finally:
        dripper.close()
    wait_in_flight(srv.port, 0)
    assert health(srv.port)["memory_reserved"] == 0
    body, trace_id = pb_body()
    assert post(srv.port, body)[0] == 200 and trace_id in stored(db)


def test_headers_that_never_end_are_cut_at_the_deadline(strict: tuple[IngestServer, Path]) -> None:
    srv, _ = strict
    assert srv.port is not None
    for opening in (b"", b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"):  # an idle connection, half a head
        with connect(srv.port) as sock:
            sock.sendall(opening)
            assert read_response(sock) is None  # closed by the server, within WAIT


def test_keep_alive_connection_is_served_again_after_the_header_deadline_was_rearmed(
        strict: tuple[IngestServer, Path]) -> None:
    """A connection that sends its next request promptly is served on the same socket."""
    srv, db = strict
    assert srv.port is not None
    with connect(srv.port) as sock:
        for _ in range(3):
            body, trace_id = pb_body()
            sock.sendall(head(len(body)) + body)
            response = read_response(sock)
            assert response is not None and response[0] == 200
            assert trace_id in stored(db)


def _stalled_call(channel: grpc.Channel, release: threading.Event) -> grpc.Future:
    """A gRPC Export call whose message never comes (until ``release``)."""
    def never() -> Iterator[bytes]:
        release.wait()
        return
        yield b""  # a generator that yields nothing

    return channel.stream_unary(EXPORT).future(never(), timeout=WAIT)


def test_stalled_grpc_calls_are_cancelled_and_block_nobody(tmp_path: Path) -> None:
    """Before, the server gave each call one of ``workers`` threads waiting for its message
    for ever: two stalled calls stopped the gRPC receiver."""
    db = tmp_path / "grpc.db"
    release = threading.Event()
    with IngestServer(f"sqlite:///{db}", port=0, grpc_port=0, request_timeout=600, workers=1,
                      max_requests_per_client=4) as srv, grpc.insecure_channel(srv.grpc_endpoint) as channel:
        assert srv.port is not None
        stalled = [_stalled_call(channel, release) for _ in range(3)]
        try:
            wait_in_flight(srv.port, 3)
            export = channel.unary_unary(EXPORT)
            body, trace_id = pb_body()
            reply = export(body, timeout=WAIT)
            assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
            assert trace_id in stored(db)
            stalled.append(_stalled_call(channel, release))
            wait_in_flight(srv.port, 4)
            # a fifth call from this address, on a connection of its own (on the first one it
            # would wait for one of the 4 streams a connection may have), is one too many
            with grpc.insecure_channel(srv.grpc_endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as other, \
                    pytest.raises(grpc.RpcError) as info:
                other.unary_unary(EXPORT)(body, timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "4 requests from 127.0.0.1" in (info.value.details() or "")
        finally:
            release.set()
            for call in stalled:
                call.cancel()


def test_a_stalled_grpc_call_is_cancelled_at_the_deadline(tmp_path: Path) -> None:
    release = threading.Event()
    with IngestServer(f"sqlite:///{tmp_path / 'g.db'}", port=0, grpc_port=0, request_timeout=1) as srv, \
            grpc.insecure_channel(srv.grpc_endpoint) as channel:
        assert srv.port is not None
        call = _stalled_call(channel, release)
        try:
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        finally:
            release.set()
        assert wait_in_flight(srv.port, 0)["memory_reserved"] == 0


def test_stop_with_stalled_clients_is_quiet_and_prompt(tmp_path: Path) -> None:
    """SIGTERM with an HTTP body and a gRPC message still arriving (default 30 s deadline):
    the HTTP client is answered 503 (retry), nothing is logged, the process exits 0 well
    before any deadline. Before, uvicorn waited 5 s, cancelled the request and printed
    "Exception in ASGI application" with a CancelledError traceback."""
    proc = IngestProcess(f"sqlite:///{tmp_path / 'stop.db'}")
    release = threading.Event()
    dripper = Dripper(proc.port)
    channel = grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}")
    try:
        call = _stalled_call(channel, release)
        wait_in_flight(proc.port, 2)
        code, out, err = proc.stop()
        response = read_response(dripper.sock)
        assert response is None or (response[0] == 503 and b"stopping" in response[2]), response
        with pytest.raises(grpc.RpcError):
            call.result(timeout=WAIT)
    finally:
        release.set()
        dripper.close()
        channel.close()
    assert code == 0, err
    assert "stopped after" in out
    for noise in ("Traceback", "Exception in ASGI", "CancelledError", "Cancel ", "ERROR"):
        assert noise not in err, err[-3000:]


def test_the_operator_sets_the_limits_in_the_environment(tmp_path: Path) -> None:
    """``cmbagent-otel ingest`` reads the request timeout from its environment."""
    proc = IngestProcess(f"sqlite:///{tmp_path / 'env.db'}", env={"CMBAGENT_OTEL_INGEST_REQUEST_TIMEOUT": "1"})
    try:
        with connect(proc.port) as sock:
            sock.settimeout(20)  # far more than 1 s, less than the default 30 s
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\n")
            assert read_response(sock) is None  # headers cut off at 1 s
        dripper = Dripper(proc.port, "127.0.0.40")
        try:
            dripper.sock.settimeout(20)
            response = read_response(dripper.sock)  # the 1 s body deadline
            assert response is not None and response[0] == 408, response
        finally:
            dripper.close()
    finally:
        code, _, err = proc.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]


def test_sigterm_taken_by_another_thread_stops_the_ingest(tmp_path: Path) -> None:
    """A process-directed SIGTERM may be delivered to any thread that does not block it (here
    forced onto one of grpcio's own threads with tgkill). Python runs the handler only when the
    main thread next runs Python code, and the main thread sat in ``Event.wait()`` for ever:
    the ingest never stopped (the clean-clone CI's 60 s ``TimeoutExpired`` in ``proc.stop()``)."""
    proc = IngestProcess(f"sqlite:///{tmp_path / 'tgkill.db'}")

    def sigterm_while_asleep(pid: int) -> None:
        health(proc.port)  # served: the main thread has started both receivers and goes to wait for a signal
        main_thread_asleep(pid, WAIT)  # asleep in its wait: a signal landing earlier is handled at once
        sigterm_onto_a_grpc_thread(pid)

    out, err = finished(proc.proc, WAIT, sigterm_while_asleep)
    assert proc.proc.returncode == 0, err
    assert "stopped after" in out
