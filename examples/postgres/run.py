"""The offline demo writing its DAG into PostgreSQL (CMBAGENT_OTEL_DATABASE_URL must be set)."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

if not os.environ.get("CMBAGENT_OTEL_DATABASE_URL", "").startswith("postgresql"):
    sys.exit("set CMBAGENT_OTEL_DATABASE_URL=postgresql+psycopg://user:pass@host:5432/db first")
os.environ.setdefault("OTEL_TRACES_EXPORTER", "cmbagent_dag")
runpy.run_path(str(Path(__file__).resolve().parents[1] / "offline_demo" / "run.py"), run_name="__main__")
