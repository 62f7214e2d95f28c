"""Same-process A/B of two revisions of the package: which one exports faster, on a noisy machine.

A change worth a few percent (or less) drowns in the noise of CPU medians taken in separate
processes on a shared machine: two processes of the same code differ by more than that
(docs/reliability.md, "Issue 13, session 36 (export)": two trees' 10k-span medians disagreed in
sign between rounds). Here both revisions are imported side by side in ONE process and take turns:

* each revision's ``src/cmbagent_otel``, ``exporters`` and ``migrations`` are materialised in a
  scratch directory (``git archive REF``; ``WORKTREE`` copies the checkout as it is, uncommitted
  changes included) and imported under the package's own name, one at a time: the modules of
  each are kept apart and put into ``sys.modules`` only while that revision runs (so imports
  made inside its functions find its own modules). Third-party modules (SQLAlchemy, the SDK,
  sqlite3) are shared, as they would be in either process;
* the workload (``export``: ``DagSpanExporter.export`` of the corpus in batches, end to end,
  into a fresh migrated SQLite file; ``mapping``: ``map_spans`` and the node and event rows'
  parameters, no database) runs for each revision in every round, the order alternating
  (base first in even rounds), ``gc.collect()`` before each timed run;
* the figure is the CPU time of the measuring thread (``time.thread_time``) per span: median
  and IQR per revision, and the **paired** ratio new / base taken within each round (both
  halves of a round see about the same load), median and IQR.

Before timing, both revisions export the same 15,000 spans (10,000 in batches of 512, then
5,000 in batches of 97: runs straddling batches, updates, placeholders) into two files whose
every table is compared row by row in rowid order, autoincrement ids included (``rows:
identical``); a difference fails the run (exit 1) unless ``--allow-different``.

``--bytecodes``: instead of time, the Python bytecodes each revision runs per span (``sys.settrace``
opcode events, every function: ours, SQLAlchemy's, the SDK's), exact and load-independent, with the
functions of the package whose counts moved most. ``--instructions``: the same rounds run again
under ``valgrind --tool=callgrind`` (counters zeroed and dumped around each timed run by
``bench_instructions``' toggle), instructions per span of each revision (median over rounds).

    python bench/bench_ab.py --base main                       # main vs the working tree, export, 20 rounds
    python bench/bench_ab.py --base e0732e2 --new HEAD --workload mapping --rounds 40
    python bench/bench_ab.py --base main --bytecodes           # exact counts, ~1 min
    python bench/bench_ab.py --base main --instructions        # callgrind, a few minutes

Exit 0 when it ran (no target is judged), 1 when the rows differ, 2 when a revision cannot be
materialised (or, with ``--instructions``, valgrind or cc is missing).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib
import io
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGE = "cmbagent_otel"
WORKTREE = "WORKTREE"
WORKLOADS = ("export", "mapping", "ingest", "decode")
CHECK_SHAPE = ((10_000, 512), (5_000, 97))  # the row check's corpus: (spans, batch size) parts


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _pop_ours() -> dict[str, Any]:
    """Remove the package's modules from ``sys.modules`` and return them."""
    return {name: sys.modules.pop(name) for name in [n for n in sys.modules if _ours(n)]}


class Tree:
    """One revision of the package, materialised under ``root`` and imported apart from the others."""

    def __init__(self, label: str, ref: str, root: Path) -> None:
        self.label, self.ref = label, ref
        self.path = root / label
        self.src = self.path / "src"
        self.modules: dict[str, Any] = {}
        self.sha = WORKTREE.lower() if ref == WORKTREE else _git("rev-parse", "--short", ref)
        self._materialise()
        with self.active():
            for name in (PACKAGE, f"{PACKAGE}.exporters.dag", f"{PACKAGE}.dag.mapping", f"{PACKAGE}.dag.statements",
                         f"{PACKAGE}.dag.database", f"{PACKAGE}.dag.schema", f"{PACKAGE}.ingest",
                         f"{PACKAGE}.cli.ingest", f"{PACKAGE}.otlp_decode"):
                importlib.import_module(name)

    def _materialise(self) -> None:
        parts = ("src/cmbagent_otel", "exporters", "migrations")
        self.path.mkdir(parents=True)
        if self.ref == WORKTREE:
            for part in parts:
                shutil.copytree(REPO / part, self.path / part, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
        else:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", self.ref, *parts],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.path)], input=archive, check=True)
        package = self.path / "src" / PACKAGE
        for name in ("exporters", "migrations"):  # setuptools' package-dir mapping, as the checkout's link does
            link = package / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path("..") / ".." / name)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This revision's modules in ``sys.modules`` (and its ``src`` first on ``sys.path``) inside the block."""
        stash = _pop_ours()
        sys.modules.update(self.modules)
        sys.path.insert(0, str(self.src))
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(str(self.src))
            self.modules = _pop_ours()  # with any module imported inside the block
            sys.modules.update(stash)

    def module(self, name: str) -> Any:
        return self.modules[f"{PACKAGE}.{name}"]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


