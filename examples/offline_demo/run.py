"""Offline planning/control run with real AG2 agents and a scripted model (no API key).

Spans go to the exporters named in OTEL_TRACES_EXPORTER (default here: the cmbagent DAG
tables in ./offline_demo.db); see README.md.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from autogen import ConversableAgent

import cmbagent_otel
from cmbagent_otel.dag.database import redacted
from cmbagent_otel.testing import ScriptedModelClient, scripted_llm_config

HERE = Path(__file__).resolve().parent


def scripted_agent(name: str, script: list[str]) -> ConversableAgent:
    """An AG2 agent whose model is ScriptedModelClient (registered like any custom ModelClient)."""
    agent = ConversableAgent(name, llm_config=scripted_llm_config(), human_input_mode="NEVER")
    agent.register_model_client(ScriptedModelClient, script=script)
    return agent


def main() -> None:
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "cmbagent_dag")
    os.environ.setdefault("OTEL_SERVICE_NAME", "cmbagent-offline-demo")
    url_given = bool(os.environ.get("CMBAGENT_OTEL_DATABASE_URL", "").strip())
    if not url_given:
        os.environ["CMBAGENT_OTEL_DATABASE_URL"] = f"sqlite:///{HERE / 'offline_demo.db'}"
    cmbagent_otel.instrument()

    planner = scripted_agent("planner", ["1. Load the spectrum\n2. Fit the first peak"])
    engineer = scripted_agent("engineer", ["Loaded 2500 multipoles.", "Fit failed: bad prior.",
                                           "Peak at l=220."])
    user = ConversableAgent("admin", llm_config=False, human_input_mode="NEVER")

    with cmbagent_otel.workflow("offline-demo", mode="planning-control", task="Measure the first CMB peak",
                                agent="engineer", model="scripted", max_redos=2):
        with cmbagent_otel.phase("planning"):
            user.initiate_chat(planner, message="Plan the analysis", max_turns=1, silent=True)
        with cmbagent_otel.phase("control"):
            with cmbagent_otel.step(1, "Load the spectrum", agent="engineer"):
                user.initiate_chat(engineer, message="Load the spectrum", max_turns=1, silent=True)
            with cmbagent_otel.step(2, "Fit the first peak", agent="engineer") as fit:
                user.initiate_chat(engineer, message="Fit the peak", max_turns=1, silent=True)
                with cmbagent_otel.redo(2, 1, "use a wider prior"):
                    user.initiate_chat(engineer, message="Retry with a wider prior", max_turns=1, silent=True)
                fit.set_summary("Peak at l=220")

    cmbagent_otel.uninstrument()  # flushes every exporter
    print(f"spans exported to: {os.environ['OTEL_TRACES_EXPORTER']}")
    if "cmbagent_dag" in os.environ["OTEL_TRACES_EXPORTER"]:
        url = os.environ["CMBAGENT_OTEL_DATABASE_URL"]
        print(f"DAG stored in {redacted(url)}; inspect it with:")  # never a password on the terminal
        # the shell has the URL only when it was given there; the default one is this script's own
        db = "" if url_given else f" --db {shlex.quote(url)}"
        for command in ("runs", "dag latest", "events latest"):
            print(f"  cmbagent-otel{db} {command}")


if __name__ == "__main__":
    main()
