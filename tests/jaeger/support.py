"""Real Jaeger v2 processes for the ``jaeger`` tests, and the checks shared by them.

Jaeger v2 is an OpenTelemetry Collector distribution: the same binary runs Jaeger
(``examples/jaeger/jaeger.yaml``) and the collector fan-out
(``examples/collector_fanout/jaeger-collector.yaml``). ``./dev`` builds it from the Go module
proxy into ``.tools/jaeger/<version>/jaeger``; ``CMBAGENT_OTEL_JAEGER_BIN`` overrides it. While
``./dev test`` still builds it in the background, ``CMBAGENT_OTEL_JAEGER_PENDING`` names a lock file
the build holds: the first test that needs the binary waits for the build to finish, at most
``CMBAGENT_OTEL_JAEGER_BUILD_DEADLINE_S`` (default 1200 s), then the jaeger tests fail with the reason.
Spans are read back through Jaeger's query API (``/api/v3/traces/{id}``, OTLP/JSON) and
compared field by field with the in-memory copy the application kept of the same spans.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

ROOT = Path(__file__).resolve().parents[2]
JAEGER_CONFIG = ROOT / "examples" / "jaeger" / "jaeger.yaml"
COLLECTOR_CONFIG = ROOT / "examples" / "collector_fanout" / "jaeger-collector.yaml"
SHIPPED_COLLECTOR_CONFIG = ROOT / "otel-collector.yaml"
APP = Path(__file__).with_name("app.py")
BUILT_BINARY = ROOT / ".tools" / "jaeger" / "current" / "jaeger"

# a hang guard only (the service up ends the wait at once): generous, since CI runs three suites side
# by side on 2 cores and Phoenix (test_view_trace_backends starts it with service()) took over 180 s
# to start at load 13
STARTUP_DEADLINE_S = 600.0
ARRIVAL_DEADLINE_S = 60.0
POLL_S = 0.1
INGEST_TOKEN = "jaeger-tests-token"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


#: how long the first test that needs Jaeger waits for ``./dev test``'s background build (about 4 minutes
#: cold on 2 cores, seconds warm): a build that hangs (a Go module proxy that stops answering) hung the
#: whole test run without a word
BUILD_DEADLINE_S = float(os.environ.get("CMBAGENT_OTEL_JAEGER_BUILD_DEADLINE_S", "") or 1200)


@functools.cache
def _wait_for_pending_build(deadline_s: float | None = None) -> str | None:
    """Blocks until the background build named by CMBAGENT_OTEL_JAEGER_PENDING (``./dev test``) is
    over (the build holds an exclusive lock on that file for its whole run), at most ``deadline_s``
    (default :data:`BUILD_DEADLINE_S`). Returns why the wait failed, else ``None``; cached, so the
    other tests fail at once with the same reason instead of each waiting again."""
    pending = os.environ.get("CMBAGENT_OTEL_JAEGER_PENDING", "").strip()
    if not pending:
        return None
    try:
        fd = os.open(pending, os.O_RDONLY)
    except OSError:
        return None  # no such lock file: no build is pending
    limit = BUILD_DEADLINE_S if deadline_s is None else deadline_s
    over = threading.Event()

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # no timeout of its own: this thread blocks, the test waits on it
            over.set()
        finally:
            os.close(fd)

    threading.Thread(target=wait, name="jaeger-build-wait", daemon=True).start()
    if over.wait(limit):
        return None
    return (f"the background Jaeger build is not over after {limit:.0f} s (it holds the lock {pending}): "
            f"hung or very slow; ./dev shows its log at the end of the run (or run `./dev setup --jaeger` "
            f"alone); CMBAGENT_OTEL_JAEGER_BUILD_DEADLINE_S sets this deadline")


def jaeger_binary() -> Path:
    """The Jaeger v2 binary; skips locally without one, fails under CI (the tests must run there), and
    fails when a pending background build does not end within :data:`BUILD_DEADLINE_S`."""
    failure = _wait_for_pending_build()
    if failure is not None:
        pytest.fail(failure)
    configured = os.environ.get("CMBAGENT_OTEL_JAEGER_BIN", "").strip()
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"CMBAGENT_OTEL_JAEGER_BIN={configured} is not an executable file")
        return path
    if BUILT_BINARY.is_file():
        return BUILT_BINARY
    go = "Go is on PATH" if shutil.which("go") else "Go is NOT on PATH: install it first"
    reason = (f"no Jaeger binary at {BUILT_BINARY} and CMBAGENT_OTEL_JAEGER_BIN is unset: run "
              f"`./dev setup --jaeger` to build it from the Go module proxy ({go})")
    if in_ci():
        pytest.fail(f"{reason} [CI={os.environ.get('CI')}: the jaeger tests may not be skipped]")
    pytest.skip(reason)


@contextmanager
def free_ports(count: int, *, every_address: bool = False) -> Iterator[list[int]]:
    """Distinct free ports, held (bound, never listening) until the block ends: start the services on
    them inside it. A port let go before its service binds it is anyone's meanwhile (an ephemeral port
    of another suite's connection: the service then failed to start). The services take them over
    while held: Go, uvicorn, gRPC and ``IngestServer`` listen with ``SO_REUSEADDR``, as these sockets
    are bound. ``every_address``: free on all addresses, dual-stack (Phoenix binds its gRPC port on
    ``[::]``, so a port free on 127.0.0.1 alone is not enough); loopback otherwise."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = None
            if every_address:
                try:
                    sock = stack.enter_context(socket.socket(socket.AF_INET6))
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("::", 0))
                except OSError:  # no IPv6 on this host: [::] is then IPv4's 0.0.0.0
                    sock = None
            if sock is None:
                sock = stack.enter_context(socket.socket())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0" if every_address else "127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        yield ports


