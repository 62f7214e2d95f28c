"""Twenty-ninth fault campaign, part B: no thread can be started (``RuntimeError: can't start new thread``).

A container at its pids limit (Docker's ``--pids-limit``, a Kubernetes pod's), a process at its memory
limit or one that leaked threads cannot start another: ``Thread.start()`` raises. Three of our threads
start on demand, when the application (or a client) is already running:

* the PostgreSQL deadline watchdog (``dag/_watchdog.py``), at a connection's checkout. On 0c80923
  ``arm()`` registered the connection, then the start raised (the caller suppresses it): the duplicated
  descriptor leaked, one per checkout, and the stale entry stayed armed; once a thread could start again
  it cut that socket at the stale deadline while the pool had lent the connection again.
* the ingest's gRPC call watchdog (``_ingest_grpc.Watchdog``). On 0c80923 the dead thread was kept as
  "running": no later call ever started one, so no stalled gRPC call was cut for the server's life,
  and the failing call raised.
* the ingest's HTTP workers (a ``ThreadPoolExecutor`` grows on demand). On 0c80923 the request was
  answered 500, which OTLP clients do not retry: its spans were dropped by the client. Now 503 with
  ``Retry-After`` (nothing was stored; the client keeps them), and the retry once threads are back is
  stored.

Each runs in a child process whose threads are exhausted for real: thread stacks of 1 GiB
(``threading.stack_size``) under an address-space limit (``RLIMIT_AS``) 768 MiB above what the process
uses, so ``pthread_create`` fails while ordinary allocations still succeed; ``restore`` lifts both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from .test_faults29_spill_recover import _env

EXHAUST = '''
import resource, threading

_LIMIT = resource.getrlimit(resource.RLIMIT_AS)


def exhaust():
    """No thread can be started from now on (until restore())."""
    threading.stack_size(1 << 30)
    with open("/proc/self/status") as status:
        used = int(status.read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + (768 << 20), _LIMIT[1]))
    probe = threading.Thread(target=lambda: None)
    try:
        probe.start()
    except RuntimeError:
        return
    raise SystemExit("threads could still be started")


def restore():
    resource.setrlimit(resource.RLIMIT_AS, _LIMIT)
    threading.stack_size(0)
'''

# the ingest tests' child: one real span as an OTLP protobuf body, the server class, and post() sending a body
INGEST = '''
import http.client, json, sqlite3, sys
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from cmbagent_otel.ingest import IngestServer

memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
with provider.get_tracer("faults29").start_as_current_span("stored once threads are back"):
    pass
body = encode_spans(memory.get_finished_spans()).SerializeToString()


def post(port, data):
    """(status, Retry-After) of one OTLP/HTTP protobuf request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/traces", body=data, headers={"Content-Type": "application/x-protobuf"})
        answer = conn.getresponse()
        answer.read()
        return answer.status, answer.getheader("retry-after")
    finally:
        conn.close()
'''


def _child(code: str, *args: str, prelude: str = "") -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", EXHAUST + prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_postgresql_watchdog_without_a_thread_leaves_the_connection_unwatched_and_leaks_nothing() -> None:
    found = _child('''
        import json, os, socket, time
        from cmbagent_otel.dag._watchdog import Watchdog

        watchdog = Watchdog()
        lent, lent_peer = socket.socketpair()
        before = len(os.listdir("/proc/self/fd"))
        exhaust()
        try:
            token = repr(watchdog.arm(lent.fileno(), time.monotonic() - 10, "lent"))
        except Exception as exc:
            token = type(exc).__name__
        leaked = len(os.listdir("/proc/self/fd")) - before
        armed = len(watchdog._armed)
        restore()
        # threads are back: a connection past its deadline is cut as before (the thread handles the heap in
        # deadline order, so the stale entry of 'lent', if any, was handled first) ...
        late, late_peer = socket.socketpair()
        watchdog.arm(late.fileno(), time.monotonic() - 5, "late")
        late_peer.settimeout(60)
        cut = late_peer.recv(1) == b""
        # ... and the connection armed while no thread could start, lent again since, still works
        try:
            lent.sendall(b"x")
            lent_peer.settimeout(60)
            works = lent_peer.recv(1) == b"x"
        except OSError:
            works = False
        print(json.dumps({"token": token, "leaked": leaked, "armed": armed, "cut": cut, "works": works}))
    ''')
    assert found == {"token": "None", "leaked": 0, "armed": 0, "cut": True, "works": True}, found


def test_the_grpc_call_watchdog_starts_once_threads_are_back() -> None:
    found = _child('''
        import json, threading
        from cmbagent_otel._ingest_grpc import Watchdog

        watchdog = Watchdog()
        first, second = threading.Event(), threading.Event()
        exhaust()
        try:
            watchdog.schedule(0.0, first.set)
            raised = None
        except Exception as exc:
            raised = type(exc).__name__
        restore()
        watchdog.schedule(0.0, second.set)
        # both deadlines are due at once: the thread started by the second call runs both
        ran = [first.wait(20), second.wait(20)]
        watchdog.stop()
        print(json.dumps({"raised": raised, "ran": ran}))
    ''')
    assert found == {"raised": None, "ran": [True, True]}, found


def test_an_http_request_no_thread_can_store_is_answered_503_and_its_retry_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "ingest.db"
    found = _child('''
        server = IngestServer(f"sqlite:///{sys.argv[1]}", host="127.0.0.1", port=0, grpc_port="off").start()
        try:
            exhaust()
            refused = post(server.port, body)
            restore()
            stored = post(server.port, body)
        finally:
            restore()
            server.stop()
        with sqlite3.connect(sys.argv[1]) as conn:
            rows = conn.execute("select count(*) from execution_events").fetchone()[0]
        print(json.dumps({"refused": refused, "stored": stored, "rows": rows}))
    ''', str(db), prelude=INGEST)
    status, retry_after = found["refused"]  # type: ignore[misc]
    assert status == 503 and retry_after, found
    assert found["stored"][0] == 200 and found["rows"] == 1, found  # type: ignore[index]


def test_a_grpc_call_no_thread_can_serve_leaves_the_receiver_serving(tmp_path: Path) -> None:
    """grpcio submits each call to its pool from its one serving thread: on 0c80923 the pool's
    ``can't start new thread`` ended that thread, and the gRPC port answered nothing more (every later
    call ran into its deadline, for the life of the process). Now the call waits in the pool's queue (the
    client's deadline passes: OTLP clients retry DEADLINE_EXCEEDED) and the receiver serves again."""
    db = tmp_path / "ingest.db"
    found = _child('''
        import grpc
        EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


        def call(port, deadline):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    channel.unary_unary(EXPORT)(body, timeout=deadline)
                    return "OK"
                except grpc.RpcError as err:
                    return err.code().name


        server = IngestServer(f"sqlite:///{sys.argv[1]}", host="127.0.0.1", port="off", grpc_port=0).start()
        try:
            exhaust()
            waited = call(server.grpc_port, 3)
            restore()
            served = [call(server.grpc_port, 30), call(server.grpc_port, 30)]
        finally:
            restore()
            server.stop()
        with sqlite3.connect(sys.argv[1]) as conn:
            rows = conn.execute("select count(*) from execution_events").fetchone()[0]
        print(json.dumps({"waited": waited, "served": served, "rows": rows}))
    ''', str(db), prelude=INGEST)
    assert found["waited"] != "OK" and found["served"] == ["OK", "OK"] and found["rows"] == 1, found
