"""Wall time of a real cmbagent run, traced by cmbagent-otel vs plain (Python 3.12 venv).

The real cmbagent package (PyPI) runs its workflows offline against the scripted
OpenAI-compatible backend of the integration tests
(``tests/integration_cmbagent/scripted_cmbagent.py``): every LLM role answered on loopback,
real AG2 group chats, real tool calls, real code execution. Each run is a fresh child
process; the timer covers the workflow call (``cmbagent.one_shot(...)`` /
``cmbagent.planning_and_control(...)``) and, traced, the final flush
(``cmbagent_otel.uninstrument()``: every span in the database, what the process exit waits for).

* **plain**: the workflow as is;
* **traced**: ``cmbagent_otel.instrument()`` (defaults: the ``cmbagent_dag`` exporter behind the
  durable batch processor) as the first line of the program, before ``import cmbagent``, as
  the README shows (and as ``opentelemetry-instrument`` does); the database was created by
  ``cmbagent-otel db upgrade`` before the runs (``--fresh-db``: a new one per run);
* **traced_late**: ``instrument()`` after ``import cmbagent``. Reported, no target. Until
  2026-12-01 the ~45k objects that importing SQLAlchemy and the schema adds after the
  application's own imports tipped CPython's full (generation 2) garbage collection of the
  whole heap (~580k objects, 0.3-0.5 s) into the run (one_shot 1.37); ``instrument()`` now
  settles its imports when AG2 was imported before it (``cmbagent_otel._gcquiet``). Whether a
  full collection falls inside a run tips on a few thousand objects either way; the
  ``full GCs`` column shows when it does.

Variants alternate (order rotating per repetition); the figure is median(traced) /
median(plain) per workflow, with IQRs. Beside it, steadier than wall on a shared machine: the
main thread's CPU time during the call, split into user and system time, its minor page
faults, the number of full collections, and the CPU time of the process's other threads during
the call (both variants: the scripted backend's server thread; traced: the batch processor's
live-DAG exports, which keep the main thread waiting for the GIL while they run Python, so they
show in wall time, not in the main thread's CPU). The faults column exposes CPython 3.11/3.12's
frame-stack chunk thrash (python/cpython gh-142183, fixed in 3.13.x and 3.14 by caching one
chunk): when a hot call path runs exactly at the boundary of a 16 KiB frame-stack chunk, every
call there maps and unmaps a fresh chunk (an mmap, a munmap and page faults: system time, and
cold pages). Which code lands on a boundary depends on the frames under it, so a wrapper's
frames can move one onto a hot path: in one_shot, before the cmbagent integration ran each
workflow call from a frame that reserves one 256 KiB chunk (``cmbagent_otel._framestack``,
docs/cmbagent.md), the traced run's wrappers put one on openai's lazy imports in the first LLM
call: ~5,000 chunk map/unmap pairs and ~5,800 more minor faults than plain (156 pairs); with
that frame, 5 pairs (the root chunks of new threads) and about plain's faults.

    .venv-cmbagent-autogen/bin/python bench/bench_cmbagent_walltime.py           # 9 reps each
    .venv-cmbagent-autogen/bin/python bench/bench_cmbagent_walltime.py --fresh-db
    .venv-cmbagent-autogen/bin/python bench/bench_cmbagent_walltime.py --gc-probe 0 10000 20000 ...

``--gc-probe N...`` times nothing: one run per variant and N, the application allocating N
more long-lived objects just before the run, and the number of full collections inside the
run (and the final flush) for each. Whether one falls inside a run depends on how far the
collector is from its next one when the run starts (the margin, shown from a ``gc.callbacks``
ledger of promotions: approximate, as it cannot see the tuples a collection untracks), so a
sweep of N over one full-collection cycle (~120k objects with cmbagent) shows at which N a
variant gets a full collection that plain does not; the exit status is 1 when one does.

Target: traced / plain <= 1.03 for one_shot and planning_and_control.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _stats import median_iqr

HERE = Path(__file__).resolve().parent
SCRIPTED = HERE.parent / "tests" / "integration_cmbagent"
TARGET = 1.03
WORKFLOWS = ("one_shot", "planning_and_control")


def child(variant: str, workflow: str, work_dir: str) -> dict[str, Any]:
    """One run in this (child) process; returns its timings."""
    import gc
    import logging
    import resource

    logging.disable(logging.WARNING)  # cmbagent/AG2 chatter; the same for every variant
    cpu0 = os.times()
    began = time.perf_counter()
    if variant == "traced":
        import cmbagent_otel  # the README's one line, at the top of the program

        cmbagent_otel.instrument()
    sys.path.insert(0, str(SCRIPTED))
    import cmbagent  # noqa: F401
    from scripted_cmbagent import call_workflow, script_for

    if variant == "traced_late":
        import cmbagent_otel  # after cmbagent (and AG2) were imported

        cmbagent_otel.instrument()
    from cmbagent_otel.testing import FakeOpenAIServer

    full_collections = [0]

    def count_full(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            full_collections[0] += 1

    script = script_for(workflow)
    with FakeOpenAIServer(request_responder=script) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        gc.callbacks.append(count_full)
        start = time.perf_counter()
        main_cpu = time.thread_time()
        process_cpu = time.process_time()
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        call_workflow(workflow, Path(work_dir))
        returned = time.perf_counter()
        main_cpu = time.thread_time() - main_cpu
        process_cpu = time.process_time() - process_cpu
        after = resource.getrusage(resource.RUSAGE_THREAD)
        if variant != "plain":
            cmbagent_otel.uninstrument()  # every span into the database, as the exit would
        end = time.perf_counter()
        gc.callbacks.remove(count_full)
    cpu1 = os.times()
    if script.unexpected:
        raise SystemExit(f"scripted backend met unexpected agents: {script.unexpected}")
    return {"wall": end - start, "workflow": returned - start, "flush": end - returned, "main_cpu": main_cpu,
            "main_user": after.ru_utime - usage.ru_utime, "main_sys": after.ru_stime - usage.ru_stime,
            "main_faults": after.ru_minflt - usage.ru_minflt, "process_wall": end - began,
            "other_cpu": process_cpu - main_cpu,
            "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            "full_gc": full_collections[0], "llm_calls": len(script.sequence)}


class GcLedger:
    """``gc.callbacks`` bookkeeping of CPython's (3.10-3.13) full-collection trigger: objects
    promoted into the oldest generation since the last full collection (each generation-1
    collection's survivors: its young objects at the start minus those it collected) against a
    quarter of the objects that survived that one. Counted per phase of the child."""

    OURS = ("opentelemetry", "cmbagent_otel", "exporters", "sqlalchemy", "wrapt", "alembic")

    def __init__(self) -> None:
        self.phase = "import"
        self.total = 0  # CPython's long_lived_total: 0 until the first full collection
        self.pending = 0  # long_lived_pending
        self.size = 0
        self.ours_young = 0
        self.promoted: dict[str, int] = {}
        self.full: dict[str, int] = {}
        self.ours_promoted: dict[str, int] = {}
        self.margin_at: dict[str, int] = {}

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.margin_at[phase] = self.total // 4 - self.pending

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        import gc

        generation = info["generation"]
        if phase == "start":
            if generation == 2:
                self.size = len(gc.get_objects())
            elif generation == 1:
                young = gc.get_objects(0) + gc.get_objects(1)
                self.size = len(young)
                self.ours_young = sum(1 for o in young if type(o).__module__.startswith(self.OURS))
                del young
            return
        if generation == 1:
            survivors = self.size - info["collected"]
            self.pending += survivors
            self.promoted[self.phase] = self.promoted.get(self.phase, 0) + survivors
            self.ours_promoted[self.phase] = self.ours_promoted.get(self.phase, 0) + self.ours_young
        elif generation == 2:
            self.total = self.size - info["collected"]
            self.pending = 0
            self.full[self.phase] = self.full.get(self.phase, 0) + 1


def gc_child(variant: str, workflow: str, work_dir: str, extra: int, early: int = 0) -> dict[str, Any]:
    """One run for ``--gc-probe``: full collections and promotions per phase, no timing;
    ``extra`` long-lived objects of the application's own allocated just before the run,
    ``early`` more at the program's start (before any import)."""
    import gc
    import logging

    ledger = GcLedger()
    gc.callbacks.append(ledger)
    logging.disable(logging.WARNING)
    at_start = [[] for _ in range(early)]  # noqa: F841 - the application's long-lived objects
    if variant == "traced":
        import cmbagent_otel

        cmbagent_otel.instrument()
    sys.path.insert(0, str(SCRIPTED))
    import cmbagent  # noqa: F401
    from scripted_cmbagent import call_workflow, script_for

    if variant == "traced_late":
        import cmbagent_otel

        cmbagent_otel.instrument()
    from cmbagent_otel.testing import FakeOpenAIServer

    script = script_for(workflow)
    with FakeOpenAIServer(request_responder=script) as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        keep = [[] for _ in range(extra)]  # noqa: F841 - the application's long-lived objects
        ledger.enter("run")
        call_workflow(workflow, Path(work_dir))
        ledger.enter("flush")
        if variant != "plain":
            cmbagent_otel.uninstrument()
        ledger.enter("end")
    gc.callbacks.remove(ledger)
    return {"full": ledger.full, "promoted": ledger.promoted, "ours_promoted": ledger.ours_promoted,
            "margin_at": ledger.margin_at, "total": ledger.total}


def _spawn(variant: str, workflow: str, tmp: str, env: dict[str, str],
           extra: tuple[int, int] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="run-", dir=tmp) as work_dir:
        command = ["--child", variant, workflow, work_dir] if extra is None else \
            ["--gc-child", variant, workflow, work_dir, *map(str, extra)]
        out = subprocess.run([sys.executable, __file__, *command], env=env, capture_output=True, text=True,
                             check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} {workflow} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _summary(values: list[float]) -> str:
    return median_iqr(values, ".2f", unit=" s")


def _main_thread(runs: list[dict[str, Any]]) -> str:
    """The main thread during the call: CPU user / system and minor page faults; the other threads'
    CPU during the call (the batch processor's exports, the scripted backend): medians with IQR."""
    return (f"main thread: user {median_iqr([r['main_user'] for r in runs], '.3f', unit=' s')}, "
            f"sys {median_iqr([r['main_sys'] for r in runs], '.3f', unit=' s')}, "
            f"minor faults {median_iqr([r['main_faults'] for r in runs], '.0f')}; "
            f"other threads' CPU {median_iqr([r['other_cpu'] for r in runs], '.3f', unit=' s')}")


def _gc_probe(args: argparse.Namespace, variants: list[str], tmp: str, env: dict[str, str]) -> int:
    """Full collections inside the run (and flush) per variant and extra N; exit 1 when a traced
    variant has more than plain at some N."""
    worse = False
    for workflow in args.workflows:
        print(f"{workflow}: full collections in the run + flush (objects promoted during the run; margin to the "
              f"next full collection at the run's start), per extra N; {args.gc_early} objects at the start")
        sweep: dict[str, dict[int, int]] = {variant: {} for variant in variants}
        for extra in args.gc_probe:
            cells = []
            counts = {}
            for variant in variants:
                r = _spawn(variant, workflow, tmp, env, (extra, args.gc_early))
                counts[variant] = sweep[variant][extra] = r["full"].get("run", 0) + r["full"].get("flush", 0)
                cells.append(f"{variant} {counts[variant]} ({r['promoted'].get('run', 0) / 1000:.1f}k; "
                             f"{r['margin_at']['run'] / 1000:.1f}k)")
            worse = worse or any(counts[v] > counts["plain"] for v in counts)
            print(f"  N={extra / 1000:g}k  " + "  ".join(cells), flush=True)
        print(f"  runs with a full collection: plain {_with_full(sweep['plain'])}")
        for variant in variants[1:]:
            print(f"  {variant}: {_with_full(sweep[variant])}; against plain "
                  f"{_against(sweep[variant], sweep['plain'])}")
    return 1 if worse else 0


def _with_full(counts: dict[int, int]) -> str:
    return f"{sum(1 for c in counts.values() if c)} of {len(counts)}"


def _against(counts: dict[int, int], plain: dict[int, int]) -> str:
    """Where a variant's full collections differ from plain's over a sweep of N."""
    def at(ns: list[int]) -> str:
        return ", ".join(f"{n / 1000:g}k" for n in ns) or "none"

    fewer = [n for n in counts if counts[n] < plain[n]]
    more = [n for n in counts if counts[n] > plain[n]]
    return "the same at every N" if not fewer and not more else f"fewer at N = {at(fewer)}; more at N = {at(more)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--workflows", nargs="+", default=list(WORKFLOWS), choices=WORKFLOWS)
    parser.add_argument("--variants", nargs="+", default=["plain", "traced", "traced_late"],
                        choices=("plain", "traced", "traced_late"))
    parser.add_argument("--fresh-db", action="store_true", help="a new, unmigrated database for every traced run")
    parser.add_argument("--json", help="write every run's timings here")
    parser.add_argument("--gc-probe", nargs="+", type=int, metavar="N",
                        help="no timing: count full collections per variant, the application allocating N "
                             "extra long-lived objects just before the run, for each N given")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "WORKFLOW", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--gc-early", type=int, default=0, metavar="M",
                        help="with --gc-probe: M more long-lived objects allocated at the program's start")
    parser.add_argument("--gc-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.gc_child:
        variant, workflow, work_dir, extra, early = args.gc_child
        print(json.dumps(gc_child(variant, workflow, work_dir, int(extra), int(early))))
        return 0
    try:
        import cmbagent  # noqa: F401
    except ImportError:
        raise SystemExit("cmbagent is not importable: run this with the Python 3.12 venv "
                         "(.venv-cmbagent-autogen/bin/python, created by ./dev setup --all)") from None
    from cmbagent_otel.dag.database import upgrade

    variants = ["plain", *[v for v in args.variants if v != "plain"]]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {v: [] for v in variants} for w in args.workflows}
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-walltime-") as tmp:
        empty_ca = Path(tmp, "no-ca-certs")
        empty_ca.mkdir()
        # as the integration tests do: cmbagent builds hundreds of OpenAI clients and each loads
        # the CA bundle; the backend is plain HTTP on loopback (the same for every variant)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CMBAGENT_OTEL_"))
               and k not in ("SSL_CERT_FILE", "CMBAGENT_DATABASE_URL")}
        env.update(SSL_CERT_DIR=str(empty_ca), CMBAGENT_DISABLE_DISPLAY="true", AUTOGEN_USE_DOCKER="False",
                   CMBAGENT_OTEL_SPILL_DIR=str(Path(tmp, "spill")))
        shared_db = f"sqlite:///{tmp}/cmbagent.db"
        upgrade(shared_db)  # what `cmbagent-otel db upgrade` (or the first traced run) leaves behind
        if args.gc_probe:
            return _gc_probe(args, variants, tmp, {**env, "CMBAGENT_OTEL_DATABASE_URL": shared_db})
        for rep in range(args.reps):
            for workflow in args.workflows:
                shift = rep % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    db_url = f"sqlite:///{tmp}/fresh-{rep}-{workflow}-{variant}.db" if args.fresh_db else shared_db
                    result = _spawn(variant, workflow, tmp, {**env, "CMBAGENT_OTEL_DATABASE_URL": db_url})
                    results[workflow][variant].append(result)
                    print(f"rep {rep + 1} {workflow:<22} {variant:<12} {result['wall']:.2f} s (flush "
                          f"{result['flush']:.2f}), main thread CPU {result['main_cpu']:.2f} s "
                          f"(sys {result['main_sys']:.3f}), other threads {result['other_cpu']:.3f} s, "
                          f"{result['main_faults']} faults, full GCs "
                          f"{result['full_gc']}, {result['llm_calls']} LLM calls", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ok = True
    print(f"real cmbagent, offline scripted backend, median of {args.reps}; wall time of the workflow call "
          f"plus the final flush{' (a fresh database per traced run)' if args.fresh_db else ''}")
    for workflow, by_variant in results.items():
        plain = [r["wall"] for r in by_variant["plain"]]
        print(f"{workflow}: plain {_summary(plain)}  {_main_thread(by_variant['plain'])}")
        for variant in variants[1:]:
            walls = [r["wall"] for r in by_variant[variant]]
            ratio = statistics.median(walls) / statistics.median(plain)
            cpu = statistics.median(r["main_cpu"] for r in by_variant[variant]) / statistics.median(
                r["main_cpu"] for r in by_variant["plain"])
            gcs = statistics.median(r["full_gc"] for r in by_variant[variant])
            line = (f"  {variant:<12} {_summary(walls)}  {variant}/plain wall {ratio:.3f}, main-thread CPU "
                    f"{cpu:.3f}, full GCs {gcs:g} (plain "
                    f"{statistics.median(r['full_gc'] for r in by_variant['plain']):g})")
            if variant == "traced":
                passed = ratio <= TARGET
                ok = ok and passed
                line += f"; target <= {TARGET}: {'PASS' if passed else 'MISS'}"
            print(line)
            print(f"  {'':<12} {_main_thread(by_variant[variant])}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
