"""examples/collector_fanout/run_without_docker.sh works as its README says (on free ports)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from .support import ROOT, clean_env, db_rows, free_ports, jaeger_binary

SCRIPT = ROOT / "examples" / "collector_fanout" / "run_without_docker.sh"


def test_collector_fanout_example_without_docker(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'fanout.db'}"
    with free_ports(7) as (grpc, http, query, query_grpc, health, ingest, ingest_grpc):
        env = clean_env(
            PYTHON=sys.executable, JAEGER_BIN=str(jaeger_binary()), CMBAGENT_OTEL_DATABASE_URL=db_url,
            CMBAGENT_OTEL_INGEST_PORT=str(ingest), CMBAGENT_OTEL_INGEST_GRPC_PORT=str(ingest_grpc),
            TMPDIR=str(tmp_path),
            JAEGER_OTLP_GRPC_ENDPOINT=f"127.0.0.1:{grpc}", JAEGER_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{http}",
            JAEGER_QUERY_HTTP_ENDPOINT=f"127.0.0.1:{query}", JAEGER_QUERY_GRPC_ENDPOINT=f"127.0.0.1:{query_grpc}",
            JAEGER_HEALTH_ENDPOINT=f"127.0.0.1:{health}",
        )
        proc = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ui = next(line for line in proc.stdout.splitlines() if line.startswith("Jaeger UI: "))
    assert ui.startswith(f"Jaeger UI: http://127.0.0.1:{query}/trace/")
    trace_id = ui.rsplit("/", 1)[1]
    assert "Jaeger has the run's trace" in output
    run_id = str(uuid.UUID(hex=trace_id))
    rows = db_rows(db_url, run_id)
    assert rows["run"] is not None and rows["run"][:2] == ("completed", "planning-control")
    assert f"run {run_id} planning-control completed" in proc.stdout   # the DAG it printed
    assert {"planning", "redo", "terminator"} <= {node_type for _, node_type, _ in rows["nodes"]}
