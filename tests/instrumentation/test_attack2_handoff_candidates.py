"""Nineteenth campaign (attacks: leftovers): ``cmbagent.handoff.candidates`` is bounded.

Every speaker selection's event (or ``select_speaker`` span) listed every agent of its group chat:
a group chat of hundreds of agents, or of agents with long names, copied a list of all their names
(each up to 256 characters) into each selection's event and each DAG ``handoff`` row. The list now
holds at most ``MAX_CANDIDATES`` names and the attribute bound's characters (``max_length()``) in
all, then ``"... (N more)"`` for the ``N`` left out. Real AG2 group chats, no model (round robin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent, GroupChat, GroupChatManager
from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, text

from cmbagent_otel import semconv
from cmbagent_otel.instrumentation import _handoffs
from cmbagent_otel.redaction import max_length

MAX_CANDIDATES = getattr(_handoffs, "MAX_CANDIDATES", 128)  # (getattr: the test also runs on the old code)


@pytest.fixture(autouse=True)
def _in_a_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cmbagent's fork (cmbagent_autogen) writes each group chat message to chats/ under the current directory
    (tmp_path / "chats").mkdir()
    monkeypatch.chdir(tmp_path)


def _round_robin(names: list[str], rounds: int = 4) -> Any:
    agents = [ConversableAgent(n, llm_config=False, human_input_mode="NEVER", default_auto_reply="ok")
              for n in names]
    chat = GroupChat(agents, messages=[], max_round=rounds, speaker_selection_method="round_robin")
    manager = GroupChatManager(chat, llm_config=False)
    return agents[0].initiate_chat(manager, message="begin", max_turns=1, silent=True)


def _handoff_rows(instrumented: Any, tmp_path: Path) -> list[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'dag.db'}"
    exporter = DagSpanExporter(url)
    exporter.export(instrumented.spans)
    exporter.shutdown()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT inputs, outputs FROM execution_events "
                                     "WHERE event_type = 'handoff' ORDER BY execution_order")).all()
    finally:
        engine.dispose()
    return [{"inputs": json.loads(i) if isinstance(i, str) else i,
             "outputs": json.loads(o) if isinstance(o, str) else o} for i, o in rows]


def test_a_group_chat_of_many_agents_lists_a_bounded_number(instrumented: Any, tmp_path: Path) -> None:
    names = [f"agent_{i:03d}" for i in range(300)]
    _round_robin(names)
    handoffs = instrumented.handoffs()
    assert [h[semconv.HANDOFF_TO] for h in handoffs] == names[1:4]  # the selections themselves unchanged
    for handoff in handoffs:
        candidates = list(handoff[semconv.HANDOFF_CANDIDATES])
        assert candidates == [*names[:MAX_CANDIDATES], f"... ({300 - MAX_CANDIDATES} more)"]
    rows = _handoff_rows(instrumented, tmp_path)
    assert [r["outputs"]["to"] for r in rows] == names[1:4]  # the DAG handoff events are still written
    assert all(r["inputs"]["candidates"][-1] == f"... ({300 - MAX_CANDIDATES} more)" for r in rows)


def test_agents_with_long_names_fill_the_attribute_bound_at_most(instrumented: Any, tmp_path: Path) -> None:
    names = [f"{i:02d}" + "n" * 100_000 for i in range(40)]  # each cut to 256 characters by bounded_name
    _round_robin(names, rounds=3)
    handoffs = instrumented.handoffs()
    assert len(handoffs) == 2
    for handoff in handoffs:
        *listed, marker = handoff[semconv.HANDOFF_CANDIDATES]
        assert listed and sum(len(n) for n in listed) <= max_length()
        assert [n[:2] for n in listed] == [f"{i:02d}" for i in range(len(listed))]
        assert marker == f"... ({40 - len(listed)} more)"
    rows = _handoff_rows(instrumented, tmp_path)
    assert len(rows) == 2 and all(len(json.dumps(r["inputs"])) < 2 * max_length() for r in rows)


def test_a_group_chat_within_the_bounds_lists_every_agent(instrumented: Any) -> None:
    names = [f"agent_{i:03d}" for i in range(MAX_CANDIDATES)]
    _round_robin(names, rounds=3)
    assert all(list(h[semconv.HANDOFF_CANDIDATES]) == names for h in instrumented.handoffs())
