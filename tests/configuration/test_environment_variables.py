"""Settings: one module lists every variable, one policy for bad values, the docs table never drifts."""

from __future__ import annotations

import ast
import logging
import re
import threading
from pathlib import Path

import pytest

from cmbagent_otel import environment_variables as env

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("src/cmbagent_otel", "exporters", "migrations") for p in (ROOT / d).rglob("*.py")]
NAME = re.compile(r"^(?:CMBAGENT_OTEL|OTEL|CMBAGENT)_[A-Z0-9_]+$")
NOT_READ = {"CMBAGENT_TABLES"}  # a name in dag/schema.py's __all__, not a variable


def _known() -> set[str]:
    settings = {n for s in env.SETTINGS.values() for n in (s.name, *s.also)}
    return settings | set(env.SDK_CHECKED) | set(env.HEADER_VARIABLES) | set(env.URL_VARIABLES) \
        | set(env.SDK_PROTOCOLS.values())


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_docs_table_is_the_modules_table() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split("<!-- settings-table:start -->\n", 1)[1].split("\n<!-- settings-table:end -->", 1)[0]
    assert table == env.markdown_table(), "regenerate the table with environment_variables.markdown_table()"


def test_every_variable_named_in_the_code_is_listed() -> None:
    named: dict[str, str] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and NAME.match(node.value):
                named.setdefault(node.value, str(path.relative_to(ROOT)))
    missing = {name: where for name, where in named.items() if name not in _known() | NOT_READ}
    assert not missing, f"variables read outside environment_variables.SETTINGS: {missing}"


def test_no_other_module_reads_the_environment() -> None:
    """``os.environ.get``, ``os.getenv`` and ``os.environ[...]`` only in environment_variables.py
    (redaction scans every variable's *value* for secrets, which is not a setting)."""
    readers = []
    for path in SOURCES:
        if path.name == "environment_variables.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Subscript)) else ""
            if text.startswith(("os.environ.get(", "os.getenv(", "os.environ[")):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not readers, readers