def http_get(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    """Status and decoded JSON body (None when the body is not JSON) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def reachable(url: str) -> bool:
    try:
        return http_get(url, timeout=2.0)[0] == 200
    except OSError:
        return False


@dataclass
class Service:
    """A subprocess with its log; ``stop`` ends it (terminate, then kill)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def service(name: str, argv: list[str], env: Mapping[str, str], log: Path,
            ready: Callable[[], bool]) -> Iterator[Service]:
    """Start ``argv``, poll ``ready`` until it holds (or fail at the deadline), stop it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    svc = Service(name, proc, log)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} before it was ready:\n{svc.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {STARTUP_DEADLINE_S:.0f}s:\n{svc.tail()}")
            time.sleep(POLL_S)
        yield svc
    finally:
        svc.stop()


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without OTEL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


@dataclass
class Jaeger:
    """Addresses of a running Jaeger (or Jaeger-as-collector) process."""

    service: Service
    otlp_grpc: str   # http://127.0.0.1:port (OTEL_EXPORTER_OTLP_ENDPOINT for grpc)
    otlp_http: str   # http://127.0.0.1:port (the exporter appends /v1/traces)
    query: str       # http://127.0.0.1:port: UI, /api/*, /api/v3/*
    health: str      # http://127.0.0.1:port/status


@contextmanager
def run_jaeger(config: Path, workdir: Path, name: str, **extra_env: str) -> Iterator[Jaeger]:
    """Run the Jaeger binary with ``config`` on free loopback ports until the block ends."""
    binary = jaeger_binary()
    with free_ports(5) as (grpc, http, query, query_grpc, health):
        env = clean_env(
            JAEGER_OTLP_GRPC_ENDPOINT=f"127.0.0.1:{grpc}",
            JAEGER_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{http}",
            JAEGER_QUERY_HTTP_ENDPOINT=f"127.0.0.1:{query}",
            JAEGER_QUERY_GRPC_ENDPOINT=f"127.0.0.1:{query_grpc}",
            JAEGER_HEALTH_ENDPOINT=f"127.0.0.1:{health}",
            **extra_env,
        )
        status_url = f"http://127.0.0.1:{health}/status"
        query_url = f"http://127.0.0.1:{query}"

        def ready() -> bool:
            # healthcheckv2 answers 200 once every component reports OK; the query API must answer too
            return reachable(status_url) and reachable(f"{query_url}/api/services")

        with service(name, [str(binary), "--config", str(config)], env, workdir / f"{name}.log", ready) as svc:
            yield Jaeger(svc, f"http://127.0.0.1:{grpc}", f"http://127.0.0.1:{http}", query_url, status_url)


@contextmanager
def run_ingest(db_url: str, workdir: Path) -> Iterator[str]:
    """``cmbagent-otel ingest`` as a real subprocess on a free port; yields its base URL (OTLP/HTTP)."""
    cli = Path(sys.executable).with_name("cmbagent-otel")   # the console script of this environment
    command = [str(cli)] if cli.is_file() else [sys.executable, "-m", "cmbagent_otel.cli"]
    env = clean_env(CMBAGENT_OTEL_INGEST_TOKEN=INGEST_TOKEN)
    with free_ports(2) as (port, grpc_port):
        argv = [*command, "ingest", "--db", db_url, "--host", "127.0.0.1", "--port", str(port),
                "--grpc-port", str(grpc_port)]   # not used here: the collector exports OTLP/HTTP to it
        base = f"http://127.0.0.1:{port}"
        with service("ingest", argv, env, workdir / "ingest.log", lambda: reachable(f"{base}/health")):
            yield base


# ---------------------------------------------------------------- the application processes

def app_env(protocol: str, jaeger: Jaeger, service_name: str) -> dict[str, str]:
    """``OTEL_TRACES_EXPORTER=otlp`` over ``protocol`` (grpc or http/protobuf) to ``jaeger``."""
    endpoint = jaeger.otlp_grpc if protocol == "grpc" else jaeger.otlp_http
    return clean_env(
        # AG2's code executor runs `python` from PATH: this environment's, as if activated
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_SERVICE_NAME=service_name,
    )


def start_app(env: Mapping[str, str], out: Path, task: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(APP), str(out), task], env=dict(env), cwd=out.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_app(proc: subprocess.Popen[str], out: Path) -> dict[str, SpanView]:
    """Wait for an app process; returns its in-memory copy of the spans it exported."""
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return spans_of(json.loads(out.read_text()))


# ---------------------------------------------------------------- OTLP/JSON on both sides

@dataclass(frozen=True)
class SpanView:
    """Everything a backend must keep of a span (OTLP/JSON, hex ids, nanosecond times)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    status_code: int
    status_message: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    events: tuple[tuple[str, Mapping[str, Any]], ...]
    resource: Mapping[str, Any]


def any_value(value: Mapping[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])   # int64 is a JSON string in OTLP/JSON
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return tuple(any_value(v) for v in value["arrayValue"].get("values", []))
    if "kvlistValue" in value:
        return attributes_of(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def attributes_of(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {item["key"]: any_value(item.get("value", {})) for item in items}


def spans_of(traces: Mapping[str, Any]) -> dict[str, SpanView]:
    """``{span_id: SpanView}`` of an OTLP/JSON ``TracesData`` (``{"resourceSpans": [...]}``)."""
    spans: dict[str, SpanView] = {}
    for rs in traces.get("resourceSpans", []):
        resource = attributes_of(rs.get("resource", {}).get("attributes", []))
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                status = s.get("status", {})
                view = SpanView(
                    trace_id=s["traceId"].lower(),
                    span_id=s["spanId"].lower(),
                    parent_id=(s.get("parentSpanId") or "").lower() or None,
                    name=s["name"],
                    kind=int(s.get("kind", 0)),
                    status_code=int(status.get("code", 0)),
                    status_message=status.get("message", ""),
                    start_ns=int(s["startTimeUnixNano"]),
                    end_ns=int(s["endTimeUnixNano"]),
                    attributes=attributes_of(s.get("attributes", [])),
                    events=tuple((e["name"], attributes_of(e.get("attributes", []))) for e in s.get("events", [])),
                    resource=resource,
                )
                assert view.span_id not in spans, f"span {view.span_id} twice"
                spans[view.span_id] = view
    return spans


def trace_ids(spans: Mapping[str, SpanView]) -> set[str]:
    return {s.trace_id for s in spans.values()}


def read_trace(jaeger: Jaeger, trace_id: str, expected: int) -> dict[str, SpanView]:
    """The trace from Jaeger's query API once ``expected`` spans arrived (or at the deadline), as its
    adjusters show it. Until then it is polled raw (``raw_traces``): Jaeger's clock-skew adjuster, run on
    a trace whose parents had not arrived yet, left its "parent span ID=... is not in the trace" warning on
    the stored child spans, one per poll (four identical ones on a busy machine, CI on 70063e4), so the
    complete trace read afterwards still carried them."""
    url = f"{jaeger.query}/api/v3/traces/{trace_id}"
    deadline = time.monotonic() + ARRIVAL_DEADLINE_S
    spans: dict[str, SpanView] = {}
    while True:
        status, body = http_get(f"{url}?raw_traces=true")
        if status == 200:
            spans = spans_of(body["result"])
        elif status != 404:   # 404: no span of the trace stored yet
            pytest.fail(f"GET {url}: {status} {body}")
        if len(spans) >= expected or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    if not spans:
        return spans
    status, body = http_get(url)
    if status != 200:
        pytest.fail(f"GET {url}: {status} {body}")
    return spans_of(body["result"])


def assert_same_spans(remote: Mapping[str, SpanView], local: Mapping[str, SpanView]) -> None:
    """Jaeger holds exactly the spans the application exported, every field equal."""
    missing = sorted(local.keys() - remote.keys())
    extra = sorted(remote.keys() - local.keys())
    assert not missing and not extra, (
        f"missing in Jaeger: {[local[i].name for i in missing]}; not exported: {[remote[i].name for i in extra]}")
    diffs = []
    for span_id, want in local.items():
        got = asdict(remote[span_id])
        for field, value in asdict(want).items():
            if got[field] != value:
                diffs.append(f"{want.name} [{span_id}] {field}: Jaeger {got[field]!r} != exported {value!r}")
    assert not diffs, "\n".join(diffs)


def assert_ui_api_agrees(jaeger: Jaeger, spans: Mapping[str, SpanView]) -> None:
    """The API the Jaeger UI reads (``/api/traces/{id}``) shows the same spans and parent links."""
    (trace_id,) = trace_ids(spans)
    status, body = http_get(f"{jaeger.query}/api/traces/{trace_id}")
    assert status == 200, body
    (trace,) = body["data"]
    shown = {}
    for s in trace["spans"]:
        parents = [r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF"]
        shown[s["spanID"]] = (s["operationName"], parents[0] if parents else None)
    assert shown == {i: (s.name, s.parent_id) for i, s in spans.items()}
    services = {p["serviceName"] for p in trace["processes"].values()}
    assert services == {s.resource["service.name"] for s in spans.values()}


# ---------------------------------------------------------------- the workflow's tree

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


def ancestors(spans: Mapping[str, SpanView], span: SpanView) -> list[SpanView]:
    chain = []
    while span.parent_id is not None:
        span = spans[span.parent_id]   # KeyError: a parent is missing from the trace
        chain.append(span)
    return chain


def assert_workflow_tree(spans: Mapping[str, SpanView]) -> None:
    """The offline demo's tree: workflow > phase > step > invoke_agent > chat / execute_tool /
    execute_code, with the names, statuses and key attributes the instrumentation promises."""
    assert len(trace_ids(spans)) == 1
    roots = [s for s in spans.values() if s.parent_id is None]
    assert [r.name for r in roots] == ["workflow planning_and_control"]
    root = roots[0]
    assert root.attributes["cmbagent.span.kind"] == "workflow"
    assert root.attributes["cmbagent.workflow.mode"] == "planning-control"
    assert root.status_code != STATUS_ERROR

    by_prefix: dict[str, list[SpanView]] = {}
    for s in spans.values():
        by_prefix.setdefault(s.name.split(" ")[0], []).append(s)
    assert {"phase", "step", "redo", "invoke_agent", "chat", "execute_tool", "execute_code"} <= by_prefix.keys()
    assert sorted(s.name for s in by_prefix["phase"]) == ["phase control", "phase planning"]
    assert sorted(s.name for s in by_prefix["step"]) == ["step 1", "step 2", "step 3"]

    def lineage(span: SpanView) -> list[str]:
        """Kinds of the ancestors that make the cmbagent hierarchy, nearest first."""
        keep = ("invoke_agent", "step", "phase", "workflow")
        return [a.name.split(" ")[0] for a in ancestors(spans, span) if a.name.split(" ")[0] in keep]

    for kind in ("execute_tool", "execute_code"):
        for s in by_prefix[kind]:
            assert lineage(s)[:1] == ["invoke_agent"] and lineage(s)[-3:] == ["step", "phase", "workflow"], (
                s.name, lineage(s))
    step_chats = [s for s in by_prefix["chat"] if "step" in lineage(s)]
    assert step_chats and all(lineage(s)[:1] == ["invoke_agent"] for s in step_chats)
    for s in by_prefix["step"]:
        assert spans[s.parent_id].name == "phase control"   # type: ignore[index]
        assert s.attributes["cmbagent.dag.node"] == f"step_{s.attributes['cmbagent.step.number']}"

    for s in by_prefix["invoke_agent"]:
        assert s.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert s.name == f"invoke_agent {s.attributes['gen_ai.agent.name']}"
    for s in by_prefix["chat"]:
        assert s.attributes["gen_ai.operation.name"] == "chat"
        assert s.attributes["gen_ai.request.model"] == "scripted"
        assert s.attributes["gen_ai.usage.input_tokens"] > 0 and s.attributes["gen_ai.usage.output_tokens"] > 0
    (tool,) = by_prefix["execute_tool"]
    assert tool.name == "execute_tool peak_position"
    assert tool.attributes["gen_ai.tool.name"] == "peak_position" and tool.status_code != STATUS_ERROR
    exit_codes = sorted(s.attributes["cmbagent.code.exit_code"] for s in by_prefix["execute_code"])
    assert exit_codes == [0, 0, 1, 3]
    for s in by_prefix["execute_code"]:
        failed = s.attributes["cmbagent.code.exit_code"] != 0
        assert (s.status_code == STATUS_ERROR) == failed, s
    redo_status = {s.name: s.status_code for s in by_prefix["redo"]}
    assert redo_status["redo step 2 attempt 1"] == STATUS_ERROR
    assert redo_status["redo step 2 attempt 2"] != STATUS_ERROR


# ---------------------------------------------------------------- the DAG database

def _meta(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def db_rows(db_url: str, run_id: str) -> dict[str, Any]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            run = conn.execute(text("select status, mode, task_description from workflow_runs where id = :id"),
                               {"id": run_id}).one_or_none()
            nodes = [(_meta(m), t, s) for m, t, s in conn.execute(
                text("select meta, node_type, status from dag_nodes where run_id = :id"), {"id": run_id})]
            events = [(_meta(m), t, st, s) for m, t, st, s in conn.execute(
                text("select meta, event_type, event_subtype, status from execution_events where run_id = :id"),
                {"id": run_id})]
    finally:
        engine.dispose()
    return {"run": run, "nodes": nodes, "events": events}


def covered_span_ids(rows: Mapping[str, Any], root: SpanView) -> set[str]:
    ids = {m["span_id"] for m, *_ in rows["nodes"] if m.get("span_id")}
    ids |= {m["span_id"] for m, *_ in rows["events"] if m.get("span_id")}
    if rows["run"] is not None and rows["run"][0] != "executing":   # the workflow span itself arrived
        ids.add(root.span_id)
    return ids


def wait_for_db(db_url: str, spans: Mapping[str, SpanView]) -> dict[str, Any]:
    """The run's rows once every span is in the database (or at the deadline)."""
    (trace_id,) = trace_ids(spans)
    root = next(s for s in spans.values() if s.parent_id is None)
    run_id = str(uuid.UUID(hex=trace_id))
    deadline = time.monotonic() + ARRIVAL_DEADLINE_S
    while True:
        try:
            rows = db_rows(db_url, run_id)
        except OperationalError:
            # the ingest creates the schema with its first write (and holds SQLite's write lock)
            if time.monotonic() > deadline:
                raise
        else:
            if covered_span_ids(rows, root) >= spans.keys() or time.monotonic() > deadline:
                return rows
        time.sleep(POLL_S)


def assert_db_describes(rows: Mapping[str, Any], spans: Mapping[str, SpanView]) -> None:
    """The DAG rows describe the same trace as Jaeger's spans: one run, every span a node or an event."""
    root = next(s for s in spans.values() if s.parent_id is None)
    assert rows["run"] is not None, "no workflow_runs row for the trace"
    status, mode, task = rows["run"]
    assert status == ("failed" if root.status_code == STATUS_ERROR else "completed")
    assert mode == root.attributes["cmbagent.workflow.mode"]
    assert task == root.attributes["cmbagent.workflow.task"]

    def row_status(span: SpanView) -> str:
        return "failed" if span.status_code == STATUS_ERROR else "completed"

    for meta, node_type, node_status in rows["nodes"]:
        assert not meta.get("placeholder"), f"placeholder node left: {meta}"
        if not meta.get("span_id"):
            continue   # derived rows (terminator, branch points) have no span of their own
        span = spans[meta["span_id"]]
        assert (meta["id"], node_type, meta["span_name"]) == (
            span.attributes["cmbagent.dag.node"], span.attributes["cmbagent.dag.node_type"], span.name)
        assert node_status == row_status(span), (meta["id"], node_status, span.status_code)
    handoff_rows = set()
    for meta, _event_type, subtype, event_status in rows["events"]:
        assert subtype != "pending_span", f"placeholder event left: {meta}"
        if meta.get("span_id") is None:   # a speaker selection recorded as an event of the span it happened in
            span = spans[meta["parent_span_id"]]
            name, attrs = span.events[meta["event_index"]]
            assert (name, subtype, meta["trace_id"]) == ("cmbagent.handoff", "transfer", span.trace_id), meta
            assert attrs["cmbagent.handoff.from"] in meta["span_name"]
            handoff_rows.add((span.span_id, meta["event_index"]))
            continue
        span = spans[meta["span_id"]]
        assert (meta["span_name"], meta["trace_id"], meta.get("parent_span_id")) == (
            span.name, span.trace_id, span.parent_id)
        assert event_status == row_status(span), (span.name, event_status, span.status_code)
    row_span_ids = [m["span_id"] for m, *_ in [*rows["nodes"], *rows["events"]] if m.get("span_id")]
    assert len(row_span_ids) == len(set(row_span_ids)), "a span stored as two rows"
    handoff_events = {(s.span_id, i) for s in spans.values() for i, (name, _) in enumerate(s.events)
                      if name == "cmbagent.handoff"}
    assert handoff_rows == handoff_events, "handoff span events and handoff rows differ"
    covered = covered_span_ids(rows, root)
    assert covered == spans.keys(), (
        f"spans without a row: {sorted(spans[i].name for i in spans.keys() - covered)}; "
        f"rows without a span: {sorted(covered - spans.keys())}")
