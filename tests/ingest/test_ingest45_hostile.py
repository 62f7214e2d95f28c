"""Hostile clients of the ingest server over real HTTP and gRPC (session 45), the server run as an operator
runs it (a subprocess, default limits): compression bombs sent many at once, and requests whose client has
gone while they are still being written. The gRPC side is spoken frame by frame (tests/ingest/h2wire.py): a
message compressed by hand, from chosen client addresses."""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from .conftest import IngestProcess
from .h2wire import END_HEADERS, HEADERS, Connection, export_headers, frame, grpc_message, status_of
from .test_ingest_limits import EXPORT, pb_request, post_head, stored_traces, varint

MiB = 1 << 20
WAIT = 60.0  # bound of every wait for the server (generous: the machine is shared)


def gzipped(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def in_threads(work: Callable[[int], None], count: int) -> None:
    """``work(0)`` ... ``work(count - 1)`` at once, each in its thread; returns once all have ended."""
    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * WAIT)
    assert not any(thread.is_alive() for thread in threads)


def grpc_call(port: int, message: bytes, *, source: str = "127.0.0.1", encoding: str | None = None) -> bytes:
    """One Export call (``message`` sent as it is, flagged compressed when ``encoding`` is given); the
    header blocks it was answered with (their ``grpc-status``)."""
    conn = Connection(port, WAIT, source)
    try:
        conn.send(frame(HEADERS, END_HEADERS, 1, export_headers(port, encoding)))
        conn.send_data(1, grpc_message(message, encoding is not None))
        return status_of(conn.until_stream_ends(1))
    finally:
        conn.close()


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[tuple[IngestProcess, Path]]:
    db = tmp_path / "ingest.db"
    proc = IngestProcess(f"sqlite:///{db}")
    try:
        yield proc, db
    finally:
        code, _, err = proc.stop()
        assert code == 0 and "Traceback" not in err, err[-3000:]


def test_grpc_compression_bombs_at_once_stay_inside_the_memory_budget(ingest: tuple[IngestProcess, Path]) -> None:
    """64 calls from 8 addresses, each a 16 KiB gzip message inflating to just under the 16 MiB limit (1 MiB
    sent in all). grpcio inflated each message the moment it arrived, outside the memory budget, before the
    service could turn the call away as busy: the server's peak RSS reached ~770 MB (budget: 128 MiB). The
    message now reaches the service as sent and is inflated in one of the workers, reserved as it grows."""
    proc, db = ingest
    bomb = gzipped(b"\x0a\x00" + b"\x00" * (16 * MiB - 64))
    assert len(bomb) < 20_000
    answers: list[bytes] = []

    def attack(n: int) -> None:
        answers.append(grpc_call(proc.grpc_port, bomb, source=f"127.0.0.{1 + n // 8}", encoding="gzip"))

    in_threads(attack, 64)
    peak_mib = proc.status("VmHWM") / 1024
    # every call ended (invalid: the bytes are no OTLP; busy, retry later; or, on a loaded machine, reset as
    # the oldest of too many still waiting for their message), none answered OK
    assert len(answers) == 64 and not any(b"grpc-status\x010" in a for a in answers), {a[-120:] for a in answers}
    assert peak_mib < 384, f"peak RSS {peak_mib:.0f} MiB"
    request, trace_id = pb_request()
    assert b"grpc-status\x010" in grpc_call(proc.grpc_port, gzipped(request.SerializeToString()), encoding="gzip")
    assert f"{trace_id:032x}" in stored_traces(db)


def _deflate_looking(request: bytes) -> bytes:
    """``request`` behind an unknown varint field 15 (value 1): its first two bytes, ``78 01``, are a valid
    zlib header, yet the message is plain protobuf (and valid OTLP)."""
    return b"\x78" + varint(1) + request


