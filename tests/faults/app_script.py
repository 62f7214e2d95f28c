"""Run a test's application script in a child process, as the lifecycle and concurrency campaigns do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def run_script(tmp_path: Path, prelude: str, body: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``prelude`` then ``body`` (dedented) as ``app.py`` in ``tmp_path``, run in a child process with the
    path of its SQLite file (``dag.sqlite``, not made here) as ``sys.argv[1]``, no database URL inherited
    and no flush on signals; asserts that it exited 0. Returns the finished process and the file's path."""
    db = tmp_path / "dag.sqlite"
    script = tmp_path / "app.py"
    script.write_text(prelude + textwrap.dedent(body))
    env = {**os.environ, "CMBAGENT_OTEL_FLUSH_ON_SIGNAL": "false"}
    env.pop("CMBAGENT_OTEL_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc, db
