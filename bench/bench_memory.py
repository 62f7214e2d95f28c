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

``--workflows N``: the long-running service instead. N small workflows in one process, each
building FRESH agents (``_workload.build_chat``, the offline 4-agent group chat with a tool
call), the variants interleaved round by round and installed / removed around each run as in
``bench_overhead.py`` (whose ``Bench`` installs the peers): ``uninstrumented``, ``ours``
(``instrument()`` with the DAG exporter into a SQLite file behind ours' durable batch
processor, plus an in-memory exporter; each run inside ``workflow()/phase()/step()``),
``ours_once`` (``--once``: ours instrumented once for the whole process, the service
pattern, no peers), and where installed ``ag2_builtin`` and ``openinference``. After every run:
``gc.collect()``, then the traced heap (``tracemalloc``) and RSS; a run's retained growth is
the difference from the sample before it, reported per variant as median (IQR) after the
warm-up. Then the allocation sites that grew most from the end of the warm-up to the end
(tracemalloc snapshot diff by file:line), and open file descriptors, threads and SQLite file
handles (DB connections) at the start, after the warm-up and at the end.

    python bench/bench_memory.py --workflows 400              # interleaved variants
    python bench/bench_memory.py --workflows 400 --once       # ours installed once
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
    parser.add_argument("--workflows", type=int, default=0,
                        help="long-running service mode: N small workflows with fresh agents (see above)")
    parser.add_argument("--variants", default="uninstrumented,ours,ag2_builtin,openinference",
                        help="--workflows: comma-separated variants, interleaved")
    parser.add_argument("--once", action="store_true", help="--workflows: only ours, instrumented once")
    parser.add_argument("--cycles", type=int, default=1, help="--workflows: 4-agent rounds per chat")
    parser.add_argument("--top", type=int, default=12, help="--workflows: growing allocation sites shown")
    parser.add_argument("--rss-only", action="store_true",
                        help="--workflows: no tracemalloc (3x faster runs; RSS and our memos' fill only)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.workflows > 0:
        return run_workflows(args)

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


# --- --workflows: a long-running service ----------------------------------------------------------------
def open_fds() -> list[str]:
    """What this process's open file descriptors point at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


def resources(db_dir: str) -> dict[str, int]:
    """Open fds, threads, and fds on the DAG database files (its SQLite connections)."""
    import threading

    fds = open_fds()
    return {"fds": len(fds), "threads": threading.active_count(),
            "db_fds": sum(1 for target in fds if target.startswith(db_dir) and ".db" in target)}


def memo_fill() -> list[tuple[str, int, str]]:
    """Our process-wide memos and caches: (name, entries now, its bound)."""
    from cmbagent_otel import redaction
    from cmbagent_otel.dag import _stamps, mapping
    from cmbagent_otel.instrumentation import _content, _messages, _models

    out = [("dag._stamps texts / seconds", len(_stamps._texts) + len(_stamps._seconds), "2 x 8192, then emptied"),
           ("mapping.node_db_id (lru)", mapping.node_db_id.cache_info().currsize, "8192"),
           ("mapping.run_id_of (lru)", mapping.run_id_of.cache_info().currsize, "1024"),
           ("mapping storable keys", len(mapping._storable_keys), "4096, then emptied"),
           ("_content walked config entries", len(_content._walked_entries), "256"),
           ("_content seen configs", len(_content._seen_configs), "256"),
           ("_models config infos", len(_models._infos), "256"),
           ("_messages pieces", len(_messages._pieces) + len(_messages._flat_pieces), "2 x 512")]
    chars = sum(getattr(cache._memo, "chars", 0) for cache in redaction._caches)
    out.append(("redaction memos (chars)", chars, " + ".join(f"{c.max_chars:,}" for c in redaction._caches)))
    return out


class Ours:
    """Ours as an application installs it: ``instrument()`` building its provider with the DAG
    exporter (``CMBAGENT_OTEL_DATABASE_URL``, a SQLite file) and an in-memory exporter."""

    def __init__(self, url: str) -> None:
        os.environ["CMBAGENT_OTEL_DATABASE_URL"] = url
        self.memory: Any = None
        self.spans = 0

    def enter(self) -> None:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        import cmbagent_otel

        self.memory = InMemorySpanExporter()  # uninstrument() shuts the exporters down
        cmbagent_otel.instrument(exporters="cmbagent_dag", span_exporters=[self.memory], set_global=False,
                                 instrument_cmbagent=False)

    def leave(self) -> None:
        import cmbagent_otel

        cmbagent_otel.uninstrument()  # flushes and shuts down the processors it built
        self.drain()

    def drain(self) -> None:
        self.spans += len(self.memory.get_finished_spans())
        self.memory.clear()  # an application's in-memory exporter is read and emptied


def run_workflows(args: argparse.Namespace) -> int:
    import contextlib
    import tracemalloc

    import _workload
    from _stats import median_iqr
    from bench_overhead import Bench, available

    import cmbagent_otel
    from cmbagent_otel.dag.database import ensure_schema

    tmp = tempfile.TemporaryDirectory(prefix="cmbagent-otel-memwf-")
    url = f"sqlite:///{tmp.name}/dag.db"
    ensure_schema(url)
    ours = Ours(url)
    if args.once:
        variants = ["ours_once"]
    else:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        skipped = {v: why for v in wanted if (why := available(v)) is not None}
        for v, why in skipped.items():
            print(f"skipped {v}: {why}")
        variants = [v for v in wanted if v not in skipped]
    bench = Bench()

    def one_run(variant: str, index: int) -> None:
        per_chat: Any = None
        if variant in ("ours", "ours_once"):
            if variant == "ours":
                ours.enter()
        elif variant != "uninstrumented":
            per_chat = bench.enter(variant)
        try:
            counter = _workload.Counter()
            initiator, manager, agents = _workload.build_chat(args.cycles, counter)
            if per_chat is not None:
                per_chat([*agents, manager])
            scope = contextlib.ExitStack()
            if variant.startswith("ours"):
                scope.enter_context(cmbagent_otel.workflow(f"request {index}", mode="planning-control"))
                scope.enter_context(cmbagent_otel.phase("control"))
                scope.enter_context(cmbagent_otel.step(1, "fit the peaks"))
            with scope:
                _workload.run_chat(initiator, manager)
            del initiator, manager, agents
        finally:
            if variant == "ours":
                ours.leave()
            elif variant == "ours_once":
                ours.drain()
            elif variant != "uninstrumented":
                bench.provider.force_flush()
                bench.leave(variant)

    devnull = open(os.devnull, "w")  # noqa: SIM115 - AG2 prints tool executions
    real_stdout = sys.stdout
    rounds = max(1, args.workflows // len(variants))
    warmup = max(1, rounds // 5)
    growth: dict[str, list[float]] = {v: [] for v in variants}
    rss_growth: dict[str, list[float]] = {v: [] for v in variants}
    marks: dict[str, dict[str, int]] = {"start": resources(tmp.name)}

    def heap_of() -> int:
        return 0 if args.rss_only else tracemalloc.get_traced_memory()[0]

    # one untraced run of each variant first: its lazy imports (AG2, the exporters, ~40 MiB of
    # module objects) would otherwise be traced, and tracemalloc's own tables resize under them
    sys.stdout = devnull
    try:
        for variant in variants:
            one_run("ours" if variant == "ours_once" else variant, -1)
    finally:
        sys.stdout = real_stdout
    if not args.rss_only:
        tracemalloc.start(1)
    if args.once:
        ours.enter()
    reference: Any = None
    heap_at_warmup = rss_at_warmup = 0.0
    start = time.perf_counter()
    try:
        sys.stdout = devnull
        gc.collect()
        heap, rss = heap_of(), rss_mib()
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for variant in order:
                one_run(variant, r)
                gc.collect()
                heap_now, rss_now = heap_of(), rss_mib()
                if r >= warmup:
                    growth[variant].append((heap_now - heap) / 1024)
                    rss_growth[variant].append((rss_now - rss) * 1024)
                heap, rss = heap_now, rss_now
            if r == warmup - 1:
                reference = None if args.rss_only else tracemalloc.take_snapshot()
                heap_at_warmup, rss_at_warmup = heap, rss
                marks["after warm-up"] = resources(tmp.name)
            if (r + 1) % max(1, rounds // 10) == 0:
                print(f"round {r + 1:>5}/{rounds}  heap {heap / 2**20:7.2f} MiB  rss {rss:7.1f} MiB",
                      file=sys.stderr)
        final = None if args.rss_only else tracemalloc.take_snapshot()
        marks["end"] = resources(tmp.name)
    finally:
        sys.stdout = real_stdout
        if args.once:
            ours.leave()
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    marks["after uninstrument"] = resources(tmp.name)
    measured = rounds - warmup
    print(f"{rounds} rounds x {len(variants)} variants ({rounds * len(variants)} workflows, fresh agents each, "
          f"{args.cycles} cycle(s) per chat) in {elapsed:.0f} s; ours exported {ours.spans} spans in memory")
    print(f"per-run retained growth after gc, rounds {warmup + 1}-{rounds} ({measured} per variant): median (IQR)")
    print(f"{'variant':<16} {'tracemalloc KiB/run':>32} {'RSS KiB/run':>30}")
    for v in variants:
        print(f"{v:<16} {median_iqr(growth[v], '.2f', 8):>32} {median_iqr(rss_growth[v], '.1f', 8):>30}")
    print(f"all variants, warm-up end to end: traced heap {heap_at_warmup / 2**20:.2f} -> {heap / 2**20:.2f} MiB "
          f"({(heap - heap_at_warmup) / 1024 / max(measured, 1):.2f} KiB per round), "
          f"RSS {rss_at_warmup:.1f} -> {rss:.1f} MiB")
    if reference is not None and final is not None:
        print(f"largest growing allocation sites (warm-up end -> end, over {measured} rounds):")
        diff = final.compare_to(reference, "lineno")
        for stat in [d for d in diff if d.size_diff > 0][:args.top]:
            frame = stat.traceback[0]
            name = frame.filename
            for root in ("site-packages/", "/src/", "/work/"):
                if root in name:
                    name = name.split(root, 1)[1]
                    break
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {name}:{frame.lineno}")
    print("our memos at the end (entries; bound):")
    for name, size, bound in memo_fill():
        print(f"  {name:<34} {size:>10,}  ({bound})")
    print(f"{'resources':<20} {'fds':>5} {'threads':>8} {'db fds':>7}")
    for label, m in marks.items():
        print(f"{label:<20} {m['fds']:>5} {m['threads']:>8} {m['db_fds']:>7}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
