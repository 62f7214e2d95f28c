"""The offline model's usage does not depend on how many calls the process made before.

The scripted client and the loopback server count a response's tokens from the message they send,
tool call ids included. Ids numbered call_9 then call_10 made the same scripted answer one token
longer once the process had made ten calls, so two identical chats in one process could differ:
``test_perf31_generated_starts`` failed on the cmbagent fork when another file's calls ran first.
Each test fails alone on the old ids (the process's count starts at 1); run together, only the first
is sure to cross a digit count at a token boundary.
"""
from __future__ import annotations

import json
import urllib.request

from cmbagent_otel.testing import FakeOpenAIServer, ScriptedModelClient

TOOL_CALL = {"tool_calls": [{"name": "peak_position", "arguments": {"multipole": 2}}]}
CALLS = 1_100  # over HTTP: crosses a change of the ids' digit count (10, 100 or 1000) from a start below 1,000
IN_PROCESS_CALLS = 11_000  # in process (cheap): from any start below 10,000, after the server's calls too


def test_the_loopback_servers_usage_is_the_same_for_every_call() -> None:
    with FakeOpenAIServer(script=[TOOL_CALL] * CALLS) as server:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "where?"}]}).encode()
        counts = set()
        for _ in range(CALLS):
            request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                counts.add(json.loads(answer.read())["usage"]["completion_tokens"])
    assert len(counts) == 1, counts


def test_the_scripted_clients_usage_is_the_same_for_every_call() -> None:
    client = ScriptedModelClient({"model": "scripted"}, script=[TOOL_CALL] * IN_PROCESS_CALLS)
    counts = {client.create({"messages": [{"role": "user", "content": "where?"}]}).usage.completion_tokens
              for _ in range(IN_PROCESS_CALLS)}
    assert len(counts) == 1, counts
