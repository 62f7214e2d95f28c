"""``multiprocessing`` children of an instrumented app keep their spans (fourteenth fault campaign).

A ``multiprocessing`` child ends by ``os._exit`` once its target returns (start methods ``fork``
and ``forkserver``; a pool's workers too, or they are stopped by SIGTERM from ``terminate()``):
neither ``atexit`` nor the providers' shutdown runs there, so every span the child recorded
(its whole run: a workflow run in a worker process) was lost, with nothing saying so. And a
pool worker stopped by ``terminate()`` while its main thread exported a batch lost that batch:
the SIGTERM handler's own flush found it gone from the queue. The child's exit hook now flushes
the providers, and our signal handler waits for an export the main thread is doing.
The app is a real script run as ``__main__`` (spawn and forkserver children import it again);
each child runs a workflow exported to one real SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

APP = textwrap.dedent('''
    import multiprocessing, sys
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel._spans import TracedSpan
    cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)

    def work(number):
        with workflow(f"child {number}", mode="one-shot"), phase("control"), step(1, "fit"):
            for call in range(3):
                with TracedSpan(f"chat m{call}", "llm", {"gen_ai.request.model": "m"}):
                    pass
        return number

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[1])
        if sys.argv[2] == "process":
            child = context.Process(target=work, args=(1,))
            child.start()
            child.join()
            print("CHILD EXIT", child.exitcode, flush=True)
        else:
            with context.Pool(2) as pool:
                print("RESULTS", pool.map(work, [1, 2, 3]), flush=True)
        work(0)
        cmbagent_otel.uninstrument()
''')


@pytest.mark.parametrize("kind", ["process", "pool"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_child_run_is_stored(tmp_path: Path, method: str, kind: str) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    db = tmp_path / "cmbagent.db"
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{db}",
           "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"), "OTEL_TRACES_EXPORTER": "cmbagent_dag",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    env.pop("OTEL_SDK_DISABLED", None)
    proc = subprocess.run([sys.executable, str(script), method, kind], env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("CHILD EXIT 0" if kind == "process" else "RESULTS [1, 2, 3]") in proc.stdout, proc.stdout
    with sqlite3.connect(db) as conn:
        runs = sorted(conn.execute("SELECT json_extract(meta, '$.name'), status FROM workflow_runs").fetchall())
        events = conn.execute("SELECT count(*) FROM execution_events").fetchone()[0]
    children = [1] if kind == "process" else [1, 2, 3]
    assert runs == [(f"child {n}", "completed") for n in [0, *children]], runs  # was only the parent's
    assert events == 3 * (1 + len(children))
