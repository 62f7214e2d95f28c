"""Per-LLM-call overhead: cmbagent-otel vs AG2's built-in tracing vs OpenInference.

Every variant runs the same offline 4-agent group chat (``_workload.py``) in its own
worker process, so no variant can leave patches behind for another. Each worker has an
SDK ``TracerProvider`` + ``BatchSpanProcessor`` into a counting no-op exporter, so export
cost is the same for all. The workers run in lockstep: one chat of each variant in turn
(rotating order), so every variant sees the same machine load over time. A chat's time is
the CPU time of the thread that runs it (``time.thread_time``: wall time on a shared
machine varies 2x and misleads; the batch processor's export thread is not counted, for
any variant). Added CPU per LLM call = ``(median chat CPU of the variant - median of the
baseline) / LLM calls``; "paired" is the median (with its interquartile range) over chats
of the same difference taken per lockstep turn.

    python bench/bench_overhead.py                 # table + ratio ours / AG2 built-in
    python bench/bench_overhead.py --reps 100 --cycles 10
    python bench/bench_overhead.py --profile ours  # cProfile of our wrappers' hot spots

Targets (issue 13): ours / AG2-built-in <= 0.95 and ours / OpenInference <= 0.55 (per-LLM-call
added CPU, default settings of each).
The run ends with the SDK floor: what ours' spans would cost per LLM call if our wrappers
cost nothing, i.e. bare SDK spans with ours' mean attribute count, as a ratio to AG2's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("baseline", "ours", "ours_content", "ag2_builtin", "ag2_builtin_content", "openinference")
DESCRIPTIONS = {
    "baseline": "no instrumentation (same provider, unused)",
    "ours": "cmbagent_otel.instrument() defaults (content capture off)",
    "ours_content": "cmbagent_otel.instrument(capture_content=True)",
    "ag2_builtin": "autogen.opentelemetry instrument_agent + instrument_llm_wrapper",
    "ag2_builtin_content": "same, instrument_llm_wrapper(capture_messages=True)",
    "openinference": "openinference-instrumentation-ag2 AG2Instrumentor",
}
TARGET = 0.95
TARGET_OPENINFERENCE = 0.55


def _provider() -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def __init__(self) -> None:
            self.count = 0
            self.attributes = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.count += len(spans)
            self.attributes += sum(len(s.attributes or ()) for s in spans)
            return SpanExportResult.SUCCESS

    exporter = CountingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    return provider, exporter


def _setup(variant: str, provider: Any) -> Callable[[Sequence[Any]], None]:
    """Install ``variant``; returns a per-chat hook (AG2's built-in tracing is per agent)."""
    if variant in ("ours", "ours_content"):
        import cmbagent_otel

        cmbagent_otel.instrument(tracer_provider=provider, capture_content=variant == "ours_content",
                                 instrument_cmbagent=False)
    elif variant in ("ag2_builtin", "ag2_builtin_content"):
        from autogen.opentelemetry import instrument_agent, instrument_llm_wrapper

        instrument_llm_wrapper(tracer_provider=provider, capture_messages=variant == "ag2_builtin_content")

        def per_chat(agents: Sequence[Any]) -> None:
            for agent in agents:
                instrument_agent(agent, tracer_provider=provider)

        return per_chat
    elif variant == "openinference":
        from openinference.instrumentation.ag2 import AG2Instrumentor

        AG2Instrumentor().instrument(tracer_provider=provider)
    elif variant != "baseline":
        raise SystemExit(f"unknown variant {variant}")
    return lambda agents: None


class Worker:
    """One variant in its own process, running one chat per request (lockstep with the others)."""

    def __init__(self, variant: str, cycles: int) -> None:
        self.variant = variant
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--cycles", str(cycles)]
        env = {**os.environ, "OTEL_SDK_DISABLED": "false", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": ""}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(HERE), bufsize=1)

    def chat(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("chat\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"worker {self.variant} died (exit {self.proc.wait()})")
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


RESULT = "@@result "


def worker(variant: str, cycles: int) -> None:
    """Serve ``chat`` requests on stdin: build a fresh chat, time it, flush, report one JSON line."""
    import _workload

    provider, exporter = _provider()
    per_chat = _setup(variant, provider)
    out = sys.stdout
    # AG2 prints tool executions even in silent chats: keep that off the result pipe
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    for line in sys.stdin:
        if line.strip() != "chat":
            break
        counter = _workload.Counter()
        initiator, manager, agents = _workload.build_chat(cycles, counter)
        per_chat([*agents, manager])
        provider.force_flush()
        before, attributes_before = exporter.count, exporter.attributes
        gc.collect()
        start = time.thread_time()
        _workload.run_chat(initiator, manager)
        elapsed = time.thread_time() - start
        provider.force_flush()
        out.write(RESULT + json.dumps({"s": elapsed, "calls": counter.calls, "spans": exporter.count - before,
                                       "attributes": exporter.attributes - attributes_before}) + "\n")
        out.flush()
    provider.shutdown()


def sdk_floor_us(attributes: int, spans: int = 20_000) -> float:
    """What the SDK alone costs per span here: a bare span with ``attributes`` attributes,
    made current and ended, through the same provider set-up as the workers (no AG2, no wrapper)."""
    provider, _ = _provider()
    tracer = provider.get_tracer("sdk-floor")
    attrs = {f"floor.attribute_{i}": (i if i % 2 else "value") for i in range(attributes)}
    best = float("inf")
    for _ in range(3):  # best of 3: the floor, not the noise
        gc.collect()
        start = time.thread_time()
        for _ in range(spans):
            with tracer.start_as_current_span("floor", attributes=attrs):
                pass
        best = min(best, (time.thread_time() - start) / spans)
    provider.shutdown()
    return best * 1e6


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values``."""
    if len(values) < 2:
        value = values[0] if values else float("nan")
        return value, value, value
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def available(variant: str) -> str | None:
    """Why ``variant`` cannot run here (None if it can)."""
    if variant == "openinference":
        try:
            import openinference.instrumentation.ag2  # noqa: F401
        except ImportError as exc:
            return f"openinference-instrumentation-ag2 not installed ({exc})"
    return None


def main_bench(args: argparse.Namespace) -> int:
    variants = [v for v in VARIANTS if v in args.variants]
    skipped = {v: why for v in variants if (why := available(v)) is not None}
    variants = [v for v in variants if v not in skipped]
    workers = {v: Worker(v, args.cycles) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    last: dict[str, dict[str, Any]] = {}
    try:
        for rep in range(args.warmup + args.reps):
            # rotate the order so no variant always runs right after another
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:
                last[v] = workers[v].chat()
                if rep >= args.warmup:
                    times[v].append(last[v]["s"])
            if rep >= args.warmup and (rep - args.warmup + 1) % 10 == 0:
                print(f"{rep - args.warmup + 1}/{args.reps} chats per variant", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
    calls = last["baseline"]["calls"]
    base = times["baseline"]
    added: dict[str, float] = {}
    paired: dict[str, tuple[float, float, float]] = {}
    for v in variants:
        added[v] = (statistics.median(times[v]) - statistics.median(base)) / calls
        paired[v] = quartiles([(t - b) / calls for t, b in zip(times[v], base, strict=True)])
    print(f"\nworkload: 4-agent group chat, {args.cycles} cycles = {calls} LLM calls/chat; "
          f"baseline median chat {statistics.median(base) * 1e3:.1f} ms CPU; {args.reps} chats per variant "
          f"(lockstep, rotating order, {args.warmup} warm-up); CPU time of the chat's thread")
    header = (f"{'variant':<21}{'spans/chat':>11}{'chat CPU ms (IQR)':>22}{'added us/LLM call':>19}"
              f"{'paired us/call (IQR)':>26}{'us/span':>9}  description")
    print(header)
    print("-" * len(header))

    def per_span(v: str) -> str:
        spans = last[v]["spans"]
        return f"{added[v] * calls / spans * 1e6:.1f}" if spans else "-"

    for v in variants:
        q1, q2, q3 = quartiles(times[v])
        chat = f"{q2 * 1e3:.2f} ({q1 * 1e3:.2f}-{q3 * 1e3:.2f})"
        p1, p2, p3 = paired[v]
        pair = f"{p2 * 1e6:.1f} ({p1 * 1e6:.1f}-{p3 * 1e6:.1f})"
        print(f"{v:<21}{last[v]['spans']:>11}{chat:>22}{added[v] * 1e6:>19.1f}{pair:>26}{per_span(v):>9}  "
              f"{DESCRIPTIONS[v]}")
    for v, why in skipped.items():
        print(f"{v:<21}{'n/a':>11}{'n/a':>22}{'n/a':>19}{'n/a':>26}{'n/a':>9}  {why}")
    status = 0
    if "ours" in added and "ag2_builtin" in added and added["ag2_builtin"] > 0:
        ratio = added["ours"] / added["ag2_builtin"]
        ok = ratio <= TARGET
        paired_ratio = paired["ours"][1] / paired["ag2_builtin"][1]
        print(f"\nratio ours / ag2_builtin = {ratio:.2f} (paired medians: {paired_ratio:.2f}); "
              f"target <= {TARGET:.2f}: {'PASS' if ok else 'MISS'}")
        for a, b in (("ours_content", "ag2_builtin_content"), ("ours", "openinference")):
            if a in added and b in added and added[b] > 0:
                note = f"; target <= {TARGET_OPENINFERENCE:.2f}" if b == "openinference" else ""
                print(f"ratio {a} / {b} = {added[a] / added[b]:.2f}{note}")
        status = 0 if ok else 1
        spans, attributes = last["ours"]["spans"], last["ours"]["attributes"]
        if spans:
            per_span = round(attributes / spans)
            floor = sdk_floor_us(per_span)
            floor_call = floor * spans / calls
            print(f"SDK floor: a bare span with {per_span} attributes (ours' mean) costs {floor:.1f} us "
                  f"here; ours' {spans} spans/chat at that cost alone = {floor_call:.1f} us per LLM call = "
                  f"{floor_call / (added['ag2_builtin'] * 1e6):.2f} x ag2_builtin's added time, before any "
                  f"instrumentation code of ours runs")
    if args.json:
        Path(args.json).write_text(json.dumps({"times_s": times, "calls": calls, "skipped": skipped}, indent=1))
    return status


def profile(variant: str, args: argparse.Namespace) -> int:
    """cProfile ``variant`` in-process; print the top functions of cmbagent_otel and wrapt."""
    import cProfile
    import pstats

    import _workload

    provider, _ = _provider()
    per_chat = _setup(variant, provider)
    prof = cProfile.Profile()
    for _ in range(args.reps):
        counter = _workload.Counter()
        initiator, manager, agents = _workload.build_chat(args.cycles, counter)
        per_chat([*agents, manager])
        prof.enable()
        _workload.run_chat(initiator, manager)
        prof.disable()
    provider.shutdown()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime")
    print(f"cProfile of {variant}: {args.reps} chats; functions of cmbagent_otel / opentelemetry by own time")
    stats.print_stats(r"cmbagent_otel|opentelemetry|wrapt", 30)
    stats.sort_stats("cumulative")
    stats.print_stats(r"cmbagent_otel", 20)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=60, help="timed chats per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=10, help="4-agent cycles per chat (3 LLM calls each)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write raw per-round figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=VARIANTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.worker:
        worker(args.worker, args.cycles)
        return 0
    if args.profile:
        return profile(args.profile, args)
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    return main_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
