"""The session's shared cmbagent runs (conftest's ``SharedRuns``): a run is shared only when its inputs
are the same, and each test gets a private copy, its work dir as the run left it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import SharedRuns


@dataclass
class _Run:  # the fields of test_cmbagent_runs.Run (that module needs cmbagent to import)
    results: dict[str, Any]
    sequence: list[str]
    unexpected: list[str]
    work_dir: Path
    spans: list[Any]
    error: Exception | None = None
    warnings: list[str] = field(default_factory=list)


def _ran(shared: SharedRuns) -> _Run:
    work = shared.work_dir("otel")
    (work / "0-one_shot" / "codebase").mkdir(parents=True)
    (work / "0-one_shot" / "codebase" / "program.py").write_text("print(1)\n")
    agent = threading.Lock()  # an app object deepcopy refuses (one_shot returns its agents)
    return _Run({"final_context": {"n_attempts": 1}, "engineer": agent}, ["engineer"], [], work, ["span"])


def test_each_test_gets_the_run_as_it_was_left(tmp_path: Path) -> None:
    shared = SharedRuns(tmp_path)
    key = shared.key(("one_shot",), {"fail": False})
    assert key is not None and shared.get(key) is None
    first = _ran(shared)
    shared.put(key, first)
    # what the first test does to its run: results, lists and the work dir
    first.results["final_context"]["n_attempts"] = 9
    first.sequence.append("x")
    program = first.work_dir / "0-one_shot" / "codebase" / "program.py"
    program.unlink()
    (first.work_dir / "0-one_shot" / "left.txt").write_text("mine")

    second = shared.get(key)
    assert second is not None and second.work_dir == first.work_dir
    assert second.results["final_context"] == {"n_attempts": 1} and second.sequence == ["engineer"]
    assert second.results["engineer"] is first.results["engineer"]  # not copyable: shared, read by no test
    assert program.read_text() == "print(1)\n" and not (first.work_dir / "0-one_shot" / "left.txt").exists()
    second.results["final_context"]["n_attempts"] = 5
    second.spans.clear()
    third = shared.get(key)
    assert third is not None and third.results["final_context"] == {"n_attempts": 1} and third.spans == ["span"]


def test_only_identical_inputs_share_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = SharedRuns(tmp_path)
    key = shared.key(("one_shot",), {"fail": False})
    assert shared.key(("one_shot",), {"fail": False, "function": print}) is None  # a callable: never shared
    assert shared.key(("one_shot",), {"fail": True}) != key
    assert shared.key(("one_shot", "one_shot"), {"fail": False}) != key
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1")  # each run sets its own server's
    assert shared.key(("one_shot",), {"fail": False}) == key
    monkeypatch.setenv("CMBAGENT_SOMETHING", "1")
    assert shared.key(("one_shot",), {"fail": False}) != key
    monkeypatch.delenv("CMBAGENT_SOMETHING")
    monkeypatch.chdir(tmp_path)
    assert shared.key(("one_shot",), {"fail": False}) != key
