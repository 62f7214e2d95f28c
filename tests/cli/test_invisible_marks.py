"""Directional marks and line separators in rows are shown escaped by every CLI view.

Found by the seventh campaign: the CLI escaped control characters and bidirectional overrides and
isolates, but not the implicit directional marks (U+061C ALM, U+200E LRM, U+200F RLM), which still
reorder the neutral characters next to them, nor U+2028/U+2029, which some terminals and log
viewers break lines at; the ingest already escaped all of them in its log lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main

MARKS = "\u061c\u200e\u200f\u2028\u2029"


@pytest.fixture
def marked_db(tmp_path: Path, provider: Any) -> str:
    url = f"sqlite:///{tmp_path}/marks.db"
    with workflow("wf" + MARKS, mode="mode" + MARKS), phase("phase" + MARKS), \
            step(1, "goal" + MARKS, agent="agent" + MARKS):
        pass
    provider.store(url)
    return url


@pytest.mark.parametrize("command", [["runs"], ["dag", "latest"], ["dag", "latest", "--format", "dot"],
                                     ["dag", "latest", "--format", "mermaid"], ["events", "latest"]])
def test_marks_are_escaped(marked_db: str, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", marked_db, *command]) == 0
    out, err = capsys.readouterr()
    assert not [m for m in MARKS if m in out + err], [hex(ord(m)) for m in MARKS if m in out + err]
