"""The real cmbagent package run offline into a SQLite DAG database, then its DAG printed.

cmbagent (PyPI, Python >= 3.12, installed in the environment that runs this script, with cmbagent-otel)
runs one of its workflows (default ``planning_and_control``) against the scripted OpenAI-compatible backend
of the test suite (``tests/integration_cmbagent/scripted_cmbagent.py``, served on loopback by
``cmbagent_otel.testing.FakeOpenAIServer``): cmbagent's own agents, tool calls and handoffs, the engineer's
code really run by cmbagent's executor, no API key, nothing leaving the machine. Run it from a clone of
cmbagent-otel (it imports the scripted backend from ``tests/``); see README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cmbagent_otel
from cmbagent_otel.cli import main as cli
from cmbagent_otel.testing import FakeOpenAIServer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the scripted backend lives in the repository's tests/

from tests.integration_cmbagent.scripted_cmbagent import (  # noqa: E402 - after the path above
    API_KEYS,
    call_workflow,
    script_for,
)

#: the workflows the scripted backend answers without another server (one_shot_plots needs a Gemini one)
WORKFLOWS = ("planning_and_control", "carryover", "deep_research", "control", "one_shot", "one_shot_researcher",
             "get_keywords")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(HERE / "cmbagent_offline.db"),
                        help="the SQLite file the DAG rows go to (default: %(default)s)")
    parser.add_argument("--workflow", default="planning_and_control", choices=WORKFLOWS,
                        help="the cmbagent entry point to run (default: %(default)s)")
    parser.add_argument("--fail-first-code", action="store_true",
                        help="the engineer's first program raises: cmbagent's retry path")
    parser.add_argument("--work-dir", help="cmbagent's work dir (default: a new temporary folder)")
    args = parser.parse_args(argv)

    url = f"sqlite:///{Path(args.db).resolve()}"
    os.environ["CMBAGENT_OTEL_DATABASE_URL"] = url
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "cmbagent_dag")  # add otlp to see it in Jaeger too
    os.environ.setdefault("OTEL_SERVICE_NAME", "cmbagent-offline")
    os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")  # cmbagent's notebook display
    os.environ["OPENAI_API_KEY"] = API_KEYS["OPENAI"]  # a placeholder: every call goes to the loopback server
    cmbagent_otel.instrument()  # before cmbagent is imported (call_workflow imports it)

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="cmbagent-offline-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    script = script_for(args.workflow, fail_first_code=args.fail_first_code)
    try:
        with FakeOpenAIServer(request_responder=script) as server:
            os.environ["OPENAI_BASE_URL"] = server.base_url  # cmbagent's OpenAI clients read it
            call_workflow(args.workflow, work_dir)
    finally:
        cmbagent_otel.uninstrument()  # flushes every exporter
    print(f"cmbagent {args.workflow}: {len(script.sequence)} model calls answered offline, work dir {work_dir}")
    print(f"DAG rows in {url}; the run's DAG (cmbagent-otel --db {url} dag latest):", flush=True)
    return cli(["--db", url, "dag", "latest"])


if __name__ == "__main__":
    sys.exit(main())
