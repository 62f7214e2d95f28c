"""Hostile clients of the ingest server over real HTTP and gRPC (session 45), the server run as an operator
runs it (a subprocess, default limits): compression bombs sent many at once. The gRPC side is spoken frame
by frame (tests/ingest/h2wire.py): a message compressed by hand, from chosen client addresses."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from .conftest import IngestProcess
from .h2wire import END_HEADERS, HEADERS, Connection, export_headers, frame, grpc_message, status_of
from .test_ingest_limits import EXPORT, pb_request, stored_traces, varint

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
    # every call answered: invalid (the bytes are no OTLP) or busy, retry later
    assert len(answers) == 64 and all(b"grpc-status\x013" in a or b"grpc-status\x0214" in a for a in answers), \
        {a[-120:] for a in answers}
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
