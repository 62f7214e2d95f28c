"""An application exporting over OTLP that forks (fork campaigns, sessions 45 and 46).

The SDK's OTLP exporters keep one connection for their whole life, and a forked child inherits it. A child
forked while the batch processor's worker was inside a gRPC call (gRPC's core skips its fork handlers then)
hung at its exit flush for ever. Over HTTP the child sent its requests on the parent's keep-alive socket,
between the parent's (a collector reading a corrupt body refused a batch). Now a fork waits for the gRPC
exports in flight (not for HTTP ones: the child's own session is enough), and the child exports through an
exporter of its own. The application is a real script run in a subprocess (its providers built by
``cmbagent_otel.provider``, as ``instrument()`` builds them, without AG2's imports), the collector a real OTLP
receiver in another.
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
START_S = 3 * BOUND_S  # a process starting (its imports): under heavy load (load average 25) 60 s was too short

RECEIVER = textwrap.dedent('''
    import sys, threading, time
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
        if "held" in names:  # a slow collector: the application forks while this export is in flight
            say("held")
            time.sleep(1.0)
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
    import faulthandler, os, select, signal, sys, threading
    from cmbagent_otel.provider import build_meter_provider, build_tracer_provider

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung child's stacks, on stderr, before its kill

    mode, forks, bound = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    tracer_provider = build_tracer_provider("otlp")
    tracer = tracer_provider.get_tracer("app")
    meter_provider = build_meter_provider("otlp" if mode == "idle" else "none")
    counter = meter_provider and meter_provider.get_meter("app").create_counter

    def record(name):
        tracer.start_span(name).end()
        if counter:
            counter(name.replace(" ", "_")).add(1)

    def flush():
        return tracer_provider.force_flush() and (not meter_provider or meter_provider.force_flush())

    record("parent before")
    flush()  # the parent's connection is open
    stop = threading.Event()
    made = []

    def exporting():  # another thread of the parent, exporting all the time: the forks land inside its calls
        while not stop.is_set():
            record("parent busy")
            made.append(flush())
            if len(made) == 1:
                print("busy", flush=True)

    def held():  # one export the receiver holds for a while
        record("held")
        made.append(flush())

    exporter = threading.Thread(target=exporting if mode == "busy" else held)
    if mode != "idle":
        exporter.start()
        sys.stdin.readline()  # the test saw the receiver get the first export
    children = {}
    for number in range(forks):
        ended_r, ended_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ended_r)
            record(f"child {number}")
            sys.exit(0)  # the child's spans and metrics are flushed at its exit
        os.close(ended_w)
        children[ended_r] = pid
    waiting = set(children)
    while waiting:
        ended = select.select(list(waiting), [], [], bound)[0]
        if not ended:
            break
        waiting.difference_update(ended)
    for ended_r, pid in children.items():
        if ended_r in waiting:  # hung
            os.kill(pid, signal.SIGUSR1)
            select.select([ended_r], [], [], 5)  # its stacks written (or not: it is killed anyway)
            os.kill(pid, 9)
        print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    stop.set()
    if exporter.is_alive():
        exporter.join()
    record("parent after")
    flush()
    tracer_provider.shutdown()
    if meter_provider:
        meter_provider.shutdown()
    print("exports", len(made), all(made), flush=True)
    print("done", flush=True)
''')


def _lines(source: str, stream: IO[str], into: queue.Queue[tuple[str, str]]) -> None:
    for line in stream:
        into.put((source, line.rstrip("\n")))
    into.put((source, "EOF"))


def _run(tmp_path: Path, protocol: str, mode: str, forks: int) -> tuple[list[str], str, list[tuple[str, list[str]]]]:
    """The app's stdout lines and stderr, and the receiver's (peer, span or metric names) per request."""
    (tmp_path / "receiver.py").write_text(RECEIVER)
    (tmp_path / "app.py").write_text(APP)
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    receiver = subprocess.Popen([sys.executable, str(tmp_path / "receiver.py"), protocol], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    app = None
    try:
        threading.Thread(target=_lines, args=("receiver", receiver.stdout, lines), daemon=True).start()
        _, line = lines.get(timeout=START_S)
        assert line.startswith("port "), line
        port = line.split()[1]
        env = {**os.environ, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_INSECURE": "true",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "GRPC_VERBOSITY": "INFO",
               "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_METRIC_EXPORT_INTERVAL": "600000",  # only when flushed
               "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("OTEL_SDK_DISABLED", None)
        app = subprocess.Popen([sys.executable, str(tmp_path / "app.py"), mode, str(forks), str(BOUND_S)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
        requests: list[tuple[str, list[str]]] = []
        if mode != "idle":  # the app forks once the receiver has its first export (held, or the busy thread's)
            while (item := lines.get(timeout=START_S))[1] not in ("held", "EOF"):
                if item[1].startswith("spans ") and "parent busy" in item[1]:
                    break
                _add(requests, item[1])
            _add(requests, item[1])
            _say(app.stdin, "fork")
        out, err = app.communicate(timeout=4 * BOUND_S)
        assert app.returncode == 0, err[-3000:]
        said = out.splitlines()
        assert said[-1] == "done", (said, err[-3000:])
        _say(receiver.stdin, "stop")
        while (item := lines.get(timeout=BOUND_S))[1] != "EOF":  # every request the receiver got, then its end
            _add(requests, item[1])
        receiver.wait(timeout=BOUND_S)
        return said, err, requests
    finally:
        for process in (app, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _add(requests: list[tuple[str, list[str]]], line: str) -> None:
    if line.startswith("spans "):
        _, peer, names = line.split(" ", 2)
        requests.append((peer, names.split(",")))


def _say(stream: IO[str] | None, line: str) -> None:
    assert stream is not None
    stream.write(line + "\n")
    stream.flush()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_children_forked_while_the_parent_exports_export_their_spans_and_exit(tmp_path: Path, protocol: str) -> None:
    forks = 3
    said, _, requests = _run(tmp_path, protocol, "busy", forks)
    # gRPC: children hung at their exit flush (killed: -9), in the parent's channel; HTTP: requests on the
    # parent's socket, between its own, some refused as corrupt
    assert said.count("child exit 0") == forks, said
    exports, all_made = said[-2].split()[1:]
    names = [name for _, batch in requests for name in batch]
    assert sorted(name for name in names if name.startswith("child")) == [f"child {n}" for n in range(forks)], said
    assert all_made == "True" and names.count("parent busy") == int(exports), (said, names.count("parent busy"))
    assert names.count("parent before") == names.count("parent after") == 1


def test_a_fork_waits_for_the_grpc_export_in_flight(tmp_path: Path) -> None:
    """The fork comes while a slow receiver holds the parent's export (for a second): gRPC's core skipped its
    fork handlers ("Other threads are currently calling into gRPC, skipping fork() handlers") unless the fork
    waits for that export to end."""
    said, err, requests = _run(tmp_path, "grpc", "held", 1)
    assert "skipping fork() handlers" not in err, err[-3000:]
    assert "child exit 0" in said and said[-2] == "exports 1 True", said
    names = [name for _, batch in requests for name in batch]
    assert sorted(names) == ["child 0", "held", "parent after", "parent before"], requests


def test_a_child_forked_after_an_http_export_sends_on_a_connection_of_its_own(tmp_path: Path) -> None:
    said, _, requests = _run(tmp_path, "http/protobuf", "idle", 1)
    assert "child exit 0" in said, said
    for kind in ("spans", "metrics"):  # metrics: names with "_"; a request holds every instrument recorded so far
        batches = [(peer, batch) for peer, batch in requests if ("_" in batch[0]) == (kind == "metrics")]
        first = {name.replace("_", " "): peer for peer, batch in reversed(batches) for name in batch}
        peers = {name: first.get(name) for name in ("parent before", "child 0", "parent after")}
        assert None not in peers.values(), (kind, requests)
        # before: the child's request went on the parent's keep-alive socket (the same client port)
        assert peers["child 0"] != peers["parent before"], (kind, requests)
        assert peers["parent after"] == peers["parent before"], (kind, requests)  # the parent's is still in use


def test_a_fork_waits_for_grpc_exports_in_flight_unless_their_outage_is_ongoing() -> None:
    """Which exports a fork waits for: a gRPC one in flight, but not while that exporter's exports are failing
    (the one in flight will fail too); never an HTTP exporter's (the child's own session is enough)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.sdk.trace import TracerProvider

    from cmbagent_otel.provider import OutageReportingExporter

    release, arrived = threading.Event(), queue.Queue[str]()

    def export(body: bytes, context: grpc.ServicerContext) -> bytes:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        name = request.resource_spans[0].scope_spans[0].spans[0].name
        if name == "refused":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")  # not retried: the export fails at once
        arrived.put(name)
        release.wait(BOUND_S)
        return b""

    service = {"Export": grpc.unary_unary_rpc_method_handler(export)}
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService", service)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tracer = TracerProvider().get_tracer("t")
    exporter = OutageReportingExporter(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=BOUND_S))
    assert not OutageReportingExporter(HTTPSpanExporter(endpoint=f"http://127.0.0.1:{port}"))._own._fork_waits

    def in_flight() -> list[object]:
        """What a fork would wait for while an export is held by the receiver."""
        span = tracer.start_span("held")
        span.end()
        sending = threading.Thread(target=exporter.export, args=([span],))
        sending.start()
        try:
            assert arrived.get(timeout=BOUND_S) == "held"
            return [ended for ended, _ in exporter._own._exports_to_wait_for(threading.get_ident())]
        finally:
            release.set()
            sending.join(BOUND_S)
            release.clear()

    def refused() -> None:
        span = tracer.start_span("refused")
        span.end()
        exporter.export([span])

    try:
        assert len(in_flight()) == 1
        refused()  # the outage begins
        assert in_flight() == []  # that export worked: the outage is over once it has ended
        assert len(in_flight()) == 1
    finally:
        release.set()
        exporter.shutdown()
        server.stop(None)
