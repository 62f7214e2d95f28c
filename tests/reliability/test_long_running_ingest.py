"""The ingest server over a long time: many distinct traces, nothing kept per request.

The gRPC receiver's watchdog schedules a cancel per call (a call whose message does not arrive in
time is cancelled) and unschedules it when the message came. Unscheduled entries stayed in its
heap until their deadline (30 s by default): one per call of the last 30 s under steady load.
Counted by the heap's length and by live objects, never by RSS or time.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cmbagent_otel import semconv
from cmbagent_otel._ingest_grpc import Watchdog
from cmbagent_otel.dag.database import ensure_schema
from cmbagent_otel.ingest import IngestServer


def test_watchdog_keeps_no_entry_of_calls_that_ended() -> None:
    """Before: 5,000 calls that ended within their deadline left 5,000 entries in the heap."""
    fired: list[int] = []
    watchdog = Watchdog()
    try:
        for index in range(5000):
            key = watchdog.schedule(3600.0, lambda index=index: fired.append(index))
            watchdog.cancel(key)
        live = watchdog.schedule(3600.0, lambda: fired.append(-1))
        assert len(watchdog._heap) <= 130  # only what was not cancelled, plus the slack before a rebuild
        assert list(watchdog._entries) == [live]
        due = threading.Event()
        watchdog.schedule(0.0, due.set)
        assert due.wait(30)  # still fires what is due
        assert fired == []
    finally:
        watchdog.stop()


def test_many_distinct_traces_leave_nothing_per_trace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/dag.db"
    ensure_schema(url)
    server = IngestServer(url, port=0, grpc_port=0).start()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(HttpExporter(endpoint=server.endpoint)))
    provider.add_span_processor(SimpleSpanProcessor(GrpcExporter(endpoint=server.grpc_endpoint, insecure=True)))
    tracer = provider.get_tracer("long-running")

    def send(index: int) -> None:
        with tracer.start_as_current_span(f"workflow {index}", attributes={
                semconv.GEN_AI_OPERATION_NAME: "invoke_workflow", semconv.WORKFLOW_NAME: f"request {index}"}):
            pass

    try:
        for index in range(40):
            send(index)
        gc.collect()
        objects, fds = len(gc.get_objects()), len(os.listdir("/proc/self/fd"))
        for index in range(40, 640):
            send(index)
        gc.collect()
        assert server.spans_written == 2 * 640  # every span, by both receivers
        assert len(os.listdir("/proc/self/fd")) == fds
        # a few hundred objects of slack (interpreter and grpcio internals), not one per trace
        assert len(gc.get_objects()) - objects < 300
    finally:
        provider.shutdown()
        server.stop()
