"""What the application thread pays per span: the SDK's BatchSpanProcessor vs ours.

Every variant starts and ends the same spans (11 attributes each, like ours' mean) on the
measuring thread; the CPU time of that thread (time.thread_time) per span is reported as
median and IQR over interleaved repetitions in one process.

* **normal path** (the queue never fills: the exporter keeps up): SDK ``BatchSpanProcessor``
  vs ``DurableBatchSpanProcessor``, both in front of an exporter that discards;
* **full queue** (the exporter is stuck, as on a locked database): the SDK drops the span;
  ours hands the oldest batch to ``DagSpanExporter.spill_overflow`` (OTLP encoding and one
  fsynced spill file per batch, in the application thread) — the price of not losing it;
* **DAG-node spans** (sub-agent turns), live DAG off vs on: what queueing a started record
  costs the application thread (the snapshot is taken by the worker);
* **live DAG latency**: from a DAG-node span's start until its ``running`` row can be read
  from the SQLite database (the real DAG exporter; median and max of 20).

    python bench/bench_processor.py               # 20k spans per repetition, 7 repetitions
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from _stats import median_iqr
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

ATTRS = {f"cmbagent.attr.{i}": f"value {i}" for i in range(8)}
ATTRS.update({"gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3, "cmbagent.execution_order": 1})
# a sub-agent turn: a DAG-node span, for which the live DAG queues a started record
NODE_ATTRS = {**{k: v for k, v in list(ATTRS.items())[:6]}, "cmbagent.span.kind": "agent",
              "cmbagent.dag.node": "step_1_engineer", "cmbagent.dag.node_type": "sub_agent",
              "cmbagent.dag.parent_node": "step_1", "cmbagent.dag.depth": 2}


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class DiscardDag(Discard):
    """Discards, and takes started records as the DAG exporter does (the live DAG)."""

    accepts_started_spans = True


class Stuck(SpanExporter):
    """Blocks every export until released: the queue fills and stays full."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait()
        return SpanExportResult.SUCCESS


def measure(make_processor: Callable[[], tuple[Any, Callable[[], None]]], spans: int,
            attrs: dict[str, Any] = ATTRS) -> float:
    """CPU seconds of this thread per span, starting and ending ``spans`` spans."""
    processor, release = make_processor()
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    for _ in range(200):  # warm-up
        tracer.start_span("warm", attributes=attrs).end()
    start = time.thread_time()
    for _ in range(spans):
        tracer.start_span("chat m", attributes=attrs).end()
    elapsed = time.thread_time() - start
    release()
    provider.shutdown()
    return elapsed / spans


def normal(make: Callable[[SpanExporter], Any]) -> Callable[[], tuple[Any, Callable[[], None]]]:
    return lambda: (make(Discard()), lambda: None)


def stuck_sdk() -> tuple[Any, Callable[[], None]]:
    exporter = Stuck()
    return BatchSpanProcessor(exporter), exporter.release.set


def stuck_ours(tmp: str) -> Callable[[], tuple[Any, Callable[[], None]]]:
    def make() -> tuple[Any, Callable[[], None]]:
        from cmbagent_otel.exporters.dag import DagSpanExporter

        from cmbagent_otel.processor import DurableBatchSpanProcessor

        class StuckDag(DagSpanExporter):
            """The real spill path; export blocks like a database that never answers."""

            def __init__(self) -> None:
                super().__init__(f"sqlite:///{tmp}/never.db", spill_dir=f"{tmp}/spill", spill=True)
                self.release = threading.Event()

            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                self.release.wait()
                return SpanExportResult.SUCCESS

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True  # the bench measures the spilling, not the replay

        exporter = StuckDag()
        return DurableBatchSpanProcessor(exporter, schedule_delay_millis=5000), exporter.release.set

    return make


def live_latency(tmp: str, nodes: int = 20) -> list[float]:
    """Seconds from a DAG-node span's start until its ``running`` row is in the database
    (SQLite, the DAG exporter behind the durable processor, defaults), read by polling as a UI does."""
    import sqlite3

    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.dag.database import ensure_schema
    from cmbagent_otel.dag.mapping import node_db_id, run_id_of
    from cmbagent_otel.processor import DurableBatchSpanProcessor

    url = f"sqlite:///{tmp}/live.db"
    ensure_schema(url)
    provider = TracerProvider()
    provider.add_span_processor(DurableBatchSpanProcessor(DagSpanExporter(url, spill=False)))
    tracer = provider.get_tracer("bench")
    conn = sqlite3.connect(f"{tmp}/live.db")
    out = []
    root = tracer.start_span("workflow live", attributes={"cmbagent.span.kind": "workflow"})
    ctx = trace.set_span_in_context(root)
    run_id = run_id_of(root.get_span_context().trace_id)
    for index in range(nodes):
        short = f"turn_{index}"
        span = tracer.start_span(f"invoke_agent {short}", context=ctx, attributes={
            **NODE_ATTRS, "cmbagent.dag.node": short, "cmbagent.dag.parent_node": None})
        began = time.perf_counter()
        node_id = node_db_id(run_id, short)
        while conn.execute("SELECT 1 FROM dag_nodes WHERE id = ? AND status = 'running'", (node_id,)).fetchone() \
                is None:
            time.sleep(0.005)  # a UI polling the database
        out.append(time.perf_counter() - began)
        span.end()
    root.end()
    conn.close()
    provider.shutdown()
    return out


def summary(values: list[float]) -> str:
    return median_iqr((v * 1e6 for v in values), width=7, unit=" us ")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    from cmbagent_otel.processor import DurableBatchSpanProcessor

    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-bench-") as tmp:
        variants: dict[str, Callable[[], tuple[Any, Callable[[], None]]]] = {
            "normal: SDK BatchSpanProcessor": normal(BatchSpanProcessor),
            "normal: DurableBatchSpanProcessor": normal(DurableBatchSpanProcessor),
            "full queue: SDK (drops)": stuck_sdk,
            "full queue: ours (spills)": stuck_ours(tmp),
            "DAG-node spans: ours, live DAG off": lambda: (DurableBatchSpanProcessor(DiscardDag(), live=False),
                                                          lambda: None),
            "DAG-node spans: ours, live DAG on": lambda: (DurableBatchSpanProcessor(DiscardDag(), live=True),
                                                         lambda: None),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeat):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                attrs = NODE_ATTRS if name.startswith("DAG-node") else ATTRS
                results[name].append(measure(variants[name], args.spans, attrs))
        latency = live_latency(tmp)
    print(f"{args.spans} spans per repetition, {args.repeat} repetitions interleaved; "
          "CPU time of the application thread per span (start + end)")
    for name, values in results.items():
        print(f"{name:<36}{summary(values)}")
    ms = sorted(v * 1000 for v in latency)
    print(f"live DAG: a DAG-node span's running row visible in SQLite after {statistics.median(ms):.0f} ms "
          f"(median of {len(ms)}, max {ms[-1]:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
