"""An instrumented application exporting over OTLP that forks (fork campaign, session 45).

The SDK's OTLP exporters keep one connection for their whole life, and a forked child inherits it. A child
forked while the batch processor's worker was inside a gRPC call (gRPC skips its fork handlers then) never
got an answer to its own export, past its deadline: it hung at its exit flush for ever. Over HTTP the child
sent its requests on the parent's keep-alive socket, between the parent's (a collector reading a corrupt body
refused a batch). Now a fork waits for the exports in flight, and the child exports through an exporter of its
own. The application is a real script run in a subprocess, the collector a real OTLP receiver in another;
another thread of the application exports all the time while the main thread forks.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import IO

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

BOUND_S = 60  # a generous bound on every wait for the other processes: a hang fails the test, never stalls it

RECEIVER = textwrap.dedent('''
    import sys, threading
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    said = threading.Lock()

    def say(line):
        with said:
            print(line, flush=True)

    def received(body, peer, metrics=False):
        if metrics:
            request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
            names = [item.name for items in request.resource_metrics for scope in items.scope_metrics
                     for item in scope.metrics]
        else:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            names = [item.name for items in request.resource_spans for scope in items.scope_spans
                     for item in scope.spans]
        say(f"spans {peer} {','.join(names)}")

    if sys.argv[1] == "grpc":
        from concurrent.futures import ThreadPoolExecutor
        import grpc

        def export(body, context):
            received(body, context.peer())
            return b""

        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as collectors do

            def do_POST(self):
                received(self.rfile.read(int(self.headers["Content-Length"])), str(self.client_address[1]),
                         self.path.endswith("/metrics"))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    say(f"port {port}")
    sys.stdin.readline()  # the test is done
''')

APP = textwrap.dedent('''
    import os, select, sys, threading
    import cmbagent_otel
    from opentelemetry import trace

    if sys.argv[4] == "metrics":
        from opentelemetry import metrics

        cmbagent_otel.instrument(exporters="none", instrument_cmbagent=False)
        meter = metrics.get_meter("app")
        flush = metrics.get_meter_provider().force_flush

        def record(name):
            meter.create_counter(name.replace(" ", "_")).add(1)
    else:
        cmbagent_otel.instrument(exporters="otlp", instrument_cmbagent=False, metrics=False)
        tracer = trace.get_tracer("app")
        flush = trace.get_tracer_provider().force_flush

        def record(name):
            tracer.start_span(name).end()
    record("parent before")
    flush()  # the parent's connection is open
    forks = int(sys.argv[1])
    stop = threading.Event()
    first = threading.Event()
    made = []

    def exporting():  # another thread of the parent, exporting all the time: the forks land inside its calls
        while not stop.is_set():
            record("parent busy")
            made.append(flush())
            first.set()

    busy = threading.Thread(target=exporting)
    if sys.argv[3] == "busy":
        busy.start()
        first.wait(float(sys.argv[2]))
    children = {}
    for number in range(forks):
        ended_r, ended_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ended_r)
            record(f"child {number}")
            sys.exit(0)  # the child's spans are flushed at its exit
        os.close(ended_w)
        children[ended_r] = pid
    waiting = set(children)
    while waiting:
        ended = select.select(list(waiting), [], [], float(sys.argv[2]))[0]
        if not ended:
            break
        waiting.difference_update(ended)
    for ended_r, pid in children.items():
        if ended_r in waiting:
            os.kill(pid, 9)  # hung
        print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    stop.set()
    if busy.is_alive():
        busy.join()
    record("parent after")
    flush()
    cmbagent_otel.uninstrument()
    print("busy", len(made), all(made), flush=True)
    print("done", flush=True)
''')


def _lines(source: str, stream: IO[str], into: queue.Queue[tuple[str, str]]) -> None:
    for line in stream:
        into.put((source, line.rstrip("\n")))
    into.put((source, "EOF"))


def _run(tmp_path: Path, protocol: str, forks: int, *, busy: bool,
         signal: str = "traces") -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The app's lines and the receiver's (peer, span names) per request."""
    (tmp_path / "receiver.py").write_text(RECEIVER)
    (tmp_path / "app.py").write_text(APP)
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    receiver = subprocess.Popen([sys.executable, str(tmp_path / "receiver.py"), protocol], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        threading.Thread(target=_lines, args=("receiver", receiver.stdout, lines), daemon=True).start()
        _, line = lines.get(timeout=BOUND_S)
        assert line.startswith("port "), line
        env = {**os.environ, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_INSECURE": "true",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{line.split()[1]}",
               "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_METRIC_EXPORT_INTERVAL": "600000",  # only when flushed
               "OTEL_METRICS_EXPORTER": "otlp" if signal == "metrics" else "none",
               "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("OTEL_SDK_DISABLED", None)
        app = subprocess.run([sys.executable, str(tmp_path / "app.py"), str(forks), str(BOUND_S),
                              "busy" if busy else "idle", signal], capture_output=True, text=True, env=env,
                             timeout=4 * BOUND_S, check=False)
        assert app.returncode == 0, app.stderr[-3000:]
        said = app.stdout.splitlines()
        assert said[-1] == "done", (said, app.stderr[-3000:])
        _say(receiver.stdin, "stop")
        requests: list[tuple[str, list[str]]] = []
        while (item := lines.get(timeout=BOUND_S))[1] != "EOF":  # every request the receiver got, then its end
            if item[1].startswith("spans "):
                _, peer, names = item[1].split(" ", 2)
                requests.append((peer, names.split(",")))
        receiver.wait(timeout=BOUND_S)
        return said, requests
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def _say(stream: IO[str] | None, line: str) -> None:
    assert stream is not None
    stream.write(line + "\n")
    stream.flush()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_children_forked_while_the_parent_exports_export_their_spans_and_exit(tmp_path: Path, protocol: str) -> None:
    forks = 6
    said, requests = _run(tmp_path, protocol, forks, busy=True)
    # gRPC: children hung at their exit flush (killed: -9), in the parent's channel; HTTP: requests on the
    # parent's socket, between its own, some refused as corrupt
    assert said.count("child exit 0") == forks, said
    busy, exported = said[-2].split()[1:]
    names = [name for _, batch in requests for name in batch]
    assert sorted(name for name in names if name.startswith("child")) == [f"child {n}" for n in range(forks)], said
    assert exported == "True" and names.count("parent busy") == int(busy), (said, names.count("parent busy"))
    assert names.count("parent before") == names.count("parent after") == 1


@pytest.mark.parametrize("signal", ["traces", "metrics"])
def test_a_child_forked_after_an_http_export_sends_on_a_connection_of_its_own(tmp_path: Path, signal: str) -> None:
    said, requests = _run(tmp_path, "http/protobuf", 1, busy=False, signal=signal)
    assert "child exit 0" in said, said
    # metrics are cumulative: a request holds every instrument recorded so far (the child's, its parent's)
    first = {name.replace("_", " "): peer for peer, batch in reversed(requests) for name in batch}
    peers = {name: first.get(name) for name in ("parent before", "child 0", "parent after")}
    assert None not in peers.values(), requests
    # before: the child's request went on the parent's keep-alive socket (the same client port)
    assert peers["child 0"] != peers["parent before"], requests
    assert peers["parent after"] == peers["parent before"], requests  # the parent's own is still in use