def test_grpc_messages_compressed_or_not_are_stored(ingest: tuple[IngestProcess, Path]) -> None:
    proc, db = ingest
    traces = []
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        for compression in (grpc.Compression.NoCompression, grpc.Compression.Gzip, grpc.Compression.Deflate):
            request, trace_id = pb_request(3)
            export(request.SerializeToString(), timeout=WAIT, compression=compression)
            traces.append(trace_id)
        request, trace_id = pb_request(2)
        plain = _deflate_looking(request.SerializeToString())
        assert int.from_bytes(plain[:2], "big") % 31 == 0
        export(plain, timeout=WAIT)
        traces.append(trace_id)
        export(plain, timeout=WAIT, compression=grpc.Compression.Deflate)  # the same, compressed by the client
        with pytest.raises(grpc.RpcError) as info:  # a zlib stream with bytes after its end
            export(zlib.compress(request.SerializeToString()) + b"\x00", timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:  # a deflate bomb: the limit holds, as for gzip
            export(b"\x0a" + b"\x00" * (32 * MiB), timeout=WAIT, compression=grpc.Compression.Deflate)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert {f"{t:032x}" for t in traces} <= stored_traces(db)


def tiny_spans(count: int) -> bytes:
    """One request of ``count`` small valid spans of one fresh trace (~44 bytes each, ~30 times smaller
    gzipped): a few hundred kilobytes that take the server minutes to store."""
    _, trace_id = pb_request(0)
    tid = trace_id.to_bytes(16, "big")
    spans = b"".join(b"\x12\x1f\x0a\x10" + tid + b"\x12\x08" + (n + 1).to_bytes(8, "big") + b"\x2a\x01s"
                     for n in range(count))
    scope_spans = b"\x12" + varint(len(spans)) + spans
    return b"\x0a" + varint(len(scope_spans)) + scope_spans


ABANDONED = 300_000  # spans: ~1.5 minutes of writing on this machine, far past the clients' deadlines


def test_grpc_calls_past_their_deadline_stop_being_written(ingest: tuple[IngestProcess, Path]) -> None:
    """Two calls (one per worker) of many small spans, each with a 3 s deadline. Past it their clients were
    told DEADLINE_EXCEEDED, yet both workers wrote on for minutes, and every other client's call waited for
    a worker until its own deadline. A call whose client has gone now stops at its next chunk."""
    proc, _ = ingest
    body = tiny_spans(ABANDONED)
    failures: list[grpc.StatusCode] = []

    def abandon(n: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel, pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(EXPORT)(body, timeout=3, compression=grpc.Compression.Gzip)
        failures.append(info.value.code())

    in_threads(abandon, 2)
    assert failures == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    request, _ = pb_request()
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        channel.unary_unary(EXPORT)(request.SerializeToString(), timeout=WAIT)  # before: DEADLINE_EXCEEDED


def test_http_requests_whose_client_hung_up_stop_being_written(ingest: tuple[IngestProcess, Path]) -> None:
    """The same over HTTP: two clients (one per worker) post many small spans gzipped and hang up after
    3 s without an answer (an OTLP exporter's timeout). Their workers wrote on for minutes and the next
    request waited for one: a client giving up after 60 s had no answer yet."""
    proc, db = ingest
    body = gzipped(tiny_spans(ABANDONED))
    unanswered: list[bool] = []

    def hang_up(n: int) -> None:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=WAIT,
                                      source_address=(f"127.0.0.{2 + n}", 0)) as sock:
            sock.sendall(post_head(len(body), extra="Content-Encoding: gzip") + body)
            sock.settimeout(3)
            try:
                unanswered.append(sock.recv(1) == b"")
            except TimeoutError:
                unanswered.append(True)

    in_threads(hang_up, 2)
    assert unanswered == [True, True]
    request, trace_id = pb_request()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=WAIT) as sock:  # before: timed out
        raw = request.SerializeToString()
        sock.sendall(post_head(len(raw)) + raw)
        assert sock.recv(12) == b"HTTP/1.1 200"
    assert f"{trace_id:032x}" in stored_traces(db)
