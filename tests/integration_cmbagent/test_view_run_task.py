"""The run's task of the entry points whose first parameter is not named ``task`` (session 31).

cmbagent's backend sets ``workflow_runs.task_description`` from the text the user submitted, in every
mode (its DAG tracker's ``_update_workflow_run_task``; enhance-input runs call ``preprocess_task(text=task)``,
its OCR mode reads the path given as the task); its runs list and ``GET /api/runs/{id}/dag`` (the first
node's ``task``) show it. get_keywords (``input_text``), preprocess_task (``text``), summarize_document
(``markdown_document_path``) and summarize_documents (``folder_path``) runs had none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel.dag.writer import T
from tests.dag import cmbagent_backend as backend

from .scripted_cmbagent import TASK
from .test_cmbagent_runs import Run, _exported
from .test_real_audit import run_cmbagent  # noqa: F401 - the fixture (getfixturevalue)

pytestmark = pytest.mark.cmbagent_autogen


@pytest.mark.parametrize(("kind", "task"), [
    ("get_keywords", lambda work: TASK),
    ("preprocess_task", lambda work: TASK),
    ("summarize_document", lambda work: str(work.parent / f"{work.name}-paper.md")),
    ("summarize_documents", lambda work: str(work.parent / f"{work.name}-papers")),
])
def test_run_task_of_every_entry_point(request: pytest.FixtureRequest, tmp_path: Path, kind: str,
                                       task: Callable[[Path], str]) -> None:
    runner: Callable[..., Run] = request.getfixturevalue("run_cmbagent")
    run = runner(kind, threads=True)   # threads: summarize_documents' workers join its run
    assert run.error is None
    url = _exported(run, tmp_path)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (row,) = conn.execute(select(T["workflow_runs"])).mappings()
            first = backend.run_dag(conn, row["id"])["nodes"][0]
    finally:
        engine.dispose()
    expected = task(run.work_dir / f"0-{kind}")
    assert (row["task_description"], first["task"]) == (expected, expected)
