"""What a user of the real cmbagent package sees, eighth audit (session 35).

A work dir spelled the way users spell it: ``~/runs/x``, a path relative to the working directory, a
folder reached through a symbolic link (``/tmp`` on macOS is one). cmbagent writes into
``Path(work_dir).expanduser().resolve()`` (every entry point and ``CMBAgent``), and its backend records
an absolute task work dir; the run's ``meta.work_dir`` and its ``files`` rows must name the folder cmbagent
wrote, with paths that open from any working directory. Each run is cmbagent's own (offline, scripted
backend), exported by the DAG exporter into SQLite and read back as cmbagent's backend reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from cmbagent_otel.integrations.cmbagent import OUTPUT_DIRS

from .test_cmbagent_runs import _exported, _rows
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
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
