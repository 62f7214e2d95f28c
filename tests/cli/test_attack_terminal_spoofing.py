"""Eighteenth campaign (attacks): names that spoof what the CLI shows.

The CLI escaped control characters, bidirectional overrides and isolates, directional marks and
U+2028/U+2029 (seventh campaign), but printed as they were:

* invisible characters (zero-width space and joiners, word joiner, BOM, soft hyphen, Hangul fillers,
  Unicode tags, which spell ASCII invisibly): an agent ``engi\\u200bneer`` looked like ``engineer``
  and a name could carry text its reader never sees;
* a newline inside one field (an agent, a node, a run's mode, an event's name): it printed as a
  line of its own, so a name forged tree lines and table rows (``engineer\\n└── step_9 (step)
  completed``).

Names come from the application, the model (tool names) or an ingest client; each view (runs,
dag as a tree, DOT and mermaid, events) now shows them escaped. JSON escapes them already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.cli import main

INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u3164\U000e0041\U000e0042"
FORGED = "FORGED-LINE"


@pytest.fixture
def spoofing_db(tmp_path: Path, provider: Any) -> str:
    url = f"sqlite:///{tmp_path}/spoof.db"
    forged = f"\n└── {FORGED} (step) completed agent=engineer 1ms"
    with workflow("wf" + INVISIBLE, mode="one-shot" + INVISIBLE + forged), phase("phase" + INVISIBLE + forged), \
            step(1, "goal" + INVISIBLE, agent="engi" + INVISIBLE + "neer" + forged), \
            TracedSpan("chat m" + INVISIBLE + forged, "llm", {"gen_ai.agent.name": "engi" + INVISIBLE + forged}):
        pass
    provider.store(url)
    return url


VIEWS = [["runs"], ["dag", "latest"], ["dag", "latest", "--format", "dot"],
         ["dag", "latest", "--format", "mermaid"], ["events", "latest"]]


@pytest.mark.parametrize("command", VIEWS, ids=lambda c: " ".join(c))
def test_invisible_characters_are_escaped(spoofing_db: str, command: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", spoofing_db, *command]) == 0
    out, err = capsys.readouterr()
    shown = [hex(ord(c)) for c in INVISIBLE if c in out + err]
    assert not shown, shown


@pytest.mark.parametrize("command", VIEWS, ids=lambda c: " ".join(c))
def test_a_name_never_starts_a_line(spoofing_db: str, command: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", spoofing_db, *command]) == 0
    out, err = capsys.readouterr()
    forged = [line for line in (out + err).splitlines() if FORGED in line and "└──" in line.split(FORGED)[0]
              and "\\x0a" not in line.split(FORGED)[0]]
    assert not forged, forged


def test_json_keeps_the_names_whole(spoofing_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", spoofing_db, "dag", "latest", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert not [c for c in INVISIBLE + "\u2028" if c in out]
    agents = {n["agent"] for n in json.loads(out)["nodes"]}
    assert any(a and a.startswith("engi" + INVISIBLE + "neer\n") for a in agents), agents
