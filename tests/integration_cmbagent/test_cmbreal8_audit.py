"""What a user of the real cmbagent package sees, eighth audit (session 35).

A work dir spelled the way users spell it: ``~/runs/x``, a path relative to the working directory, a
folder reached through a symbolic link (``/tmp`` on macOS is one). cmbagent writes into
``Path(work_dir).expanduser().resolve()`` (every entry point and ``CMBAgent``), and its backend records
an absolute task work dir; the run's ``meta.work_dir`` and its ``files`` rows must name the folder cmbagent
wrote, with paths that open from any working directory. And an entry call made inside the application's own
``with workflow(...)`` (one run for a request or a notebook cell): the run must still name the call's task,
agent, model and work dir, and list its files. Each run is cmbagent's own (offline, scripted backend),
exported by the DAG exporter into SQLite and read back as cmbagent's backend reads it.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel.integrations.cmbagent import OUTPUT_DIRS

from .scripted_cmbagent import TASK
from .test_cmbagent_runs import _exported, _rows
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
    _nodes_of,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen


def _spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> tuple[str, Path]:
    """(the work dir as the user passes it, the folder cmbagent resolves it to)."""
    real = tmp_path / "real" / "runs"
    if how == "home":  # ~ of a HOME pointed at tmp_path/real
        monkeypatch.setenv("HOME", str(tmp_path / "real"))
        return "~/runs", real.resolve()
    if how == "relative":  # relative to the working directory the run starts in
        monkeypatch.chdir(tmp_path / "real")
        return "runs", real.resolve()
    real.mkdir(parents=True)  # a link to the folder
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    return str(tmp_path / "link"), real.resolve()


def _through(kind: str, spelled: str, early: bool) -> Callable[..., Any]:
    """The entry point ``kind`` called with ``work_dir=spelled``: looked up at the call (the instrumented
    function) or, ``early``, bound now, before ``instrument()`` (``from cmbagent import ...`` at the top of
    the app: its run is found on the stack)."""
    import cmbagent

    bound = getattr(cmbagent, kind)
    return lambda *args, **kw: (bound if early else getattr(cmbagent, kind))(*args, **(kw | {"work_dir": spelled}))


def _written(folder: Path) -> set[Path]:
    """The files cmbagent wrote into its output folders of ``folder`` (what its backend's scan registers)."""
    return {p for d in OUTPUT_DIRS for p in (folder / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}


@pytest.mark.parametrize(("kind", "how", "early"), [
    ("one_shot", "home", False), ("one_shot", "relative", False), ("one_shot", "link", False),
    ("planning_and_control", "home", False), ("planning_and_control", "relative", True)])
def test_work_dir_as_cmbagent_resolves_it(request: pytest.FixtureRequest, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, kind: str, how: str, early: bool) -> None:
    """The run's ``meta.work_dir`` is the folder cmbagent wrote (one_shot: its final context's ``work_dir``),
    and its ``files`` rows are exactly the files cmbagent wrote there, each an absolute path of that folder
    that opens from anywhere. On 0c80923 ``~/runs`` gave no ``files`` row at all (the listing looked for a
    folder literally named ``~``), a relative work dir and a link were stored as spelled; the same through
    an entry point bound before ``instrument()``."""
    (tmp_path / "real").mkdir()
    spelled, real = _spelled(tmp_path, monkeypatch, how)
    run = request.getfixturevalue("run_cmbagent")(kind, function=_through(kind, spelled, early))
    assert run.error is None
    _one_root_per_trace(run)
    monkeypatch.chdir(tmp_path)  # the reader runs elsewhere
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert row["meta"]["work_dir"] == str(real)
    if kind == "one_shot":
        assert row["meta"]["work_dir"] == run.results["final_context"]["work_dir"]  # cmbagent's own record
    files = _rows(url, "files")
    written = _written(real)
    assert len(written) >= 4  # code, chats, cost and time reports
    assert {Path(f["file_path"]) for f in files} == written
    assert all(os.path.isabs(f["file_path"]) and os.path.isfile(f["file_path"]) for f in files)


def _in_apps_workflow(calls: int, **own: Any) -> Callable[..., Any]:
    """one_shot called ``calls`` times inside the application's ``with workflow("my app", **own)``."""
    import cmbagent

    def app(*args: Any, **kw: Any) -> Any:
        with cmbagent_otel.workflow("my app", mode="one-shot", **own):
            return [cmbagent.one_shot(*args, **kw) for _ in range(calls)][-1]

    return app


@pytest.mark.parametrize("case", ["bare", "two_calls", "own_facts"])
def test_entry_call_inside_the_applications_workflow(request: pytest.FixtureRequest, tmp_path: Path, case: str) -> None:
    """one_shot inside ``with workflow("my app")`` joins that run (one trace, one root). The run row names what
    the application's block left unset from the call, as the call's own run does (task, agent, model,
    ``meta.work_dir``) and lists the files cmbagent wrote there (two calls into one work dir: both calls'
    files, one run, ``execute`` and ``execute_2``); what the application set stays. On 0c80923 the bare
    block's run had no task, agent ``unknown``, no work dir and no ``files`` row."""
    import cmbagent

    model = inspect.signature(cmbagent.one_shot).parameters["engineer_model"].default  # what its own run names
    other = tmp_path / "the app's folder"
    other.mkdir()
    own = {"task": "answer the user", "work_dir": str(other)} if case == "own_facts" else {}
    run = request.getfixturevalue("run_cmbagent")("one_shot", function=_in_apps_workflow(
        2 if case == "two_calls" else 1, **own))
    assert run.error is None
    _one_root_per_trace(run)
    assert [s.name for s in run.spans if s.parent is None] == ["workflow my app"]
    url = _exported(run, tmp_path)
    rows = _final_rows(url)
    (row,) = rows["runs"]
    assert (row["agent"], row["model"]) == ("engineer", model)
    files = {Path(f["file_path"]) for f in _rows(url, "files")}
    if case == "own_facts":
        assert (row["task_description"], row["meta"]["work_dir"]) == ("answer the user", str(other))
        assert files == set()  # the call wrote elsewhere than the run's work dir
        return
    (written_dir,) = [p for p in run.work_dir.iterdir() if p.is_dir()]
    assert (row["task_description"], row["meta"]["work_dir"]) == (TASK, str(written_dir.resolve()))
    assert files == _written(written_dir.resolve()) and len(files) >= 4
    executes = sorted(s for s in _nodes_of(rows) if re.fullmatch(r"execute(_[0-9]+)?", s))
    assert executes == (["execute", "execute_2"] if case == "two_calls" else ["execute"])
