"""A tiny AG2 app used by the provider tests (run in a subprocess)."""

from __future__ import annotations

import os
import sys

from autogen import ConversableAgent

from cmbagent_otel.testing import offline_agent

if os.environ.get("APP_CALLS_INSTRUMENT") == "1":
    import cmbagent_otel

    provider = cmbagent_otel.instrument()
    # one write per line: the console exporter's thread writes spans to the same stdout
    print(f"PROVIDER {type(provider).__name__ if provider is not None else None}", flush=True)

alice = offline_agent("alice", ["pong"])
bob = ConversableAgent("bob", llm_config=False, human_input_mode="NEVER")
result = bob.initiate_chat(alice, message="ping", max_turns=1, silent=True)
print(f"RESULT {result.chat_history[-1]['content']}", flush=True)
if os.environ.get("APP_CALLS_INSTRUMENT") == "1":
    cmbagent_otel.uninstrument()
sys.exit(0)
