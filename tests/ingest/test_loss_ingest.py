"""Twentieth fault campaign (ingest loss): no silent loss of spans sent to ``cmbagent-otel ingest``.

The server runs in a subprocess, as an operator runs it; the clients are the SDK's OTLP
exporters (HTTP and gRPC) or raw requests over loopback. Every span sent is accounted for
exactly: acknowledged (200/OK) means stored, even if the server is killed right after;
anything not stored gets a retryable answer (503 + ``Retry-After`` / UNAVAILABLE) within
the exporter's default timeout, also when the server is stopped with requests in flight
and when another process holds the SQLite database locked; a batch sent twice (a retry
whose first answer was lost, or two at once) leaves the same rows as one.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cmbagent_otel.dag.writer import DagWriter, dump_tables

from .conftest import IngestProcess

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SDK_TIMEOUT = 10.0  # the OTLP exporters' default timeout (OTEL_EXPORTER_OTLP_TIMEOUT)


def make_spans(traces: int, children: int = 3, tag: str = "loss") -> list[ReadableSpan]:
    """``traces`` fresh traces of a root and ``children`` children each, from a real SDK tracer."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("loss-test")
    for t in range(traces):
        with tracer.start_as_current_span(f"{tag} root {t}"):
            for i in range(children):
                with tracer.start_as_current_span(f"{tag} child {i}", attributes={"i": i}):
                    pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def exported_by_both(port: int, grpc_port: int, via_http: Sequence[ReadableSpan],
                     via_grpc: Sequence[ReadableSpan]) -> bool:
    """Whether the SDK's OTLP/HTTP exporter stored ``via_http`` and its gRPC exporter ``via_grpc``."""
    stored_http = HttpExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces").export(via_http)
    exporter = GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True)
    try:
        stored_grpc = exporter.export(via_grpc)
    finally:
        exporter.shutdown()
    return stored_http is SpanExportResult.SUCCESS and stored_grpc is SpanExportResult.SUCCESS


