"""What a user of the real cmbagent package sees, ninth audit (session 36).

An entry call that joins an enclosing run and raises before any solve of its own, caught by its caller: a
worker of ``summarize_documents`` whose document cannot be read (cmbagent counts it in ``failed_files`` and
goes on), and a ``one_shot`` whose documentation download is refused inside the application's own
``with workflow(...)`` (the app catches it and runs another). The run goes on and completes, so the failure
must be on a node of its own. And cmbagent's backend (the MARS fork's routers) reading our rows through
every reader of these tables, with their filters, on SQLite and on PostgreSQL alike, for two runs made one
after the other in one work dir. Each run is cmbagent's own (offline, scripted backend), exported by the DAG
exporter and read back as cmbagent's backend reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel.exporters.dag import DagSpanExporter

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import FakeOpenAIServer
from tests.conftest import PG_ENV, schema_in

from .scripted_cmbagent import API_KEYS, TASK, call_workflow, script_for
from .test_backend_rows import _mars_answers, _mars_python, _mars_source
from .test_cmbagent_runs import Run, SpanCapture, _exported, _named
from .test_cmbreal6_audit import _refused_download
from .test_real_audit import ApiDown, _final_rows, _nodes_of, _one_root_per_trace

pytestmark = pytest.mark.cmbagent_autogen


@pytest.fixture
def instrumented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Run]]:
    """Runs ``body(work)`` against the scripted backend for ``kind``, instrumented (``threads``: the
    threading instrumentation, which summarize_documents' workers need to join its run) or plain."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
    monkeypatch.chdir(tmp_path)  # cmbagent's fork writes chats/ into the working directory
    captures: list[SpanCapture] = []

    def run(kind: str, body: Callable[[Path], Any], instrumented: bool = True, threads: bool = False,
            responder: Callable[[Any], Any] | None = None) -> Run:
        capture = SpanCapture()
        captures.append(capture)
        work = tmp_path / ("otel" if instrumented else "plain")
        work.mkdir()
        script = script_for(kind)
        if instrumented:
            cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False, instrument_threading=threads)
        try:
            with FakeOpenAIServer(request_responder=responder(script) if responder else script) as server:
                monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
                results = body(work)
        finally:
            if instrumented:
                cmbagent_otel.uninstrument()
        assert script.unexpected == []
        return Run(results, list(script.sequence), [], work, capture.spans)

    yield run
    for capture in captures:
        capture.provider.shutdown()


def _unreadable_document(work: Path) -> dict[str, Any]:
    """summarize_documents over two papers and a folder named like one (``paper_3.md``: cmbagent's glob
    takes it, its ``open`` raises IsADirectoryError in the worker, which cmbagent catches and counts)."""
    import cmbagent

    papers = work.parent / f"{work.name}-papers"
    papers.mkdir()
    for k in (1, 2):
        (papers / f"paper_{k}.md").write_text(f"# Mock CMB spectra {k}\n\n{TASK}.\n", encoding="utf-8")
    (papers / "paper_3.md").mkdir()
    # one worker: the documents are solved in their sorted order, so the third is execute_3
    return cmbagent.summarize_documents(str(papers), work_dir_base=str(work), max_workers=1)  # type: ignore[no-any-return]


def _download_refused_then_engineer(work: Path) -> dict[str, Any]:
    """A notebook cell's run (the app's own ``workflow``): one_shot with cmbagent's CAMB context, whose
    documentation download is refused (the app catches the ConnectionError), then one_shot's engineer."""
    import cmbagent

    with cmbagent_otel.workflow("notebook cell", task=TASK):
        try:
            _refused_download(TASK, agent="camb_context", work_dir=str(work), api_keys=API_KEYS)
        except Exception as exc:  # the app's own handling: noted, and the next call made
            caught = type(exc).__name__
        results = cmbagent.one_shot(TASK, agent="engineer", work_dir=str(work), api_keys=API_KEYS)
    return {"caught": caught, "final_context": dict(results["final_context"])}


