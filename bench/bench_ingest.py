"""``cmbagent-otel ingest``: server CPU per span into the DAG, and its RSS over 30k spans.

The server runs as an operator runs it (``python -m cmbagent_otel.ingest``, a subprocess,
OTLP/HTTP on an ephemeral port, gRPC off) writing a fresh SQLite database (``--db`` for
another). The client posts the corpus of ``bench_export.py`` (the offline demo run cloned
under fresh trace ids, end-time order) as OTLP/HTTP protobuf requests of ``--batch`` spans
(512: the SDK's OTLP exporter default), encoded before the clock starts, one request at a
time on a keep-alive connection. A first request (not counted) migrates the schema and
warms the server up. Server CPU (user + system from ``/proc/<pid>/stat``) per span and RSS
(``VmRSS``) after every request are read from outside; each repetition is a new server
and database. Reported: CPU us/span median and IQR, RSS after warm-up, at 10k/20k/30k
spans and the peak.

    python bench/bench_ingest.py                   # 30k spans, 3 repetitions
    python bench/bench_ingest.py --spans 30000 --batch 512 --repeat 5
    python bench/bench_ingest.py --server-src /tmp/base/src --server-src src   # A/B, alternated
    python bench/bench_ingest.py --bytecodes       # exact: Python bytecodes per span, in-process
    python bench/bench_ingest.py --split           # where the CPU goes, in-process, against the SQLite floor

``--split`` runs the server's own path in this process (``IngestCore.process`` per request body, the
CLI's limits and young-collection threshold, no HTTP) and its parts, interleaved in rotating order
per repetition, CPU of this thread per span: ``decode`` (bodies to ``ReadableSpan``s, limits
checked), ``decode, no limits`` (the same without the bounds: what the checks cost), ``decode +
mapping`` (the column redaction an ingest client's spans get, ``mapping.redact_columns``, the mapping
and the node and event rows' parameters, no database), ``ingest`` (all of it, into a
fresh SQLite file) and ``floor``: the same final rows written by plain ``sqlite3`` with every
decision taken before the timer (``bench_export.FloorPlan`` over the decoded requests, from the
ingest's own database; same schema and pragmas, one transaction per request). The floor is what
any writer of these rows pays SQLite; floor + decode + mapping is the least this path could cost
if its writes cost nothing beyond the floor's. Compare ``ingest`` with the server CPU of the
default run for what HTTP adds.

Targets: <= 90 us server CPU per span; RSS plateau <= 96 MiB at 30k spans.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _stats import quartiles

HERE = Path(__file__).resolve().parent
TARGET_CPU_US = 90.0
TARGET_RSS_MIB = 96.0
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def server_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def server_rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def encode(batches: list[list[object]]) -> list[bytes]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return [encode_spans(batch).SerializeToString() for batch in batches]  # type: ignore[arg-type]


def one_server(bodies: list[bytes], warm: bytes, db: str, server_src: str | None = None) -> tuple[float, list[float]]:
    """Serve ``bodies`` with a new server; returns (CPU seconds, RSS MiB after each body).

    ``server_src``: the ``src`` folder of another checkout to run the server from (A/B)."""
    env = dict(os.environ)
    if server_src:
        env["PYTHONPATH"] = os.pathsep.join([server_src, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "cmbagent_otel.ingest", "--db", db, "--port", "0",
                             "--grpc-port", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"ingest did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
        url = line.split("listening on ", 1)[1].split()[0]
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)

        def post(body: bytes) -> None:
            conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"ingest answered {response.status}")

        post(warm)  # the reply comes after the spans are written: nothing of it is left to run
        cpu0 = server_cpu(proc.pid)
        rss = [server_rss_mib(proc.pid)]
        for body in bodies:
            post(body)
            rss.append(server_rss_mib(proc.pid))
        cpu = server_cpu(proc.pid) - cpu0
        conn.close()
        return cpu, rss
    finally:
        proc.terminate()
        proc.wait(30)


def _process(core: Any, body: bytes) -> int:
    """One OTLP/protobuf body through the server's own path (admission ticket, decode, write),
    without HTTP; returns the spans written."""
    ticket = core.admission.ticket()
    try:
        return core.process(body, "protobuf", None, ticket).written
    finally:
        ticket.close()


def count_bytecodes(bodies: list[bytes], warm: bytes, db: str) -> tuple[float, float]:
    """(bytecodes per span of decoding alone, of decoding and writing) over ``bodies``, in this
    process: the server's own path (``IngestCore.process``, the CLI's settings) without HTTP,
    counted by ``sys.settrace`` opcode events after a warm-up; exact, whatever the load."""
    from cmbagent_otel.ingest import IngestServer
    from cmbagent_otel.otlp_decode import iter_protobuf

    core = IngestServer(db, port=0, grpc_port="off").core

    post = functools.partial(_process, core)

    def decode(body: bytes) -> int:
        return sum(len(batch.spans) for batch in iter_protobuf(body, json_safe=True, limits=core.limits, chunk=1000))

    post(warm)
    figures = []
    for step in (decode, post):
        count = spans = 0

        def tracer(frame: Any, event: str, _arg: Any) -> Any:
            nonlocal count
            frame.f_trace_opcodes = True
            if event == "opcode":
                count += 1
            return tracer

        sys.settrace(tracer)
        try:
            for body in bodies:
                spans += step(body)
        finally:
            sys.settrace(None)
        figures.append(count / spans)
    return figures[0], figures[1]


def split(template: list[Any], warm: bytes, spans: int, batch: int, repeat: int) -> None:
    """Print the in-process split of the ingest path's CPU per span (see the module's doc)."""
    import gc

    import _corpus

    from cmbagent_otel.cli.ingest import YOUNG_COLLECTION_THRESHOLD

    gc.collect()
    gc.freeze()  # as the CLI's server process does
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    cpu: dict[str, list[float]] = {name: [] for name in SPLIT}
    differing: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-ingest-split-") as tmp:
        for rep in range(repeat):
            bodies = encode(list(_corpus.batches(_corpus.replicate(template, spans, seed=rep + 1), batch)))
            differing.update(split_once(bodies, warm, spans, f"{tmp}/{rep}", rep, cpu))
            print(f"  rep {rep + 1}: " + ", ".join(f"{name} {cpu[name][-1] / spans * 1e6:.1f}" for name in SPLIT)
                  + " us/span", file=sys.stderr)
    print(f"ingest path in-process (OTLP/HTTP protobuf bodies of {batch} spans, no HTTP): {spans:,} spans, "
          f"{repeat} repetitions, CPU of this thread; the floor's rows are the ingest's: "
          f"{'yes' if not differing else 'NO: ' + ', '.join(sorted(differing))}")
    med = {}
    for name in SPLIT:
        q1, med[name], q3 = quartiles(v / spans * 1e6 for v in cpu[name])
        print(f"  {name:<18} {med[name]:7.1f} us/span (IQR {q1:.1f}-{q3:.1f})")
    mapping = med["decode + mapping"] - med["decode"]
    rest = med["ingest"] - med["decode + mapping"]
    print(f"  split of ingest: decode {med['decode']:.1f} (limit checks "
          f"{med['decode'] - med['decode, no limits']:.1f}), column redaction, mapping and row parameters "
          f"{mapping:.1f}, writing "
          f"{rest:.1f} (SQLite floor {med['floor']:.1f}, the rest {rest - med['floor']:.1f})")
    least = med["floor"] + med["decode + mapping"]
    print(f"  least for this path with writes at the floor's cost: floor + decode + mapping = {least:.1f} us/span; "
          f"target {TARGET_CPU_US:g}: {'reachable' if least <= TARGET_CPU_US else 'out of reach'}"
          f"{'' if med['floor'] <= TARGET_CPU_US else ' (the floor alone is above it)'}")


SPLIT = ("decode", "decode, no limits", "decode + mapping", "ingest", "floor")


def split_once(bodies: list[bytes], warm: bytes, spans: int, prefix: str, rep: int,
               cpu: dict[str, list[float]]) -> set[str]:
    """One repetition of :func:`split`: each part once, in rotating order, its CPU appended to ``cpu``;
    returns the tables whose rows differ between the ingest's database and the floor's (first repetition)."""
    import gc
    import time

    from bench_export import FloorPlan, clear_id_caches, run_floor, same_rows

    from cmbagent_otel.dag.mapping import map_spans, redact_columns
    from cmbagent_otel.dag.schema import metadata
    from cmbagent_otel.dag.statements import Sql
    from cmbagent_otel.ingest import IngestServer
    from cmbagent_otel.otlp_decode import iter_protobuf

    sql = Sql("sqlite")
    columns = [sql.columns(metadata.tables[name]) for name in ("dag_nodes", "execution_events")]
    core = IngestServer(f"sqlite:///{prefix}-ingest.db", port=0, grpc_port="off").core
    limits = core.limits

    post = functools.partial(_process, core)

    post(warm)  # schema, connection, memos
    # the floor's plan: the ingest's final rows, from an untimed ingest of the same requests
    ref = f"{prefix}-ref.db"
    ref_core = IngestServer(f"sqlite:///{ref}", port=0, grpc_port="off").core
    requests = [[s for part in iter_protobuf(body, json_safe=True, limits=limits) for s in part.spans]
                for body in [warm, *bodies]]
    clear_id_caches()
    for request in requests:
        ref_core.write(request)
    clear_id_caches()
    plan = FloorPlan(requests, ref)

    def decode(bounds: Any = limits) -> None:
        for body in bodies:
            for _ in iter_protobuf(body, json_safe=True, limits=bounds, chunk=1000):
                pass

    def decode_map() -> None:
        clear_id_caches()
        for body in bodies:
            for part in iter_protobuf(body, json_safe=True, limits=limits, chunk=1000):
                mapped = map_spans(redact_columns(part.spans))  # as IngestCore._store
                sql.params(mapped.nodes.values(), columns[0])
                sql.params(mapped.events.values(), columns[1])

    def ingest() -> None:
        clear_id_caches()
        if sum(post(body) for body in bodies) != spans:
            raise SystemExit("ingest rejected spans")

    def floor() -> None:
        run_floor(plan, f"{prefix}-floor.db")  # the warm request's statements too: 66 spans more

    runs = dict(zip(SPLIT, (decode, lambda: decode(None), decode_map, ingest, floor), strict=True))
    order = list(SPLIT[rep % len(SPLIT):] + SPLIT[:rep % len(SPLIT)])
    for name in order:
        gc.collect()
        start = time.thread_time()
        runs[name]()
        cpu[name].append(time.thread_time() - start)
    return set(same_rows(f"{prefix}-ingest.db", f"{prefix}-floor.db")) if rep == 0 else set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=None,
                        help="spans per repetition (default 30,000; 3,072 with --bytecodes)")
    parser.add_argument("--batch", type=int, default=512, help="spans per OTLP request (SDK default 512)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file per repetition)")
    parser.add_argument("--server-src", action="append", default=[], metavar="DIR",
                        help="A/B: run the server from this checkout's src folder (the corpus and the client "
                        "stay this one's); given twice, the two servers alternate, each repetition on both")
    parser.add_argument("--bytecodes", action="store_true",
                        help="count Python bytecodes per span in-process instead (exact; 3,072 spans unless --spans)")
    parser.add_argument("--split", action="store_true",
                        help="in-process split (decode, limits, mapping, writes) against the SQLite floor")
    args = parser.parse_args(argv)
    if args.spans is None:
        args.spans = 3_072 if args.bytecodes else 30_000
    sys.path.insert(0, str(HERE))
    import _corpus
    from bench_export import quiet_corpus

    template = quiet_corpus(False)
    warm = encode([list(_corpus.replicate(template, 66, seed=10_000))])[0]
    if args.split:
        split(template, warm, args.spans, args.batch, args.repeat)
        return 0
    if args.bytecodes:
        spans = args.spans
        bodies = encode(list(_corpus.batches(_corpus.replicate(template, spans, seed=1), args.batch)))
        with tempfile.TemporaryDirectory(prefix="cmbagent-otel-ingest-bench-") as tmp:
            decoding, whole = count_bytecodes(bodies, warm, args.db or f"sqlite:///{tmp}/ingest.db")
        print(f"ingest in-process ({spans:,} spans, {args.batch} per request): {whole:.1f} bytecodes per span "
              f"decoded and written, of which decoding {decoding:.1f} (exact; the database's own work is not counted)")
        return 0
    servers: list[str | None] = list(args.server_src) or [None]
    cpus: dict[str | None, list[float]] = {server: [] for server in servers}
    rss_runs: dict[str | None, list[list[float]]] = {server: [] for server in servers}
    with tempfile.TemporaryDirectory(prefix="cmbagent-otel-ingest-bench-") as tmp:
        for rep in range(args.repeat):
            batches = list(_corpus.batches(_corpus.replicate(template, args.spans, seed=rep + 1), args.batch))
            bodies = encode(batches)
            # alternated, the first server first on even repetitions: a drift in the machine's speed
            # falls on both alike
            for turn, server in enumerate(servers if rep % 2 == 0 else servers[::-1]):
                db = args.db or f"sqlite:///{tmp}/ingest-{rep}-{turn}.db"
                cpu, rss = one_server(bodies, warm, db, server)
                cpus[server].append(cpu / args.spans * 1e6)
                rss_runs[server].append(rss)
                print(f"  rep {rep + 1}{f' {server}' if server else ''}: {cpus[server][-1]:.1f} us server CPU/span, "
                      f"RSS {rss[0]:.1f} -> {rss[-1]:.1f} MiB (peak {max(rss):.1f})", file=sys.stderr)
    print(f"ingest (OTLP/HTTP protobuf, {args.batch} spans per request) into "
          f"{'the given database' if args.db else 'SQLite'}: {args.spans:,} spans, {args.repeat} repetitions")
    met = True
    for server in servers:
        if server:
            print(f"server from {server}:")
        met = report(cpus[server], rss_runs[server], args.spans, args.batch) and met
    return 0 if met else 1


def report(cpus: list[float], rss_runs: list[list[float]], spans: int, per_body: int) -> bool:
    """Print one server's figures; whether both targets are met."""
    q1, median, q3 = quartiles(cpus)

    def at(run: list[float], count: int) -> float:
        return run[min(len(run) - 1, max(0, count // per_body))]

    print(f"server CPU per span: {median:.1f} us (IQR {q1:.1f}-{q3:.1f})")
    marks = [m for m in (10_000, 20_000, 30_000) if m <= spans]
    for index, run in enumerate(rss_runs):
        print(f"  RSS run {index + 1}: after warm-up {run[0]:.1f} MiB, " + ", ".join(
            f"{m // 1000}k {at(run, m):.1f}" for m in marks) + f", peak {max(run):.1f} MiB")
    peak = statistics.median(max(run) for run in rss_runs)
    cpu_ok, rss_ok = median <= TARGET_CPU_US, peak <= TARGET_RSS_MIB
    print(f"CPU <= {TARGET_CPU_US:g} us/span: {'PASS' if cpu_ok else 'MISS'}; "
          f"RSS peak {peak:.1f} MiB <= {TARGET_RSS_MIB:g}: {'PASS' if rss_ok else 'MISS'}")
    return cpu_ok and rss_ok

if __name__ == "__main__":
    raise SystemExit(main())
