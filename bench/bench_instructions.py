"""Instructions per span under callgrind: ours vs the SDK floor vs AG2's built-in tracing.

CPU timings need a quiet machine; instruction counts do not. This runs the same interleaved
variants as ``bench_overhead.py`` (same workload, same ``Bench`` class: ``baseline``, ``ours``,
``sdk_floor``, ``ag2_builtin``...) in ONE Python process under ``valgrind --tool=callgrind``,
and counts the instructions the chat's thread executes during each timed chat only: a tiny C
helper, compiled here at run time with ``cc`` against valgrind's ``callgrind.h`` and loaded with
ctypes, zeroes callgrind's counters before the chat and dumps them after it (named after the
variant and round); the batch processor's export thread is counted apart and left out, as the
CPU bench leaves it out. ``PYTHONHASHSEED=0``: the counts repeat to within a few hundredths of
a percent, so 2-3 rounds are enough.

    python bench/bench_instructions.py                     # ours, sdk_floor, ag2_builtin, 2 rounds (~4 min)
    python bench/bench_instructions.py --reps 3 --variants ours sdk_floor ours_sampler_off
    python bench/bench_instructions.py --cache-sim         # + data-cache misses (slower)
    python bench/bench_instructions.py --branch-sim        # + branch mispredictions (slower)

Per variant: median instructions per chat, the instructions it adds per LLM call over the
baseline, and per ours' span; then "own code" = (ours - sdk_floor) / ours' spans, the
instruction-count twin of ``bench_overhead.py``'s own-code line (target: 10 us per span, about
50k instructions at the ~5 G instructions/s of this interpreter's hot loop; the figure is
reported, not judged). Also per span: calls to the allocator (``PyObject_Malloc`` family; each
object a wrapper creates is at least one) and instructions inside the cyclic garbage collector,
which the CPU-time own-code figure includes but instruction counts of our functions do not.

Exits 2 (nothing run) when valgrind, a C compiler or ``valgrind/callgrind.h`` is missing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VARIANTS = ("baseline", "ours", "sdk_floor", "ag2_builtin")
TOGGLE_C = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; }
void cg_stop(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""
# pymalloc's entry points (CPython 3.10-3.13; large blocks go on to the raw allocator, not counted twice).
# Objects taken from a free list (tuples, lists, dicts, frames, floats) never reach it: a lower bound.
ALLOCATORS = frozenset({"_PyObject_Malloc", "_PyObject_Calloc", "_PyObject_Realloc"})
SIMULATED = {"D1mr": "D1 miss/span", "DLmr": "LL miss/span", "Bcm": "cond mispr/span", "Bim": "ind mispr/span"}
GC = frozenset({"gc_collect_main", "gc_collect_with_callback", "gc_collect_region"})


def _missing() -> str | None:
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install valgrind)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the callgrind toggle"
    return None


def build_toggle(directory: Path) -> Path | None:
    """Compile the ctypes toggle into ``directory``; ``None`` when it cannot be built."""
    source = directory / "cgtoggle.c"
    library = directory / "libcgtoggle.so"
    source.write_text(TOGGLE_C)
    done = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"bench_instructions: cannot build the callgrind toggle (valgrind/callgrind.h missing?):\n"
              f"{done.stderr.strip()}", file=sys.stderr)
        return None
    return library


# --- the profiled process -------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    """Runs under callgrind: the interleaved chats, each bracketed by the toggle."""
    import ctypes
    import gc

    sys.path.insert(0, str(HERE))
    os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = ""
    os.environ["OTEL_SDK_DISABLED"] = "false"
    # the batch processor's thread exports only at the untimed force_flush between chats: woken in
    # a chat (its timer, a full batch) it takes the GIL, and the chat's thread counts the handover
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "86400000"
    os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "65536"
    import _workload
    from bench_overhead import Bench

    toggle = ctypes.CDLL(args.child)
    bench = Bench()
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - AG2 prints tool executions even in silent chats
    try:
        bench.learn_shape(args.cycles)
        for rep in range(args.warmup + args.reps):
            k = rep % len(args.variants)
            for variant in args.variants[k:] + args.variants[:k]:
                per_chat = bench.enter(variant)
                try:
                    counter = _workload.Counter()
                    initiator, manager, agents = _workload.build_chat(args.cycles, counter)
                    per_chat([*agents, manager])
                    bench.provider.force_flush()
                    before = bench.exporter.spans, bench.exporter.events
                    gc.collect()
                    if rep >= args.warmup:
                        toggle.cg_start()
                    _workload.run_chat(initiator, manager)
                    if rep >= args.warmup:
                        toggle.cg_stop(f"{variant}:{rep}".encode())
                    bench.provider.force_flush()
                    spans, events = bench.exporter.spans - before[0], bench.exporter.events - before[1]
                    print(f"chat {variant} {rep} calls={counter.calls} spans={spans} events={events}", file=out,
                          flush=True)
                finally:
                    bench.leave(variant)
    finally:
        sys.stdout.close()
        sys.stdout = out
    return 0


# --- reading callgrind's dumps ----------------------------------------------------------------------
class Dump:
    """One dump (one chat): its event totals and, per function, instructions and calls received."""

    def __init__(self, path: Path) -> None:
        text = path.read_text(errors="replace")
        desc = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        self.name = desc.group(1) if desc else ""
        events = re.search(r"^events: (.+)$", text, re.M)
        self.events = events.group(1).split() if events else ["Ir"]
        totals = re.search(r"^(?:totals|summary): (.+)$", text, re.M)
        values = [int(v) for v in totals.group(1).split()] if totals else []
        self.totals = dict(zip(self.events, values, strict=False))
        self.calls: collections.Counter[str] = collections.Counter()  # calls received, by function name
        self.inclusive: collections.Counter[str] = collections.Counter()  # Ir under calls to it
        names: dict[str, str] = {}
        callee = ""
        pending_calls = 0
        for line in text.splitlines():
            if line.startswith("fn="):
                _name(line[3:], names)  # function names are compressed across fn= and cfn=
                continue
            if line.startswith(("cfn=", "cfi=", "cob=", "calls=")):
                if line.startswith("cfn="):
                    callee = _name(line[4:], names)
                elif line.startswith("calls="):
                    pending_calls = int(line[6:].split()[0])
                    self.calls[callee] += pending_calls
                continue
            if pending_calls:  # the line after calls=: the cost of those calls (first event: Ir)
                parts = line.split()
                if len(parts) > 1:
                    self.inclusive[callee] += int(parts[1])
                pending_calls = 0

    def ir(self) -> int:
        return self.totals.get("Ir", 0)


def _name(spec: str, names: dict[str, str]) -> str:
    """A compressed callgrind name: ``(id) name`` defines it, ``(id)`` refers to it."""
    match = re.match(r"\((\d+)\)(?: (.*))?", spec)
    if not match:
        return spec
    if match.group(2) is not None:
        names[match.group(1)] = match.group(2)
    return names.get(match.group(1), spec)


def read_dumps(directory: Path) -> dict[str, list[Dump]]:
    """Dumps of the chats' thread (callgrind's thread 1), by variant."""
    found: dict[str, list[Dump]] = collections.defaultdict(list)
    for path in sorted(directory.glob("cg.*.*-01")):
        dump = Dump(path)
        if ":" in dump.name:
            found[dump.name.split(":", 1)[0]].append(dump)
    return found


def report(dumps: dict[str, list[Dump]], log: str, variants: Sequence[str]) -> int:
    counts: dict[str, tuple[int, int, int]] = {}
    for match in re.finditer(r"^chat (\S+) \d+ calls=(\d+) spans=(\d+) events=(\d+)$", log, re.M):
        counts[match.group(1)] = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
    if "baseline" not in dumps or not counts:
        print("bench_instructions: no dumps of the baseline chat were written; see the log above", file=sys.stderr)
        return 1
    calls = counts["baseline"][0]
    spans = counts.get("ours", (0, 0, 0))[1] or 1

    def median(variant: str, value: object) -> float:
        return statistics.median(value(d) for d in dumps[variant])  # type: ignore[operator]

    base = median("baseline", Dump.ir)
    base_alloc = median("baseline", lambda d: sum(d.calls[f] for f in ALLOCATORS))
    base_gc = median("baseline", lambda d: sum(d.inclusive[f] for f in GC))
    cache = "D1mr" in dumps["baseline"][0].totals
    print(f"\nworkload: 4-agent group chat, {calls} LLM calls/chat; instructions of the chat's thread "
          f"(callgrind, PYTHONHASHSEED=0), median of {len(dumps['baseline'])} rounds; ours emits {spans} spans/chat")
    branches = "Bim" in dumps["baseline"][0].totals
    header = (f"{'variant':<18}{'spans':>6}{'events':>7}{'Minstr/chat':>13}{'spread %':>9}{'added/call':>12}"
              f"{'added/ours span':>16}{'mallocs/span':>13}{'GC instr/span':>14}")
    simulated = [event for event, on in (("D1mr", cache), ("DLmr", cache), ("Bcm", branches), ("Bim", branches))
                 if on]
    for event in simulated:
        header += f"{SIMULATED[event]:>15}"
    print(header)
    print("-" * len(header))
    added: dict[str, float] = {}
    for variant in variants:
        if variant not in dumps:
            continue
        irs = [d.ir() for d in dumps[variant]]
        mid = statistics.median(irs)
        spread = (max(irs) - min(irs)) / mid * 100 if mid else 0.0
        added[variant] = mid - base
        alloc = (median(variant, lambda d: sum(d.calls[f] for f in ALLOCATORS)) - base_alloc) / spans
        gc_ir = (median(variant, lambda d: sum(d.inclusive[f] for f in GC)) - base_gc) / spans
        _, n_spans, n_events = counts.get(variant, (0, 0, 0))
        line = (f"{variant:<18}{n_spans:>6}{n_events:>7}{mid / 1e6:>13.3f}{spread:>9.3f}{added[variant] / calls:>12.0f}"
                f"{added[variant] / spans:>16.0f}{alloc:>13.1f}{gc_ir:>14.0f}")
        for event in simulated:
            event_base = statistics.median(d.totals.get(event, 0) for d in dumps["baseline"])
            value = statistics.median(d.totals.get(event, 0) for d in dumps[variant])
            line += f"{(value - event_base) / spans:>15.1f}"
        print(line)
    print("(added: over the baseline chat; 'per ours span' divides every variant by ours' span count, so the "
          "columns compare the same chat)")
    if "ours" in added and "sdk_floor" in added:
        own = (added["ours"] - added["sdk_floor"]) / spans
        print(f"own code: {own:.0f} instructions per span (ours - sdk_floor, over ours' {spans} spans)")
        if "minimal" in added:
            least = (added["minimal"] - added["sdk_floor"]) / spans
            print(f"minimal's own code (the bound): {least:.0f} instructions per span (minimal - sdk_floor); "
                  f"ours - minimal: {own - least:.0f}")
    for mine in ("ours", "minimal", "sdk_floor"):
        if mine in added and "openinference" in added and added["openinference"] > 0:
            print(f"ratio {mine} / openinference (added instructions per LLM call) = "
                  f"{added[mine] / added['openinference']:.3f}")
    if "ours" in added and "ag2_builtin" in added and added["ag2_builtin"] > 0:
        ratio = added["ours"] / added["ag2_builtin"]
        print(f"ratio ours / ag2_builtin (added instructions per LLM call) = {ratio:.2f}")
        if "sdk_floor" in added:
            print(f"ratio sdk_floor / ag2_builtin = {added['sdk_floor'] / added['ag2_builtin']:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_overhead import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="counted rounds (one chat of each variant per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=10, help="4-agent cycles per chat (3 LLM calls each)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--cache-sim", action="store_true", help="also simulate the caches (D1 and LL misses)")
    parser.add_argument("--branch-sim", action="store_true", help="also simulate branch prediction (mispredictions)")
    parser.add_argument("--keep", help="keep callgrind's dumps in this directory (callgrind_annotate them)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = list(dict.fromkeys(["baseline", *args.variants]))
    if any(v.startswith("sdk_floor") for v in variants) and "ours" not in variants:
        variants.insert(1, "ours")  # the floors copy ours' spans
    args.variants = variants
    if args.child:
        return child(args)
    why = _missing()
    if why is not None:
        print(f"bench_instructions: skipped: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_instructions.") as scratch:
        directory = Path(args.keep) if args.keep else Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        library = build_toggle(Path(scratch))
        if library is None:
            return 2
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/cg.%p", "--dump-instr=no",
                   "--separate-threads=yes", f"--cache-sim={'yes' if args.cache_sim else 'no'}",
                   f"--branch-sim={'yes' if args.branch_sim else 'no'}",
                   sys.executable, str(Path(__file__).resolve()), "--child", str(library),
                   "--reps", str(args.reps), "--warmup", str(args.warmup), "--cycles", str(args.cycles),
                   "--variants", *variants]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        print(f"callgrind: {len(variants)} variants x {args.reps + args.warmup} rounds (a few minutes)...",
              file=sys.stderr)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        return report(read_dumps(directory), done.stdout, variants)


if __name__ == "__main__":
    raise SystemExit(main())
