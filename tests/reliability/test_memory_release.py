"""Objects of a finished chat are not kept alive by telemetry.

A long-lived process (a web service running one chat per request) builds agents, a group
chat and its manager per request and drops them when the chat ends. Nothing of ours may hold
them (or their message histories) after that: per-agent and per-group-chat facts are kept by
id under a weak reference. Checked with weak references to every agent of a real AG2 group
chat, after ``gc.collect()``, uninstrumented (AG2 alone frees them) and instrumented.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, step, workflow

from .conftest import Capture, group_chat, instrumented_with, needs_custom_client

pytestmark = needs_custom_client


def chats_leave_alive(tmp_path: Path, chats: int, in_workflow: bool) -> int:
    """Run ``chats`` group chats (each with fresh agents), drop them, and count the agents left."""
    refs: list[weakref.ref[Any]] = []
    for index in range(chats):
        scope = contextlib.ExitStack()
        if in_workflow:
            scope.enter_context(workflow(f"request {index}", mode="planning-control"))
            scope.enter_context(phase("control"))
            scope.enter_context(step(1, "fit"))
        with scope:
            result = group_chat(tmp_path / str(index),
                                before_run=lambda agents: refs.extend(weakref.ref(a) for a in agents))
        assert "TERMINATE" in str(result.chat_history)
        del result
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_uninstrumented_chats_free_their_agents(tmp_path: Path) -> None:
    assert chats_leave_alive(tmp_path, 2, in_workflow=False) == 0


@pytest.mark.parametrize(("capture_content", "in_workflow"), [(False, False), (True, False), (False, True)])
def test_instrumented_chats_free_their_agents(tmp_path: Path, capture_content: bool, in_workflow: bool) -> None:
    """Before: the group chat's selection facts held the group chat strongly (up to 64 of them),
    and with it every agent and message history of every finished chat."""
    cap = Capture()
    with instrumented_with(cap, capture_content=capture_content):
        assert chats_leave_alive(tmp_path, 3, in_workflow) == 0
        assert cap.spans
