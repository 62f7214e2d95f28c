"""An unmodified cmbagent app, run under ``opentelemetry-instrument`` by the tests (no instrument() call).

``argv[1]``: the workflow to run (``scripted_cmbagent.call_workflow`` kinds; planning_and_control by default)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scripted_cmbagent import call_workflow, script_for

from cmbagent_otel.testing import FakeOpenAIServer

kind = sys.argv[1] if len(sys.argv) > 1 else "planning_and_control"
with FakeOpenAIServer(request_responder=script_for(kind)) as server, tempfile.TemporaryDirectory() as work_dir:
    os.environ["OPENAI_BASE_URL"] = server.base_url
    results = call_workflow(kind, Path(work_dir))
    # one write: the console exporter's thread writes spans to the same stdout, between print's writes
    sys.stdout.write(f"STEPS DONE {results['final_context']['current_plan_step_number']}\n")
    sys.stdout.flush()