def body_of(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def keys(spans: Sequence[ReadableSpan]) -> set[tuple[str, str]]:
    return {(f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in spans}


def stored(db: Path) -> list[tuple[str, str]]:
    """(trace id, span id) of every stored span event, duplicates kept."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select json_extract(meta, '$.trace_id'), json_extract(meta, '$.span_id') "
                            "from execution_events").fetchall()
    return [(t, s) for t, s in rows]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def post(port: int, body: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """A raw OTLP/HTTP protobuf POST; a client timeout raises ``socket.timeout``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def grpc_call(port: int, body: bytes, timeout: float) -> tuple[grpc.StatusCode, bytes]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return grpc.StatusCode.OK, channel.unary_unary(EXPORT)(body, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), b""


def refused(port: int) -> bool:
    """Whether a new connection to ``port`` is refused (the listener is closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class Locker:
    """Another process holding the SQLite database's write lock (``BEGIN IMMEDIATE``) until released."""

    CODE = ("import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "c.execute('ROLLBACK')\n")

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ingest.db"


@pytest.fixture
def server(db: Path) -> Iterator[IngestProcess]:
    proc = IngestProcess(f"sqlite:///{db}")
    # the schema is in place (the first write migrates) before any test locks the file
    warm = make_spans(1, 0, tag="warm")
    assert post(proc.port, body_of(warm), 30)[0] == 200
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


# --- 1. acknowledged means stored ---------------------------------------------------------------------

def test_loss_acknowledged_spans_survive_sigkill(server: IngestProcess, db: Path) -> None:
    """Every batch the exporters were told was stored is there after the server is SIGKILLed."""
    before = set(stored(db))
    via_http, via_grpc = make_spans(5, tag="http"), make_spans(5, tag="grpc")
    assert exported_by_both(server.port, server.grpc_port, via_http, via_grpc)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=60)
    rows = [r for r in stored(db) if r not in before]
    assert sorted(rows) == sorted(keys(via_http) | keys(via_grpc))  # exactly once each
    assert len(rows) == 40


# --- 2. a database locked by another process -----------------------------------------------------------

def test_loss_locked_database_is_a_retryable_answer_within_the_client_timeout(server: IngestProcess,
                                                                             db: Path) -> None:
    """A client with the exporters' default timeout gets 503 + Retry-After (HTTP) and
    UNAVAILABLE (gRPC) while another process holds the database, not a timeout of its own
    (after which the SDK drops the batch without retrying), and nothing is stored."""
    before = stored(db)
    spans = make_spans(2, tag="locked")
    locker = Locker(db)
    try:
        try:
            status, headers, _ = post(server.port, body_of(spans), SDK_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"no answer within the exporter's {SDK_TIMEOUT} s timeout while the database is locked")
        assert status == 503 and int(headers["retry-after"]) > 0
        code, _ = grpc_call(server.grpc_port, body_of(spans), SDK_TIMEOUT)
        assert code is grpc.StatusCode.UNAVAILABLE
    finally:
        locker.release()
    assert stored(db) == before


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_loss_sdk_exporter_retries_past_a_locked_database(server: IngestProcess, db: Path, protocol: str) -> None:
    """The SDK exporter (default timeout) sends while the file is locked, is told to retry,
    retries once the lock is gone and succeeds: every span stored exactly once."""
    before = set(stored(db))
    spans = make_spans(3, tag=protocol)
    exporter: Any = (HttpExporter(endpoint=f"http://127.0.0.1:{server.port}/v1/traces") if protocol == "http"
                     else GrpcExporter(endpoint=f"127.0.0.1:{server.grpc_port}", insecure=True))
    results: list[SpanExportResult] = []
    locker = Locker(db)
    try:
        thread = threading.Thread(target=lambda: results.append(exporter.export(spans)))
        thread.start()
        wait_for(lambda: health(server.port)["in_flight"] >= 1, "the exporter's request")
        # a second request behind it: once it is answered, so was the exporter's first attempt
        try:
            status, _, _ = post(server.port, body_of(make_spans(1, tag="probe")), SDK_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"no answer within the exporter's {SDK_TIMEOUT} s timeout while the database is locked")
        assert status == 503
    finally:
        locker.release()
    thread.join(timeout=120)
    exporter.shutdown()
    assert results == [SpanExportResult.SUCCESS]
    rows = [r for r in stored(db) if r not in before]
    assert sorted(rows) == sorted(keys(spans))


# --- 3. stopping with requests in flight ------------------------------------------------------------------

def test_loss_sigterm_with_requests_in_flight(server: IngestProcess, db: Path) -> None:
    """SIGTERM while requests wait for a locked database, and a second SIGTERM while it
    drains: each request is answered, 200 only for spans stored and a retryable error for
    the rest; the server exits cleanly (code 0) and has stored exactly the acknowledged
    spans, nothing it told a client to send again."""
    before = set(stored(db))
    batches = [make_spans(2, tag=f"term{i}") for i in range(4)]
    answers: dict[int, Any] = {}

    def send(i: int) -> None:
        body = body_of(batches[i])
        if i % 2:
            answers[i] = grpc_call(server.grpc_port, body, 120)[0]
        else:
            status, headers, _ = post(server.port, body, 120)
            answers[i] = (status, headers.get("retry-after"))

    locker = Locker(db)
    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        wait_for(lambda: health(server.port)["in_flight"] == len(batches), "every request in flight")
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(server.port), "the server to stop listening")
        assert len(answers) < len(batches)  # still draining: the writes wait for the lock
        server.proc.send_signal(signal.SIGTERM)  # an impatient second one must not cut the drain short
        for thread in threads:
            thread.join(timeout=120)
        assert len(answers) == len(batches)
    finally:
        locker.release()
    _, err = server.proc.communicate(timeout=120)
    code = server.proc.returncode
    assert code == 0, err
    assert "Traceback" not in err, err[-3000:]
    acknowledged: set[tuple[str, str]] = set()
    for i, answer in answers.items():
        if answer in ((200, None), grpc.StatusCode.OK):
            acknowledged |= keys(batches[i])
        elif i % 2:
            assert answer in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), answer
        else:
            assert answer[0] == 503 and int(answer[1]) > 0, answer
    rows = [r for r in stored(db) if r not in before]
    assert sorted(rows) == sorted(acknowledged), "stored spans differ from the acknowledged ones"