# --- the workloads ---------------------------------------------------------------------------------

def clear_id_caches(tree: Tree) -> None:
    mapping = tree.module("dag.mapping")
    for name in ("run_id_of", "node_db_id"):
        cache_clear = getattr(getattr(mapping, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


class Databases:
    """A migrated, empty SQLite file per revision (made once), copied for every run."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.templates: dict[str, Path] = {}
        self.count = 0

    def fresh(self, tree: Tree) -> Path:
        template = self.templates.get(tree.label)
        if template is None:
            template = self.templates[tree.label] = self.scratch / f"template-{tree.label}.db"
            tree.module("dag.database").ensure_schema(f"sqlite:///{template}")
            conn = sqlite3.connect(template)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        self.count += 1
        path = self.scratch / f"run-{tree.label}-{self.count}.db"
        shutil.copyfile(template, path)
        return path

    @staticmethod
    def drop(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def prepare_export(tree: Tree, batches: list[list[Any]],
                   dbs: Databases) -> tuple[Callable[[], None], Callable[[], Any]]:
    """(the timed export, the untimed clean-up returning the database path) of one run."""
    path = dbs.fresh(tree)
    url = f"sqlite:///{path}"
    tree.module("dag.database").ensure_schema(url)  # the per-URL schema check, outside the timer
    exporter = tree.module("exporters.dag").DagSpanExporter(url, spill=False)
    exporter._get_writer().engine.connect().close()  # its connection opened before the timer (the pool keeps it)
    success = sys.modules["opentelemetry.sdk.trace.export"].SpanExportResult.SUCCESS
    clear_id_caches(tree)

    def run() -> None:
        for batch in batches:
            if exporter.export(batch) is not success:
                raise SystemExit(f"bench_ab: {tree.label}'s DagSpanExporter reported FAILURE")

    def done() -> Path:
        exporter.shutdown()
        return path

    return run, done


def prepare_mapping(tree: Tree, batches: list[list[Any]],
                    dbs: Databases) -> tuple[Callable[[], None], Callable[[], Any]]:
    mapping, statements = tree.module("dag.mapping"), tree.module("dag.statements")
    tables = tree.module("dag.schema").metadata.tables
    sql = statements.Sql("sqlite")
    cols = [sql.columns(tables[name]) for name in ("dag_nodes", "execution_events")]
    clear_id_caches(tree)

    def run() -> None:
        for batch in batches:
            mapped = mapping.map_spans(batch)
            sql.params(mapped.nodes.values(), cols[0])
            sql.params(mapped.events.values(), cols[1])

    return run, lambda: None


_bodies: dict[int, list[bytes]] = {}


def otlp_bodies(batches: list[list[Any]]) -> list[bytes]:
    """``batches`` as OTLP/HTTP protobuf request bodies (the SDK's encoder, shared by both revisions), made once."""
    bodies = _bodies.get(id(batches))
    if bodies is None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        bodies = _bodies[id(batches)] = [encode_spans(batch).SerializeToString() for batch in batches]
    return bodies


def prepare_ingest(tree: Tree, batches: list[list[Any]],
                   dbs: Databases) -> tuple[Callable[[], None], Callable[[], Any]]:
    """``cmbagent-otel ingest``'s path without HTTP: ``IngestCore.process`` of each request body (the
    CLI's settings and young-collection threshold) into a fresh migrated SQLite file."""
    bodies = otlp_bodies(batches)
    path = dbs.fresh(tree)
    core = tree.module("ingest").IngestServer(f"sqlite:///{path}", port=0, grpc_port="off").core
    writer = core._get_writer()
    writer.engine.connect().close()  # its connection opened before the timer (the pool keeps it)
    threshold = tree.module("cli.ingest").YOUNG_COLLECTION_THRESHOLD
    clear_id_caches(tree)

    def run() -> None:
        saved = gc.get_threshold()
        gc.set_threshold(threshold, *saved[1:])
        try:
            for body in bodies:
                ticket = core.admission.ticket()
                try:
                    outcome = core.process(body, "protobuf", None, ticket)
                finally:
                    ticket.close()
                if outcome.rejected:
                    raise SystemExit(f"bench_ab: {tree.label}'s ingest rejected spans: {outcome.error_message}")
        finally:
            gc.set_threshold(*saved)

    def done() -> Path:
        writer.engine.dispose()
        return path

    return run, done


def prepare_decode(tree: Tree, batches: list[list[Any]],
                   dbs: Databases) -> tuple[Callable[[], None], Callable[[], Any]]:
    """The ingest's decoding alone: request bodies to ``ReadableSpan``s, the CLI's limits, no database."""
    bodies = otlp_bodies(batches)
    decode = tree.module("otlp_decode")
    limits = tree.module("ingest").IngestServer("sqlite:///unused.db", port=0, grpc_port="off").core.limits

    def run() -> None:
        for body in bodies:
            for _ in decode.iter_protobuf(body, json_safe=True, limits=limits, chunk=1000):
                pass

    return run, lambda: None


PREPARE = {"export": prepare_export, "mapping": prepare_mapping, "ingest": prepare_ingest, "decode": prepare_decode}


def timed(tree: Tree, workload: str, batches: list[list[Any]], dbs: Databases,
          measure: Callable[[Callable[[], None]], float]) -> float:
    with tree.active():
        run, done = PREPARE[workload](tree, batches, dbs)
        gc.collect()
        try:
            return measure(run)
        finally:
            path = done()
            if path is not None:
                Databases.drop(path)


def thread_cpu(run: Callable[[], None]) -> float:
    start = time.thread_time()
    run()
    return time.thread_time() - start


class OpcodeCounter:
    """Bytecodes run inside a call (``sys.settrace`` opcode events), in all and per function of ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.total = 0
        self.by_function: collections.Counter[str] = collections.Counter()

    def __call__(self, run: Callable[[], None]) -> float:
        counts: dict[Any, int] = collections.defaultdict(int)

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[frame.f_code] += 1
            return local

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            frame.f_trace_opcodes = True
            return local

        sys.settrace(on_call)
        try:
            run()
        finally:
            sys.settrace(None)
        for code, count in counts.items():
            self.total += count
            if code.co_filename.startswith(self.root):
                name = f"{Path(code.co_filename).relative_to(self.root)}:{getattr(code, 'co_qualname', code.co_name)}"
                self.by_function[name] += count
        return float(sum(counts.values()))


# --- the row check -----------------------------------------------------------------------------------

def raw_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows in rowid order, every column (autoincrement ids included), as stored."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT "
                                             "LIKE 'sqlite_%' AND name NOT LIKE 'alembic%' ORDER BY name")]
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall() for table in tables}
    finally:
        conn.close()


def check_rows(trees: Sequence[Tree], corpus: Callable[[int, int], list[Any]], dbs: Databases,
               prepare: Callable[..., tuple[Callable[[], None], Callable[[], Any]]] = prepare_export,
               ) -> tuple[int, list[str]]:
    """(rows compared, tables that differ) after both revisions store the check corpus (``prepare``:
    through the DAG exporter, or through the ingest)."""
    spans = corpus(sum(n for n, _ in CHECK_SHAPE), 4242)
    batches: list[list[Any]] = []
    start = 0
    for count, size in CHECK_SHAPE:
        part = spans[start:start + count]
        batches.extend(part[i:i + size] for i in range(0, len(part), size))
        start += count
    dumps = []
    for tree in trees:
        with tree.active():
            run, done = prepare(tree, batches, dbs)
            run()
            path = done()
        dumps.append(raw_rows(path))
        Databases.drop(path)
    differing = sorted(t for t in dumps[0].keys() | dumps[1].keys() if dumps[0].get(t) != dumps[1].get(t))
    return sum(len(rows) for rows in dumps[0].values()), differing


# --- reporting ---------------------------------------------------------------------------------------

def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    sys.path.insert(0, str(HERE))
    from _stats import quartiles

    return quartiles(values)


def report_times(trees: Sequence[Tree], per_span: dict[str, list[float]], unit: str) -> None:
    base, new = trees
    for tree in trees:
        q1, med, q3 = _quartiles(per_span[tree.label])
        print(f"  {tree.label:<5} {tree.ref} ({tree.sha}): {med:9.2f} {unit}/span (IQR {q1:.2f}-{q3:.2f}), "
              f"{len(per_span[tree.label])} runs")
    ratios = [n / b for b, n in zip(per_span[base.label], per_span[new.label], strict=True) if b]
    q1, med, q3 = _quartiles(ratios)
    diffs = [n - b for b, n in zip(per_span[base.label], per_span[new.label], strict=True)]
    d1, dmed, d3 = _quartiles(diffs)
    print(f"  paired new / base: {med:.4f} (IQR {q1:.4f}-{q3:.4f}); new - base {dmed:+.2f} {unit}/span "
          f"(IQR {d1:+.2f}-{d3:+.2f}); new faster in {sum(r < 1 for r in ratios)} of {len(ratios)} rounds")


# --- callgrind -----------------------------------------------------------------------------------------

def run_under_callgrind(args: argparse.Namespace, argv: Sequence[str]) -> int:
    sys.path.insert(0, str(HERE))
    import bench_instructions as bi

    why = bi._missing()
    if why is not None:
        print(f"bench_ab: skipped: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_ab_cg.") as scratch:
        library = bi.build_toggle(Path(scratch))
        if library is None:
            return 2
        child = [a for a in argv if a != "--instructions"]
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={scratch}/cg.%p", "--dump-instr=no",
                   "--separate-threads=yes", sys.executable, str(Path(__file__).resolve()), *child,
                   "--toggle", str(library), "--no-check", "--rounds", str(args.rounds if args.rounds_given else 3)]
        print("bench_ab: running the rounds under callgrind (a few minutes)...", file=sys.stderr)
        done = subprocess.run(command, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        print(done.stdout, end="")
        found = bi.read_dumps(Path(scratch))
        spans = args.spans
        per_span = {label: [d.ir() / spans for d in dumps] for label, dumps in found.items()}
        if set(per_span) != {"base", "new"}:
            print(f"bench_ab: callgrind dumps missing: {sorted(per_span)}", file=sys.stderr)
            return 1
        print(f"\ninstructions per span (callgrind, PYTHONHASHSEED=0, {args.spans} spans per run, "
              f"{len(per_span['base'])} rounds)")
        for label in ("base", "new"):
            q1, med, q3 = _quartiles(per_span[label])
            print(f"  {label:<5} {med:12,.0f} (IQR {q1:,.0f}-{q3:,.0f})")
        ratio = statistics.median(per_span["new"]) / statistics.median(per_span["base"])
        print(f"  new / base {ratio:.4f} ({(ratio - 1) * 100:+.2f} %)")
        return 0


# --- main ----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (any git ref)")
    parser.add_argument("--new", default=WORKTREE, help=f"the revision under test (default {WORKTREE}: the checkout "
                                                        "as it is, uncommitted changes included)")
    parser.add_argument("--workload", choices=WORKLOADS, default="export")
    parser.add_argument("--spans", type=int, default=5120, help="spans per timed run (default 5120)")
    parser.add_argument("--batch", type=int, default=512, help="spans per export (default 512)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, each running both (default 20; "
                                                                 "--bytecodes 1, --instructions 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--bytecodes", action="store_true", help="count bytecodes instead of CPU time")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--allow-different", action="store_true", help="time them even when their rows differ")
    parser.add_argument("--no-check", action="store_true", help="skip the row check")
    parser.add_argument("--top", type=int, default=15, help="--bytecodes: functions listed (default 15)")
    parser.add_argument("--toggle", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds_given = args.rounds is not None
    if args.rounds is None:
        args.rounds = 1 if args.bytecodes else 20
    if args.instructions and not args.toggle:
        return run_under_callgrind(args, argv)
    if any(_ours(name) for name in sys.modules):
        print(f"bench_ab: {PACKAGE} is imported already; run this script without it on PYTHONPATH",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    toggle = None
    if args.toggle:
        import ctypes

        toggle = ctypes.CDLL(args.toggle)

    with tempfile.TemporaryDirectory(prefix="bench_ab.") as scratch_dir:
        scratch = Path(scratch_dir)
        try:
            trees = [Tree("base", args.base, scratch / "trees"), Tree("new", args.new, scratch / "trees")]
        except subprocess.CalledProcessError as exc:
            print(f"bench_ab: cannot materialise a revision: {exc.stderr!r}", file=sys.stderr)
            return 2
        import _corpus

        with trees[0].active(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            template = _corpus.record_demo()

        def corpus(count: int, seed: int) -> list[Any]:
            return list(_corpus.replicate(template, count, seed=seed))

        print(f"bench_ab: base {args.base} ({trees[0].sha}), new {args.new} ({trees[1].sha}); workload "
              f"{args.workload}, {args.spans} spans per run in batches of {args.batch}; corpus: {len(template)} "
              f"spans per demo run, cloned")
        dbs = Databases(scratch)
        if not args.no_check:
            compared, differing = check_rows(
                trees, corpus, dbs, prepare_ingest if args.workload in ("ingest", "decode") else prepare_export)
            print(f"rows ({sum(n for n, _ in CHECK_SHAPE)} spans, rowid order, every column): "
                  f"{'identical' if not differing else 'DIFFERENT in ' + ', '.join(differing)} ({compared} rows)")
            if differing and not args.allow_different:
                return 1
        spans = corpus(args.spans, 1)
        batches = [spans[i:i + args.batch] for i in range(0, len(spans), args.batch)]
        if args.bytecodes:
            counters = {tree.label: OpcodeCounter(tree.src) for tree in trees}
            for _ in range(args.warmup):
                for tree in trees:
                    timed(tree, args.workload, batches, dbs, thread_cpu)
            for rep in range(args.rounds):
                for tree in trees if rep % 2 == 0 else trees[::-1]:
                    timed(tree, args.workload, batches, dbs, counters[tree.label])
            runs = args.rounds * args.spans
            print(f"\nbytecodes per span (sys.settrace opcode events, every Python function; {args.rounds} "
                  f"round(s))")
            for tree in trees:
                print(f"  {tree.label:<5} {tree.ref} ({tree.sha}): {counters[tree.label].total / runs:10.1f}")
            base, new = (counters[t.label] for t in trees)
            print(f"  new - base: {(new.total - base.total) / runs:+.1f}\n  package functions that moved most "
                  "(per span: base -> new):")
            names = base.by_function.keys() | new.by_function.keys()
            moved = sorted(names, key=lambda n: -abs(new.by_function[n] - base.by_function[n]))
            for name in moved[:args.top]:
                if new.by_function[name] != base.by_function[name]:
                    print(f"    {base.by_function[name] / runs:8.1f} -> {new.by_function[name] / runs:8.1f}  {name}")
            return 0
        cpu: dict[str, list[float]] = {tree.label: [] for tree in trees}
        for rep in range(args.warmup + args.rounds):
            for tree in trees if rep % 2 == 0 else trees[::-1]:
                if toggle is not None and rep >= args.warmup:
                    def measure(run: Callable[[], None], label: str = tree.label, rep: int = rep) -> float:
                        toggle.cg_start()
                        run()
                        toggle.cg_stop(f"{label}:{rep}".encode())
                        return 0.0
                else:
                    measure = thread_cpu
                value = timed(tree, args.workload, batches, dbs, measure)
                if rep >= args.warmup:
                    cpu[tree.label].append(value / args.spans * 1e6)
            if rep >= args.warmup and toggle is None:
                print(f"  round {rep - args.warmup + 1}: " + ", ".join(
                    f"{label} {values[-1]:.1f}" for label, values in cpu.items()) + " us/span", file=sys.stderr)
        if toggle is not None:
            print(f"  base {trees[0].ref} ({trees[0].sha}), new {trees[1].ref} ({trees[1].sha})")
            return 0
        print(f"\nCPU of the measuring thread, {args.rounds} rounds (order alternating)")
        report_times(trees, cpu, "us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
