"""Thirty-first campaign (attacks): what ``cmbagent-otel replay`` prints of a spill file.

Each line of replay's output names the database a file records (its header: text from the file, not
from the user, who may replay files copied from another machine) and quotes a driver's message for a
batch it cannot write. They were printed as they were: a recorded database holding ESC sequences
cleared the screen or printed an OSC 8 hyperlink, and one holding a newline printed a forged line of
its own (``replayed 999 spans into ...``). The CLI now prints each line with control and invisible
characters escaped and on one line, as it prints its errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.cli import main
from cmbagent_otel.spill import SpillStore

HOSTILE = "r\x1b[2J\x1b]8;;x\x07click\x1b]8;;\x07\u202e\nreplayed 999 spans into sqlite:///forged.db"


def test_a_recorded_database_is_printed_inert(capture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with workflow("copied", mode="one-shot"), phase("control"), step(1, "goal"):
        pass
    folder = tmp_path / "spill"
    SpillStore(folder, f"sqlite:///{tmp_path}/{HOSTILE}.db").append(capture.spans)
    assert main(["replay", "--spill-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
    assert not any(text.startswith("replayed 999") for text in out.splitlines()), out
    assert "\\x1b[2J" in out and "replayed 3 spans from" in out