@pytest.mark.parametrize(("name", "bad"), [
    (env.EXPORT_TIMEOUT, "soon"), (env.EXPORT_TIMEOUT, "nan"), (env.SQLITE_BUSY_TIMEOUT_MS, "-1"),
    (env.COST_RECORDS, "per_run"), (env.BSP_MAX_QUEUE_SIZE, "0"), (env.MAX_ATTRIBUTE_LENGTH, "4k"),
    (env.CAPTURE_MESSAGE_CONTENT, "maybe"), (env.SDK_DISABLED, "yes please"),
    (env.TRACES_EXPORTER, "console,zipkin-typo"), (env.OTLP_TRACES_PROTOCOL, "carrier-pigeon"),
    (env.INGEST_PORT, "99999"), (env.INGEST_GRPC_PORT, "http"), (env.INGEST_WORKERS, "two"),
    (env.OFFLINE_BACKEND, "cloud"), (env.DATABASE_URL, "mysql://u:hunter2@db/x"),
    # in memory: each connection saw its own empty database, every span spilled for ever
    (env.DATABASE_URL, "sqlite:///:memory:"),
    (env.DATABASE_URL, "sqlite:///file:dag?mode=memory&cache=shared&uri=true"),
    # waits the platform cannot time (OverflowError in the thread waiting them)
    (env.BSP_SCHEDULE_DELAY, "1e26"), (env.EXPORT_TIMEOUT, "1e26"), (env.INGEST_REQUEST_TIMEOUT, "1e26"),
    (env.SQLITE_BUSY_TIMEOUT_MS, "99999999999"),
])
def test_a_bad_value_is_warned_once_and_the_default_used(name: str, bad: str, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    setting = env.SETTINGS[name]
    for other in (name, *setting.also):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(env.WORK_DIR, str(tmp_path))
    default = env.get(name)
    monkeypatch.setenv(name, bad)
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
        assert env.get(name) == default
        assert env.get(name) == default
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert ("hunter2" in warnings[0]) is False
    assert (bad in warnings[0]) is not setting.secret


def test_a_bad_value_gives_way_to_the_next_variable(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(env.BSP_SCHEDULE_DELAY, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    assert env.get(env.BSP_SCHEDULE_DELAY) == 250.0
    monkeypatch.setenv(env.BSP_SCHEDULE_DELAY, "later")
    with caplog.at_level(logging.WARNING, logger="cmbagent_otel"):
        assert env.get(env.BSP_SCHEDULE_DELAY) == 250.0
    assert "using OTEL_BSP_SCHEDULE_DELAY" in caplog.text
    monkeypatch.setenv(env.BSP_SCHEDULE_DELAY, "40")
    assert env.get(env.BSP_SCHEDULE_DELAY) == 40.0
    assert env.get(env.BSP_SCHEDULE_DELAY, 7) == 7  # an argument wins


def test_database_url_is_resolved_in_one_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cmbagent_otel.dag.database import resolve_url, target_of

    for name in (env.DATABASE_URL, env.CMBAGENT_DATABASE_URL):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env.WORK_DIR, str(tmp_path))
    assert env.database_url() == f"sqlite:///{tmp_path}/database/cmbagent.db" == resolve_url()
    monkeypatch.setenv(env.CMBAGENT_DATABASE_URL, "postgresql://u@h/cmb")
    assert env.database_url() == "postgresql://u@h/cmb"
    assert resolve_url() == "postgresql+psycopg://u@h/cmb" == target_of()
    monkeypatch.setenv(env.DATABASE_URL, "sqlite:///ours.db")
    assert env.database_url() == "sqlite:///ours.db" and env.database_url("sqlite:///arg.db") == "sqlite:///arg.db"
    monkeypatch.delenv(env.SPILL_DIR)
    assert env.get(env.SPILL_DIR) == str(tmp_path / "spill")


def test_consumers_fall_back_instead_of_failing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The modules that used to raise or silently ignore a bad value now warn and use the default."""
    from cmbagent_otel.exporters.dag import DagSpanExporter

    from cmbagent_otel.ingest import IngestServer
    from cmbagent_otel.instrumentation._content import ContentMode, capture_from_env
    from cmbagent_otel.provider import exporter_names
    from cmbagent_otel.redaction import max_length

    monkeypatch.setenv(env.INGEST_PORT, "not-a-port")
    monkeypatch.setenv(env.INGEST_WORKERS, "many")
    server = IngestServer(f"sqlite:///{tmp_path}/i.db", grpc_port="off")
    assert (server.requested_port, server.workers) == (4318, 2)
    with pytest.raises(ValueError, match="port must be within"):
        IngestServer(f"sqlite:///{tmp_path}/i.db", port="not-a-port")  # an argument is checked
    monkeypatch.setenv(env.TRACES_EXPORTER, "console,zipkin-typo")
    assert exporter_names() == ["cmbagent_dag"]
    monkeypatch.setenv(env.CAPTURE_MESSAGE_CONTENT, "sometimes")
    assert capture_from_env() is ContentMode.NO_CONTENT
    monkeypatch.setenv(env.MAX_ATTRIBUTE_LENGTH, "-5")
    assert max_length() == 4096
    monkeypatch.setenv(env.EXPORT_TIMEOUT, "a while")
    exporter = DagSpanExporter(f"sqlite:///{tmp_path}/e.db")
    assert exporter._timeout == 10.0
    exporter.shutdown()


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_a_batch_delay_too_long_to_wait_does_not_kill_the_worker(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1e26 ms made the worker's Condition.wait raise OverflowError ("timestamp out of range for
    # platform time_t"): the thread died and its spans were exported only at shutdown, if at all
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cmbagent_otel.processor import DurableBatchSpanProcessor

    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    for name in (env.BSP_SCHEDULE_DELAY, *env.SETTINGS[env.BSP_SCHEDULE_DELAY].also):
        monkeypatch.delenv(name, raising=False)
    if how == "environment":
        monkeypatch.setenv(env.BSP_SCHEDULE_DELAY, "1e26")
    exporter = InMemorySpanExporter()
    processor = DurableBatchSpanProcessor(exporter, schedule_delay_millis=1e26 if how == "argument" else None)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    provider.get_tracer("t").start_span("x").end()
    assert processor.force_flush(30_000)
    provider.shutdown()  # joins the worker: a thread that died has called the excepthook by then
    assert died == []
    assert [span.name for span in exporter.get_finished_spans()] == ["x"]
