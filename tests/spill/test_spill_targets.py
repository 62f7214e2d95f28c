"""Spill files: OTLP protobuf with a header naming their database; replay writes only there
(or where ``--to`` says) and says where it wrote; leftovers of crashed writers are dealt with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cmbagent_otel.exporters import dag as dag_exporter
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from sqlalchemy import create_engine

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import target_of, upgrade
from cmbagent_otel.dag.writer import DagWriter, dump_tables
from cmbagent_otel.spill import OTLP_SUFFIX, SUFFIX, SpillStore, file_target, read_spill, span_to_record

CLI = Path(sys.executable).with_name("cmbagent-otel")


def run(capture, steps: int = 2) -> list[ReadableSpan]:
    with workflow("spilled", mode="planning-control"), phase("control"):
        for number in range(1, steps + 1):
            with step(number, f"goal {number} ü"):
                for call in range(3):
                    with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": call,
                                                             "gen_ai.request.model": "m", "tags": ("a", "b")}):
                        pass
    return capture.spans


def dump(url: str) -> dict:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return dump_tables(conn)
    finally:
        engine.dispose()


def written(spans, url: str) -> dict:
    writer = DagWriter(url)
    writer.write(spans)
    writer.close()
    return dump(url)


def replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, check=False)


def test_otlp_spill_file_writes_the_same_rows_as_the_spans(capture, tmp_path):
    spans = run(capture)
    store = SpillStore(tmp_path / "spill", target_of(f"sqlite:///{tmp_path}/a.db"))
    (path,) = store.append(spans)
    assert path.name.endswith(OTLP_SUFFIX)
    spill = read_spill(path)
    assert spill.target == target_of(f"sqlite:///{tmp_path}/a.db") and spill.rejected == 0
    assert written(spill.spans, f"sqlite:///{tmp_path}/a.db") == written(spans, f"sqlite:///{tmp_path}/b.db")


def _odd_span(name: str, attributes: dict) -> ReadableSpan:
    ctx = SpanContext(0x1234, 0x99, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(name=name, context=ctx, resource=Resource({}), attributes=attributes,
                        kind=SpanKind.INTERNAL, start_time=10, end_time=5)


def test_spans_otlp_cannot_carry_exactly_go_to_json_lines(capture, tmp_path):
    spans = run(capture, steps=1)
    odd = [_odd_span("lone \udc80 surrogate", {"cmbagent.span.kind": "llm", "big": 2**70}),
           _odd_span("", {"text": "x\udcff"})]
    store = SpillStore(tmp_path / "spill", "sqlite:///x")
    paths = store.append([*spans, *odd])
    assert sorted(p.suffix for p in paths) == [SUFFIX, OTLP_SUFFIX]
    back = [s for p in paths for s in read_spill(p).spans]
    assert len(back) == len(spans) + 2
    by_name = {s.name: s for s in back}
    assert by_name["lone \udc80 surrogate"].attributes["big"] == 2**70
    assert by_name[""].attributes["text"] == "x\udcff" and by_name[""].end_time == 5


def test_exporter_replays_only_its_own_database(capture, tmp_path):
    spans = run(capture)
    spill_dir = tmp_path / "spill"
    url_a, url_b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    SpillStore(spill_dir, target_of(url_b)).append(spans)  # b's spill in the shared folder
    exporter = DagSpanExporter(url_a, spill_dir=spill_dir)
    assert exporter.replay() == (0, 0)
    assert exporter.export(spans[:1]).name == "SUCCESS"
    exporter.shutdown()
    assert len(SpillStore(spill_dir).pending()) == 1  # still there, for b
    other = DagSpanExporter(url_b, spill_dir=spill_dir)
    assert other.replay() == (len(spans), 0)
    other.shutdown()
    assert dump(url_b) == written(spans, f"sqlite:///{tmp_path}/ref.db")


@pytest.mark.postgres
def test_plain_replay_writes_a_postgres_spill_into_postgres_and_says_so(capture, tmp_path, monkeypatch, pg_schema):
    spans = run(capture)
    monkeypatch.setenv("CMBAGENT_DEFAULT_WORK_DIR", str(tmp_path / "work"))  # the default SQLite DB
    monkeypatch.delenv("CMBAGENT_OTEL_DATABASE_URL", raising=False)
    spill_dir = tmp_path / "spill"
    with pg_schema() as pg:
        upgrade(pg)
        SpillStore(spill_dir, target_of(pg)).append(spans)
        done = replay_cli("replay", "--spill-dir", str(spill_dir))
        assert done.returncode == 0, done.stderr
        assert f"into {target_of(pg)}" in done.stdout and "0 spill files left" in done.stdout
        assert not (tmp_path / "work" / "database" / "cmbagent.db").exists()
        assert dump(pg)["execution_events"]


def test_replay_db_option_selects_and_to_redirects(capture, tmp_path):
    spans = run(capture)
    spill_dir = tmp_path / "spill"
    url_a, url_b, url_c = (f"sqlite:///{tmp_path}/{n}.db" for n in "abc")
    SpillStore(spill_dir, target_of(url_a)).append(spans[:5])
    SpillStore(spill_dir, target_of(url_b)).append(spans[5:])
    only_a = replay_cli("--db", url_a, "replay", "--spill-dir", str(spill_dir))
    assert only_a.returncode == 0, only_a.stderr
    assert f"into {target_of(url_a)}" in only_a.stdout and "b.db" not in only_a.stdout
    assert [file_target(p) for p in SpillStore(spill_dir).pending()] == [target_of(url_b)]
    to_c = replay_cli("replay", "--spill-dir", str(spill_dir), "--to", url_c)
    assert to_c.returncode == 0, to_c.stderr
    assert f"recorded for {target_of(url_b)}) into {url_c}" in to_c.stdout
    assert SpillStore(spill_dir).pending() == []
    assert dump(url_c) == written(spans[5:], f"sqlite:///{tmp_path}/ref.db")


def test_old_json_lines_spill_files_replay_only_where_told(capture, tmp_path):
    spans = run(capture)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    old = spill_dir / "spill-00000000000000000001-1-000001.jsonl"  # format 1: no header, no database
    old.write_text("".join(json.dumps(span_to_record(s)) + "\n" for s in spans))
    url = f"sqlite:///{tmp_path}/a.db"
    exporter = DagSpanExporter(url, spill_dir=spill_dir)
    exporter.export(spans[:1])
    exporter.shutdown()
    assert old.exists()  # not guessed into the exporter's database
    refused = replay_cli("replay", "--spill-dir", str(spill_dir))
    assert refused.returncode != 0 and "--to" in refused.stderr and old.exists()
    done = replay_cli("replay", "--spill-dir", str(spill_dir), "--to", url)
    assert done.returncode == 0, done.stderr
    assert f"no recorded database) into {url}" in done.stdout and not old.exists()
    assert dump(url) == written(spans, f"sqlite:///{tmp_path}/ref.db")


def test_leftover_tmp_files_are_recovered_or_removed(capture, tmp_path, caplog):
    spans = run(capture)
    spill_dir = tmp_path / "spill"
    url = f"sqlite:///{tmp_path}/a.db"
    store = SpillStore(spill_dir, target_of(url))
    complete, partial = store.append(spans[:6])[0], store.append(spans[6:])[0]
    dead = 2**22 + 12345  # beyond the default pid range: no such process
    names = []
    for path, cut in ((complete, None), (partial, 40)):
        data = path.read_bytes()
        name = path.name.replace(f"-{os.getpid()}-", f"-{dead}-")
        (spill_dir / f"{name}.tmp").write_bytes(data if cut is None else data[:-cut])
        path.unlink()
        names.append(name)
    live = spill_dir / f"spill-{'9' * 20}-{os.getppid()}-000001-{'0' * 12}.otlp.tmp"
    live.write_bytes(b"being written")  # a live process's fresh .tmp is left alone
    empty = spill_dir / f"spill-{'8' * 20}-{dead}-000002-{'0' * 12}.otlp.tmp"
    empty.write_bytes(b"")  # killed between creating the file and writing its header
    assert store.recover() == 3
    assert (spill_dir / names[0]).exists() and not (spill_dir / f"{names[1]}.tmp").exists()
    assert not empty.exists() and not empty.with_suffix("").exists()
    assert "removing incomplete spill file" in caplog.text and live.exists()
    exporter = DagSpanExporter(url, spill_dir=spill_dir)
    assert exporter.replay() == (6, 0)
    exporter.shutdown()


def test_each_export_replays_a_bounded_slice_of_a_backlog(capture, tmp_path, monkeypatch):
    spans = run(capture, steps=5)
    spill_dir = tmp_path / "spill"
    url = f"sqlite:///{tmp_path}/a.db"
    store = SpillStore(spill_dir, target_of(url))
    for index in range(0, len(spans), 5):
        store.append(spans[index:index + 5])
    backlog = len(store.pending())
    assert backlog > 4
    monkeypatch.setattr(dag_exporter, "REPLAY_SLICE_S", 0.0)  # a slice: one file, however fast
    exporter = DagSpanExporter(url, spill_dir=spill_dir)
    for done in range(1, 4):
        assert exporter.export(spans[:1]).name == "SUCCESS"
        assert len(store.pending()) == backlog - done
    assert exporter.force_flush(60_000) and store.pending() == []
    exporter.shutdown()
    assert dump(url) == written(spans, f"sqlite:///{tmp_path}/ref.db")
