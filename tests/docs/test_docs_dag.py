"""docs/dag.md against the schema, the migrations and the rows a run leaves (twenty-fourth campaign).

Found: the doc said the exporter leaves cmbagent's other tables (``files``, ``checkpoints``, ...)
empty, but it writes ``files`` rows for the files a cmbagent run left in its work dir.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, semconv, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag import database, schema
from cmbagent_otel.dag.query import VERSION_TABLE

from ._read import number, table, ticked

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "dag.md").read_text()


def _section(start: str, end: str) -> str:
    return DOC.split(start, 1)[1].split(end, 1)[0]


def _tables(text_: str) -> list[str]:
    return [name for name in ticked(text_) if name in schema.Base.metadata.tables]


def _documented() -> tuple[set[str], set[str], set[str]]:
    """(tables the doc says the exporter writes, cmbagent's other tables, those of them it fills too)."""
    writes = _section("The exporter writes", "The database also gets")
    others = _section("The database also gets", "Table names, column names")
    listed, _, exceptions = others.partition("except")
    return set(_tables(writes)), set(_tables(listed)), set(_tables(exceptions.split(":", 1)[0]))


def test_docs_table_lists_are_the_schema() -> None:
    written, others, _filled = _documented()
    assert written == set(schema.TRACKING_TABLES)
    assert others == set(schema.CMBAGENT_TABLES)
    assert written | others == set(schema.Base.metadata.tables)


def test_docs_revisions_are_the_migrations() -> None:
    documented = [ticked(revision)[0] for revision, _ in table(DOC, "| revision | what it does |")]
    shipped = sorted(p.stem for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert documented == shipped
    assert documented[-1] in database.head_revisions()
    assert f"`{VERSION_TABLE}`" in DOC


def test_docs_tables_a_run_fills_are_those_the_doc_names(sqlite_url: str, provider: Any, tmp_path: Path) -> None:
    """A cmbagent-like run (its workflow span lists the work dir's files) fills only the tables the
    doc says the exporter writes, and the ones it says stay empty stay empty."""
    mtime = time.time_ns()
    files = (f"data/result.csv\t4\t{mtime}", f"codebase/fit.py\t9\t{mtime}")
    with workflow("docs", mode="planning-control", task="t", work_dir=str(tmp_path),
                  attributes={semconv.WORKFLOW_FILES: files}), phase("control"), step(1, "go", agent="engineer"):
        pass
    provider.store(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            counts = {name: conn.execute(text(f"SELECT count(*) FROM {name}")).scalar()
                      for name in schema.Base.metadata.tables}
    finally:
        engine.dispose()
    written, others, filled = _documented()
    assert counts["files"] == 2
    assert {name for name, count in counts.items() if count} <= written | filled
    assert not {name: counts[name] for name in others - filled if counts[name]}


def test_docs_useful_sql_runs(sqlite_url: str, provider: Any) -> None:
    """docs/dag.md's "Useful SQL" queries, as written, on a stored run (SQLite)."""
    with workflow("docs", mode="planning-control"), phase("control"), step(1, "go", agent="engineer"), \
            TracedSpan("chat scripted", "llm", {"gen_ai.agent.name": "engineer"}):
        pass
    provider.store(sqlite_url)
    block = _section("## Useful SQL\n\n```sql\n", "```")
    queries = [q.strip() for q in re.sub(r"--[^\n]*\n", "", block).split(";") if q.strip()]
    assert len(queries) == 2
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            run = conn.execute(text("SELECT id FROM workflow_runs")).scalar()
            nodes = conn.execute(text(queries[0]), {"run": run}).all()
            assert {row[0] for row in nodes} >= {"control", "step_1", "terminator"}
            step_id = next(row[0] for row in conn.execute(text("SELECT id, meta FROM dag_nodes"))
                           if '"id":"step_1"' in row[1])
            events = conn.execute(text(queries[1]), {"node_db_id": step_id}).all()
            assert [(row[1], row[2]) for row in events] == [("agent_call", "llm")]
    finally:
        engine.dispose()


def test_docs_event_kinds_of_the_demo(tmp_path: Path) -> None:
    """docs/dag.md's table of execution events by `cmbagent.span.kind`, on the rows of the demo run (a
    failing code execution included: `code_exec / error`)."""
    import json

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import cmbagent_otel
    from cmbagent_otel.dag.writer import DagWriter
    from cmbagent_otel.demo import run_demo

    documented: dict[str, tuple[str, ...]] = {}
    for kinds, mapping in table(DOC, "| `cmbagent.span.kind` | event_type / event_subtype |"):
        named = re.fullmatch(r"([a-z_, ]+?)(?: \(.*?\))?(?:, any other kind)?", kinds)
        pair = re.match(r"([a-z_]+) / ([a-z_]+)", mapping)
        assert named and pair, (kinds, mapping)
        for kind in named.group(1).split(", "):
            documented[kind] = pair.groups()
    memory, tracers = InMemorySpanExporter(), TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.uninstrument()
    cmbagent_otel.instrument(tracer_provider=tracers, instrument_cmbagent=False, metrics=False)
    try:
        run_demo(str(tmp_path / "work"))
    finally:
        cmbagent_otel.uninstrument()
    url = f"sqlite:///{tmp_path}/demo.db"
    writer = DagWriter(url)
    try:
        writer.write(list(memory.get_finished_spans()))
    finally:
        writer.close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT event_type, event_subtype, status, meta FROM execution_events")).all()
    finally:
        engine.dispose()
    seen = set()
    for event_type, subtype, status, meta in rows:
        kind = json.loads(meta)["attributes"].get("cmbagent.span.kind")
        expected = documented[kind]
        if kind == "code_execution" and status == "failed":
            expected = ("code_exec", "error")
        assert (event_type, subtype) == expected, (kind, event_type, subtype)
        seen.add(kind)
    assert {"llm", "agent", "conversation", "tool", "code_execution", "speaker_selection"} <= seen


def test_docs_status_values_a_run_leaves_are_named(sqlite_url: str, provider: Any) -> None:
    """Twenty-ninth campaign: every status a completed, a failed and a cancelled run leave in
    ``workflow_runs``, ``session_states`` and ``dag_nodes`` is one the doc's mapping names for that
    table (the ``workflow_runs`` row named completed/failed only, not ``cancelled``)."""
    with workflow("ok", mode="planning-control", session_id="s-ok"), phase("control"), step(1, "go"):
        pass
    with pytest.raises(RuntimeError), workflow("bad", mode="planning-control", session_id="s-bad"), \
            phase("control"), step(1, "go"):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), workflow("stop", mode="planning-control", session_id="s-stop"), \
            phase("control"), step(1, "go"):
        raise KeyboardInterrupt
    provider.store(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            runs = dict(conn.execute(text("SELECT session_id, status FROM workflow_runs")).all())
            sessions = dict(conn.execute(text("SELECT session_id, status FROM session_states")).all())
            nodes = {row[0] for row in conn.execute(text("SELECT status FROM dag_nodes"))}
    finally:
        engine.dispose()
    assert runs == {"s-ok": "completed", "s-bad": "failed", "s-stop": "cancelled"}
    assert sessions == {"s-ok": "completed", "s-bad": "suspended", "s-stop": "suspended"}
    words = {ticked(row)[0]: set(re.findall(r"[a-z]+", source)) for row, source in table(DOC, "| row | from |")}
    assert set(runs.values()) <= words["workflow_runs"]
    assert set(sessions.values()) <= words["session_states"]
    assert "`suspended` for a failed or cancelled one" in DOC
    assert nodes <= set(re.findall(r"[a-z]+", _section("**DAG nodes**", "**order_index**")))


# SQLite's primary result codes by the name docs/dag.md gives them (sqlite3.h)
_SQLITE_CODES = {"busy": 5, "locked": 6, "read-only": 8, "I/O": 10, "corrupt": 11, "full": 13, "protocol": 15,
                 "no LFS": 22, "not a database": 26, "permission": 3, "auth": 23, "can't open": 14}


def _codes(text_: str) -> set[str]:
    return set(re.findall(r"\b\d[0-9A-Z]{1,4}\b", text_))


def test_docs_retried_and_remigrating_error_codes_are_the_classifiers() -> None:
    """Session 41: docs/dag.md listed the SQLSTATEs retried as of session 26 (no 28, 42501, 25006, 3D000,
    nor 3F000 among those that migrate again) and six of SQLite's twelve retried codes."""
    from cmbagent_otel.dag import errors

    retried = set(errors._PG_RETRY_PREFIXES) | errors._PG_RETRY_CODES
    listed = _section("`cmbagent_otel.dag.errors`: SQLite ", "), so an")
    sqlite_names, _, postgres = listed.partition("; SQLSTATE")
    names = [re.sub(r"\s+", " ", name).strip() for name in sqlite_names.split(",")]
    assert {_SQLITE_CODES[name] for name in names} == errors._SQLITE_RETRY | {errors._SQLITE_CANTOPEN}
    assert _codes(postgres) == retried
    assert _codes(_section("A missing table, column or schema (", ")")) == errors._PG_SCHEMA_CODES
    reliability = (ROOT / "docs" / "reliability.md").read_text().split("and SQLSTATE (", 1)[1]
    retry, _, migrate = reliability.split(": migrate again)", 1)[0].partition(": retry;")
    assert (_codes(retry), _codes(migrate)) == (retried, errors._PG_SCHEMA_CODES)


def test_docs_export_and_replay_numbers_are_the_codes() -> None:
    """Session 41 (third pass): the export, spill and read timings docs/dag.md gives held; locked here."""
    import importlib

    from cmbagent_otel import processor, spill
    from cmbagent_otel.dag import _watchdog
    from cmbagent_otel.dag.query import READ_LOCK_WAIT_MS

    dag = importlib.import_module("cmbagent_otel.exporters.dag")
    text = " ".join(DOC.split())

    def stated(pattern: str) -> float:
        return number(text, pattern)

    assert stated(r"exponential backoff \((\d+(?:\.\d+)?) s doubling") == dag.INITIAL_BACKOFF_S
    assert stated(r"doubling to (\d+(?:\.\d+)?) s\)") == dag.MAX_BACKOFF_S
    assert stated(r"`CMBAGENT_OTEL_EXPORT_TIMEOUT` > (\d+) s\)") == dag.DEFAULT_TIMEOUT_S
    assert stated(r"for (\d+) s after a spill later batches") == dag.DEGRADED_S
    assert stated(r"later batches get one (\d+(?:\.\d+)?) s attempt") == dag.DEGRADED_ATTEMPT_S
    assert stated(r"\(at most (\d+) s of replay per export\)") == dag.REPLAY_SLICE_S
    assert stated(r"for up to (\d+) s at shutdown") * 1000 == processor.SHUTDOWN_REPLAY_MS
    assert stated(r"At most (\d+) spans per file") == spill.MAX_SPANS_PER_FILE
    assert stated(r"still in use (\d+) s past the deadline") == _watchdog.GRACE_S
    assert stated(r"a read waits at most (\d+) s for a table") * 1000 == READ_LOCK_WAIT_MS
    assert stated(r"and exports within (\d+(?:\.\d+)?) s") * 1000 == processor.DEFAULT_LIVE_DELAY_MS