# --- 4. the same batch twice --------------------------------------------------------------------------------

def _tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    writer = DagWriter(url)
    try:
        with writer.engine.connect() as conn:
            return dump_tables(conn)
    finally:
        writer.close()


def test_loss_a_batch_sent_twice_leaves_the_rows_of_one(tmp_path: Path) -> None:
    """A retry whose first attempt was stored (its answer lost to a client timeout) and the
    same batch sent twice at once (HTTP and gRPC together) leave exactly the rows of one send."""
    from ingest_app import recorded

    spans = recorded("twice")
    assert len(spans) > 10
    once = f"sqlite:///{tmp_path / 'once.db'}"
    DagWriter(once).write(spans)
    body = body_of(spans)
    twice_db = tmp_path / "twice.db"
    proc = IngestProcess(f"sqlite:///{twice_db}")
    try:
        assert post(proc.port, body, 30)[0] == 200
        assert post(proc.port, body, 30)[0] == 200  # the retry
        answers: list[Any] = []
        threads = [threading.Thread(target=lambda: answers.append(post(proc.port, body, 60)[0])),
                   threading.Thread(target=lambda: answers.append(grpc_call(proc.grpc_port, body, 60)[0]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(map(str, answers)) == sorted(["200", str(grpc.StatusCode.OK)])
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    assert _tables(f"sqlite:///{twice_db}") == _tables(once)


# --- 5. partial success -----------------------------------------------------------------------------------

def test_loss_partial_success_stores_the_good_spans_and_counts_the_rest(server: IngestProcess, db: Path) -> None:
    """Good and bad spans in one batch: the good ones stored, ``partial_success`` counts the
    rejected ones with a reason, on both receivers; the SDK exporter takes it as done."""
    before = set(stored(db))
    good = make_spans(2, tag="partial")
    request = encode_spans(good)
    scope = request.resource_spans[0].scope_spans[0]
    bad = scope.spans.add()  # a zero trace id: invalid (OTLP spec)
    bad.CopyFrom(scope.spans[0])
    bad.trace_id = bytes(16)
    short = scope.spans.add()  # a span id of 3 bytes
    short.CopyFrom(scope.spans[0])
    short.span_id = b"\x01\x02\x03"
    body = request.SerializeToString()
    status, _, answer = post(server.port, body, 30)
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 2 and partial.error_message
    code, answer = grpc_call(server.grpc_port, body, 30)
    assert code is grpc.StatusCode.OK
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 2 and partial.error_message
    rows = [r for r in stored(db) if r not in before]
    assert sorted(rows) == sorted(keys(good))  # the same good spans twice: stored once


def test_loss_locked_postgresql_table_is_a_retryable_answer(pg_url: str) -> None:
    """PostgreSQL: another session holding a table the write needs (``LOCK TABLE``) gets the
    clients 503 + Retry-After / UNAVAILABLE within the exporters' default timeout, not an
    answer that never comes; once the lock is gone the SDK exporter's batch is stored once."""
    from sqlalchemy import create_engine, text

    proc = IngestProcess(pg_url)
    engine = create_engine(pg_url)
    try:
        assert post(proc.port, body_of(make_spans(1, 0, tag="warm")), 30)[0] == 200
        spans = make_spans(2, tag="pglock")
        with engine.connect() as conn:
            conn.execute(text("BEGIN"))
            conn.execute(text("LOCK TABLE workflow_runs IN ACCESS EXCLUSIVE MODE"))
            try:
                status, headers, _ = post(proc.port, body_of(spans), SDK_TIMEOUT)
            except TimeoutError:
                pytest.fail(f"no answer within the exporter's {SDK_TIMEOUT} s timeout while a table is locked")
            finally:
                code, _ = grpc_call(proc.grpc_port, body_of(spans), SDK_TIMEOUT)
                conn.execute(text("ROLLBACK"))
        assert status == 503 and int(headers["retry-after"]) > 0
        assert code is grpc.StatusCode.UNAVAILABLE
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from execution_events")).scalar() == 1
        assert HttpExporter(endpoint=f"http://127.0.0.1:{proc.port}/v1/traces").export(spans) \
            is SpanExportResult.SUCCESS
        with engine.connect() as conn:
            rows = conn.execute(text("select meta->>'trace_id', meta->>'span_id' from execution_events")).all()
        assert sorted(r for r in map(tuple, rows) if r in keys(spans)) == sorted(keys(spans))
        assert len(rows) == len(spans) + 1
    finally:
        engine.dispose()
        code_, _, err = proc.stop()
    assert code_ == 0, err


# --- a PostgreSQL server stopped and started again (a throwaway cluster of the test's own) ----------------

PG_BIN = Path("/usr/lib/postgresql")


class Cluster:
    """A throwaway PostgreSQL cluster on a free port, started and stopped by the test (as
    ``.ci/start-postgres.sh`` does), so stopping it touches nothing shared."""

    def __init__(self) -> None:
        import os
        import shutil
        import tempfile

        bins = sorted(PG_BIN.glob("*/bin/initdb"))
        if not bins:
            pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed")
        self.bin = bins[-1].parent
        self.owner = "postgres" if os.getuid() == 0 else None
        if self.owner is not None and shutil.which("su") is None:
            pytest.skip("cannot run PostgreSQL as root without su")
        self.data = Path(tempfile.mkdtemp(prefix="cmbagent-otel-loss-pg-"))
        if self.owner is not None:
            shutil.chown(self.data, self.owner, self.owner)
        self.data.chmod(0o700)
        with socket_free() as port:
            self.port = port
        self._run(f"'{self.bin}/initdb' -D '{self.data}' -U postgres --auth=trust -E UTF8 >/dev/null")
        self.start()

    def _run(self, command: str) -> None:
        argv = ["su", self.owner, "-s", "/bin/bash", "-c", command] if self.owner else ["bash", "-c", command]
        subprocess.run(argv, check=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run(f"'{self.bin}/pg_ctl' -D '{self.data}' -l '{self.data}/server.log' -w -t 60 "
                  f"-o \"-h 127.0.0.1 -p {self.port} -k '{self.data}'\" start >/dev/null")

    def stop(self) -> None:
        self._run(f"'{self.bin}/pg_ctl' -D '{self.data}' -m fast -w -t 60 stop >/dev/null")

    def remove(self) -> None:
        import shutil

        subprocess.run((["su", self.owner, "-s", "/bin/bash", "-c"] if self.owner else ["bash", "-c"])
                       + [f"'{self.bin}/pg_ctl' -D '{self.data}' -m immediate -w -t 60 stop >/dev/null 2>&1"],
                       check=False, timeout=120)
        shutil.rmtree(self.data, ignore_errors=True)


class socket_free:
    """A port free at the time of asking (bound to 0, then released)."""

    def __enter__(self) -> int:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    try:
        yield made
    finally:
        made.remove()


def test_loss_postgresql_stopped_mid_ingest(cluster: Cluster) -> None:
    """The PostgreSQL server stops under a serving ingest (its pooled connections die): clients
    get 503 + Retry-After / UNAVAILABLE, nothing is acknowledged and lost; once it is back,
    the exporters' batches are stored, each span exactly once."""
    from sqlalchemy import create_engine, text

    proc = IngestProcess(cluster.url)
    try:
        first, second, third = make_spans(2, tag="pg-a"), make_spans(2, tag="pg-b"), make_spans(2, tag="pg-c")
        assert HttpExporter(endpoint=f"http://127.0.0.1:{proc.port}/v1/traces").export(first) \
            is SpanExportResult.SUCCESS
        cluster.stop()
        try:
            status, headers, _ = post(proc.port, body_of(second), SDK_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"no answer within the exporter's {SDK_TIMEOUT} s timeout while PostgreSQL is stopped")
        assert status == 503 and int(headers["retry-after"]) > 0
        assert grpc_call(proc.grpc_port, body_of(second), SDK_TIMEOUT)[0] is grpc.StatusCode.UNAVAILABLE
        cluster.start()
        assert exported_by_both(proc.port, proc.grpc_port, second, third)
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    engine = create_engine(cluster.url)
    try:
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(
                text("select meta->>'trace_id', meta->>'span_id' from execution_events")).all()]
    finally:
        engine.dispose()
    assert sorted(rows) == sorted(keys(first) | keys(second) | keys(third))
