"""Memory stays flat over a long run: 100k spans through BatchSpanProcessor + DagSpanExporter.

The offline group chat (``_workload.py``) runs instrumented by cmbagent-otel until the
requested number of spans has ended; spans go through the SDK ``BatchSpanProcessor``
(bounded queue, default 2048) into ``DagSpanExporter`` writing a temporary SQLite file.
RSS (``/proc/self/statm``) is sampled every 10k spans; the figure reported is the largest
growth over the RSS at the end of the warm-up (first 20k spans). Spans the queue had to
drop (exporter slower than the application) are counted, never buffered without bound.

    python bench/bench_memory.py                    # 100k spans, DAG exporter
    python bench/bench_memory.py --sink noop        # same, exporter that discards

Target: flat memory, i.e. growth after warm-up small and not proportional to spans
(reported; the README quotes the threshold used: < 25 MiB over 80k spans).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_GROWTH_MIB = 25.0


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000, help="sample RSS every N spans")
    parser.add_argument("--warmup", type=int, default=20_000, help="spans before the reference sample")
    parser.add_argument("--sink", choices=("dag", "noop"), default="dag")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))

    import _workload
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult, SpanProcessor

    import cmbagent_otel

    class Noop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class Counter(SpanProcessor):
        def __init__(self) -> None:
            self.ended = 0

        def on_end(self, span: Any) -> None:
            self.ended += 1

    tmp = tempfile.TemporaryDirectory(prefix="cmbagent-otel-mem-")
    if args.sink == "dag":
        from cmbagent_otel.exporters.dag import DagSpanExporter

        from cmbagent_otel.dag.database import ensure_schema

        url = f"sqlite:///{tmp.name}/dag.db"
        ensure_schema(url)
        exporter: Any = DagSpanExporter(url)
    else:
        exporter = Noop()
    counter = Counter()
    provider = TracerProvider()
    provider.add_span_processor(counter)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - AG2 prints tool executions
    real_stdout = sys.stdout
    samples: list[tuple[int, float]] = [(0, rss_mib())]
    next_sample = args.every
    chats = 0
    start = time.perf_counter()
    try:
        sys.stdout = devnull
        while counter.ended < args.spans:
            c = _workload.Counter()
            initiator, manager, _ = _workload.build_chat(10, c)
            _workload.run_chat(initiator, manager)
            chats += 1
            if counter.ended >= next_sample:
                gc.collect()
                samples.append((counter.ended, rss_mib()))
                print(f"{counter.ended:>8} spans  rss {samples[-1][1]:8.1f} MiB", file=sys.stderr)
                next_sample += args.every
    finally:
        sys.stdout = real_stdout
        elapsed = time.perf_counter() - start
        provider.force_flush()
        cmbagent_otel.uninstrument()
        provider.shutdown()
        tmp.cleanup()
    exported = exporter.stats()["exported"] if hasattr(exporter, "stats") else None
    reference = next((rss for n, rss in samples if n >= args.warmup), samples[-1][1])
    after = [rss for n, rss in samples if n >= args.warmup]
    growth = max(after) - reference
    print(f"{counter.ended} spans from {chats} chats in {elapsed:.1f} s ({counter.ended / elapsed:,.0f} spans/s), "
          f"sink {args.sink}")
    print("spans    rss MiB")
    for n, rss in samples:
        print(f"{n:>7} {rss:>8.1f}")
    if exported is not None:
        print(f"exported to the DAG DB: {exported} spans; dropped by the bounded queue: {counter.ended - exported}")
    ok = growth < TARGET_GROWTH_MIB
    print(f"max RSS growth after warm-up ({args.warmup} spans): {growth:.1f} MiB "
          f"(target < {TARGET_GROWTH_MIB:.0f} MiB): {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