CASES = {
    # kind, body, threads, the node that failed, its error, the nodes that completed
    "summarize_documents": ("summarize_documents", _unreadable_document, True, "execute_3", "IsADirectoryError",
                            {"execute", "execute_2"}),
    "users_workflow": ("one_shot", _download_refused_then_engineer, False, "execute", "ConnectionError",
                       {"execute_2"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_joined_call_failing_before_its_solve_has_a_failed_execute(instrumented: Callable[..., Run],
                                                                  tmp_path: Path, case: str) -> None:
    """A joined entry call that raises before any solve, its exception caught by its caller: the run completes
    (cmbagent returned normally), and the call has its execute node, failed with the exception (type and
    message), no events, a red ``phase one_shot`` span with the exception event; the other solves' nodes are
    as before and the app's results are those of the plain run. On 5bc025a the call left no span and no row:
    the run showed two documents summarized and nothing of the third (cmbagent's result: 1 failed)."""
    kind, body, threads, failed, error, completed = CASES[case]
    plain = instrumented(kind, body, instrumented=False, threads=threads)
    run = instrumented(kind, body, threads=threads)
    if case == "summarize_documents":
        assert (run.results["processed_files"], run.results["failed_files"]) == (2, 1)
        assert [r["success"] for r in run.results["results"]] == [r["success"] for r in plain.results["results"]]
    else:
        assert run.results["caught"] == plain.results["caught"] == error
    assert run.sequence == plain.sequence
    _one_root_per_trace(run)
    red = [s for s in _named(run, "phase one_shot") if s.status.status_code is StatusCode.ERROR]
    assert len(red) == 1 and red[0].attributes[sc.DAG_NODE] == failed
    assert red[0].status.description.startswith(f"{error}: ")
    (exception,) = [e.attributes["exception.type"] for e in red[0].events if e.name == "exception"]
    assert exception.rsplit(".", 1)[-1] == error
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["status"] == "completed"
    nodes = _nodes_of(rows)
    top = {s: n["status"] for s, n in nodes.items() if n["parent_node_id"] is None}
    assert top == {"init": "completed", "terminator": "completed", failed: "failed"} | dict.fromkeys(completed,
                                                                                                   "completed")
    node = nodes[failed]
    assert node["meta"]["error"].startswith(f"{error}: ") and node["node_type"] == "agent"
    assert not [e for e in rows["events"] if e["node_id"] == node["id"]]
    assert not [n for n in nodes.values() if n["parent_node_id"] == node["id"]]
    mars = _mars_source(tmp_path)
    python = _mars_python()
    if mars is not None and python is not None:  # cmbagent's own backend serves it
        answers = _mars_answers(mars, python, url, tmp_path / "answers.json")
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
        dag = answers[f"{row['id']} dag"]
        assert {n["id"]: n["status"] for n in dag["nodes"]} == {s: n["status"] for s, n in nodes.items()}


def test_a_joined_call_that_solved_and_then_raised_gets_no_second_node(instrumented: Callable[..., Run],
                                                                       tmp_path: Path) -> None:
    """The rule's other side: a joined call whose solve ran and whose model then failed (the engineer's calls
    answered 500, the client's retries spent) already has its execute node failed by that solve; nothing is
    added (one ``phase one_shot``, one ``execute`` node)."""

    def body(work: Path) -> dict[str, Any]:
        import cmbagent

        with cmbagent_otel.workflow("notebook cell", task=TASK):
            try:
                cmbagent.one_shot(TASK, agent="engineer", work_dir=str(work), api_keys=API_KEYS)
            except Exception as exc:
                return {"caught": type(exc).__name__}
        return {"caught": None}

    down = lambda script: ApiDown(script, "engineer", 1)  # noqa: E731
    plain = instrumented("one_shot", body, instrumented=False, responder=down)
    run = instrumented("one_shot", body, responder=down)
    assert run.results == plain.results == {"caught": "InternalServerError"}
    (phase,) = _named(run, "phase one_shot")
    assert phase.status.status_code is StatusCode.ERROR
    rows = _final_rows(_exported(run, tmp_path))
    nodes = _nodes_of(rows)
    assert [s for s in nodes if s.startswith("execute") and nodes[s]["parent_node_id"] is None] == ["execute"]
    assert nodes["execute"]["status"] == "failed"


def _readers(mars: Path, python: str, url: str, out: Path) -> dict[str, Any]:
    os.environ["MARS_PROBE_READERS"] = "1"
    try:
        return _mars_answers(mars, python, url, out)
    finally:
        del os.environ["MARS_PROBE_READERS"]


def backend_answers(mars: Path, python: str, spans: Any, sqlite: str, base: str,
                    tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """cmbagent's backend readers' answers on the rows of ``spans``: from ``sqlite`` (already exported) and from a
    PostgreSQL schema under ``base`` the same spans are exported into, with the statuses of the runs stored there;
    no reader raised on either."""
    lite = _readers(mars, python, sqlite, tmp_path / "sqlite.json")
    with schema_in(base) as pg:
        exporter = DagSpanExporter(pg, spill=False)
        try:
            assert exporter.export(spans).name == "SUCCESS"
        finally:
            exporter.shutdown()
        statuses = [r["status"] for r in _final_rows(pg)["runs"]]
        pgsql = _readers(mars, python, pg, tmp_path / "pg.json")
    for answers in (lite, pgsql):
        assert {k: v["EXC"] for k, v in answers.items() if isinstance(v, dict) and "EXC" in v} == {}
    return lite, pgsql, statuses


def served_run(request: pytest.FixtureRequest, mars: Path, tmp_path: Path, function: Any,
               status: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One ``carryover`` run of ``function`` exported into SQLite and PostgreSQL and read by cmbagent's backend
    (skips without ``CMBAGENT_OTEL_MARS_PYTHON`` and a PostgreSQL URL): the run stored with ``status`` in both
    databases, both answering the same, the backend's DAG ours node for node, its history every event, the run's
    session listed. Returns (our final rows, our nodes by id, the run's row, the backend's SQLite answers)."""
    python = _mars_python()
    base = os.environ.get(PG_ENV)
    if python is None or not base:
        pytest.skip(f"set CMBAGENT_OTEL_MARS_PYTHON (fastapi, python-multipart, sqlalchemy, structlog, psycopg) and "
                    f"{PG_ENV}")
    run = request.getfixturevalue("run_cmbagent")("carryover", responder=lambda script: script, function=function)
    sqlite = _exported(run, tmp_path)
    rows = _final_rows(sqlite)
    (row,) = rows["runs"]
    assert row["status"] == status
    nodes = _nodes_of(rows)
    lite, pgsql, statuses = backend_answers(mars, python, run.spans, sqlite, base, tmp_path)
    assert statuses == [status]
    assert _comparable(pgsql) == _comparable(lite)
    dag = {n["id"]: n for n in lite[f"{row['id']} dag"]["nodes"]}
    assert {s: n["status"] for s, n in dag.items()} == {s: n["status"] for s, n in nodes.items()}
    assert len(lite[f"{row['id']} history"]["events"]) == len(rows["events"])
    assert [s["session_id"] for s in lite["sessions"]["sessions"]] == [row["session_id"]]
    return rows, nodes, row, lite


def _comparable(answer: Any) -> Any:
    """An answer without what differs between two databases holding the same spans (row ids, the set order
    of ``agents_involved``, the session's last activity, which the backend's readers update themselves, and
    the UTC offset of the session state's times: cmbagent declares them with a time zone, which PostgreSQL
    keeps and SQLite does not), floats to 6 decimals: cmbagent's execution summary sums each agent's event
    times (``duration_ms / 1000``, ``agent_time_breakdown``) in the order the database returns the events,
    which the two need not share, and a float sum's last bits depend on its order (whole milliseconds: 6
    decimals are far from a rounding boundary)."""
    if isinstance(answer, float):
        return round(answer, 6)
    if isinstance(answer, dict):
        return {k: sorted(v) if k == "agents_involved" else _comparable(v) for k, v in answer.items()
                if k not in ("id", "db_id", "event_id", "file_id", "parent_event_id", "root_event_id", "updated_at",
                             "last_active_at")}
    if isinstance(answer, list):
        return [_comparable(v) for v in answer]
    return answer.removesuffix("+00:00") if isinstance(answer, str) else answer


def test_backend_readers_on_sqlite_and_postgresql(instrumented: Callable[..., Run], tmp_path: Path) -> None:
    """Two planning_and_control runs (the first program fails) one after the other in one work dir, read by
    every reader of cmbagent's backend: the run history filtered by each event type partitions it, each node's
    events are the same with its internal ones asked for, ``/events/{id}/tree`` from the root events covers
    every event once, the node events found by DB id without a run, and the same answers from PostgreSQL as
    from SQLite (same spans exported into both). Passes on 5bc025a too: no change was needed."""
    mars = _mars_source(tmp_path)
    python = _mars_python()
    base = os.environ.get(PG_ENV)
    if mars is None or python is None or not base:
        pytest.skip(f"set CMBAGENT_OTEL_MARS_SRC, CMBAGENT_OTEL_MARS_PYTHON and {PG_ENV}")
    if subprocess.run([python, "-c", "import psycopg"], capture_output=True).returncode != 0:
        pytest.skip("CMBAGENT_OTEL_MARS_PYTHON has no psycopg (PostgreSQL driver)")

    def twice(work: Path) -> None:
        for _ in range(2):
            call_workflow("planning_and_control", work)

    run = instrumented("planning_and_control", twice)
    sqlite = _exported(run, tmp_path)
    rows = _final_rows(sqlite)
    assert len(rows["runs"]) == 2 and {r["meta"]["work_dir"] for r in rows["runs"]} == {str(run.work_dir)}
    lite, pgsql, _ = backend_answers(mars, python, run.spans, sqlite, base, tmp_path)
    events = rows["events"]
    for run_id in lite["runs"]:
        mine = [e for e in events if e["run_id"] == run_id]
        history = lite[f"{run_id} history"]["events"]
        assert len(history) == len(mine)
        kinds = {e["event_type"] for e in mine}
        assert sorted(e["id"] for k in kinds for e in lite[f"{run_id} history {k}"]["events"]) == sorted(
            e["id"] for e in history)
        shorts = [k.split(" ", 3)[3] for k in lite if k.startswith(f"{run_id} internal events ")]
        for short in shorts:
            assert lite[f"{run_id} internal events {short}"] == lite[f"{run_id} events {short}"]
    trees = [e["id"] for k, v in lite.items() if k.startswith("tree ") for e in v["tree"]]
    assert sorted(trees) == sorted(e["id"] for e in events)
    shared = [k for k in lite if k.startswith("events ")]  # node events by DB id, no run given
    assert shared and all(lite[k]["total_events"] == len([e for e in events if e["node_id"] == k[7:]])
                          for k in shared)
    runs_pg = dict(zip(pgsql["runs"], lite["runs"], strict=True))  # the same spans: the same run ids
    assert runs_pg == {r: r for r in lite["runs"]}
    assert {k: _comparable(v) for k, v in pgsql.items() if not k.startswith(("tree ", "events "))} == {
        k: _comparable(v) for k, v in lite.items() if not k.startswith(("tree ", "events "))}
    json.dumps(lite)
