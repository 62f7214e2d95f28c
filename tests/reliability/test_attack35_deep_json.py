"""JSON nested past the parser's depth is invalid JSON, never an error of ours (35th attack campaign).

``json.loads`` raises ``RecursionError``, not ``ValueError``, for a document nested deeper than the
interpreter's recursion limit (``"[" * 100_000``: 200 KB, well inside every size bound). The places
that parse text someone else wrote caught ``ValueError`` only, so:

* an ingest client's span whose ``gen_ai.input.messages`` (or output messages) held such text made the
  DAG mapping raise: the whole request answered 500, every span of it lost (OTLP clients do not retry
  a 500);
* another writer's run row whose ``meta`` held it made our writer fail every later batch of that run;
* such a ``meta``, ``inputs`` or ``outputs`` made ``dag`` and ``events`` end in a traceback (on
  PostgreSQL, whose ``json`` takes 3,000 levels, psycopg parsed it while fetching the row: the reader
  now casts its JSON columns to text in SQL);
* a spill file whose header line held it made ``replay`` end in a traceback, the file left in place
  to fail every later replay;
* a tool returning such text (content capture on) lost its recorded result.

Every such parse now goes through ``_jsontext.loads``, which refuses the document with ``ValueError``
as it refuses any other invalid JSON: the text is kept as text, the row's JSON read as no JSON.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main
from cmbagent_otel.dag.statements import decode_json
from cmbagent_otel.dag.writer import DagWriter
from cmbagent_otel.ingest import IngestServer
from cmbagent_otel.spill import SpillStore

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client, outcome

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_META = '{"tokens": ' + DEEP + "}"


def _span(name: str, attributes: dict[str, str]) -> tuple[str, dict[str, Any]]:
    span_id = secrets.token_hex(8)
    return span_id, {
        "traceId": secrets.token_hex(16), "spanId": span_id, "name": name, "kind": 1,
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()]}


def test_an_ingest_request_with_deep_json_texts_stores_every_span(sqlite_url: str) -> None:
    ids, spans = [], []
    for key in (None, "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.result",
                "gen_ai.tool.call.arguments"):
        attributes = {"gen_ai.operation.name": "chat", **({key: DEEP} if key else {})}
        span_id, span = _span(f"chat {key}", attributes)
        ids.append(span_id)
        spans.append(span)
    doc = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"scope": {"name": "js"},
                                                                               "spans": spans}]}]}
    with IngestServer(sqlite_url, host="127.0.0.1", port=0, grpc_port="off") as srv:
        request = urllib.request.Request(srv.endpoint, data=json.dumps(doc).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
    assert status == 200, body  # 500 "internal error" before
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            stored = {decode_json(m)["span_id"] for (m,) in conn.execute(text("SELECT meta FROM execution_events"))}
            contents = [c for (c,) in conn.execute(text("SELECT content FROM messages"))]
    finally:
        engine.dispose()
    assert set(ids) <= stored
    assert contents and all(c.startswith("[[[") for c in contents)  # kept as the text it is


@pytest.fixture
def db(tmp_path: Path, provider: Any) -> Path:
    path = tmp_path / "cmbagent.db"
    with workflow("fit the spectrum", mode="one-shot"), phase("control"), step(1, "fit", agent="engineer"):
        pass
    provider.store(f"sqlite:///{path}")
    return path


def _nest_every_json_column(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:  # another writer's rows
        conn.execute("UPDATE workflow_runs SET meta = ?", (DEEP_META,))
        conn.execute("UPDATE dag_nodes SET meta = ?", (DEEP_META,))
        conn.execute("UPDATE execution_events SET meta = ?, inputs = ?, outputs = ?", (DEEP_META, DEEP, DEEP))
    conn.close()


def test_our_writer_writes_a_run_whose_meta_another_writer_nested_deep(db: Path, provider: Any) -> None:
    _nest_every_json_column(db)
    writer = DagWriter(f"sqlite:///{db}")
    try:  # the same spans again: the writer compares them with the stored rows
        writer.write(list(provider.memory.get_finished_spans()))  # RecursionError before
    finally:
        writer.close()


@pytest.mark.parametrize("command", [["runs"], ["runs", "--format", "json"], ["dag", "latest"],
                                     ["dag", "latest", "--format", "json"], ["events", "latest"],
                                     ["events", "latest", "--format", "json"]], ids=" ".join)
def test_the_cli_reads_rows_nested_deep(db: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _nest_every_json_column(db)
    assert main(["--db", f"sqlite:///{db}", *command]) == 0  # RecursionError before (dag, events)
    assert capsys.readouterr().out.strip()


@pytest.mark.postgres
def test_the_cli_reads_postgresql_rows_nested_past_the_parsers_depth(pg_url: str, provider: Any,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # PostgreSQL's json type takes 3,000 levels; psycopg parsed such a value itself while the row was
    # fetched (a type given to the result alone does not stop it), so the CLI ended in a traceback
    with workflow("fit the spectrum", mode="one-shot"), phase("control"), step(1, "fit", agent="engineer"):
        pass
    provider.store(pg_url)
    deep = '{"tokens": ' + "[" * 3000 + "]" * 3000 + "}"
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            for table in ("workflow_runs", "dag_nodes", "execution_events"):
                conn.execute(text(f"UPDATE {table} SET meta = CAST(:m AS json)"), {"m": deep})
    finally:
        engine.dispose()
    for command in (["runs"], ["dag", "latest"], ["events", "latest"], ["events", "latest", "--format", "json"]):
        assert main(["--db", pg_url, *command]) == 0, command  # RecursionError before (dag, events)
        assert capsys.readouterr().out.strip()


def test_replay_sets_aside_a_spill_file_whose_header_is_nested_deep(tmp_path: Path, provider: Any) -> None:
    with workflow("fit the spectrum", mode="one-shot"):
        pass
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    bad = spill / "spill-00000000000000000001-1-000001.jsonl"  # first in replay order
    bad.write_bytes(b'{"format": ' + DEEP.encode() + b"}\n")
    SpillStore(spill).append(list(provider.memory.get_finished_spans()))
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}"
    main(["replay", "--spill-dir", str(spill), "--to", url])  # RecursionError before
    assert not bad.exists() and bad.with_name(bad.name + ".bad").exists()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM workflow_runs")).scalar() == 1
    finally:
        engine.dispose()


def _deep_result(multipole: int) -> str:
    """A tool answering with JSON text nested 100,000 deep."""
    return DEEP


@needs_custom_client
def test_a_tool_result_nested_deep_is_recorded_as_text(tmp_path: Path) -> None:
    plain = outcome(lambda: group_chat(tmp_path / "plain", tool=_deep_result))
    capture = Capture()
    with instrumented_with(capture, capture_content=True):
        traced = outcome(lambda: group_chat(tmp_path / "traced", tool=_deep_result))
    assert traced[0] == plain[0] == "ok" and len(traced[1]) == len(plain[1])
    (tool,) = capture.named("execute_tool")
    assert json.loads(tool.attributes["gen_ai.tool.call.result"]).startswith("[[[")  # left out before
