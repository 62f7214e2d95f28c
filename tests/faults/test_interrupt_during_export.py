"""Ctrl-C while the application's thread exports a batch (fourteenth fault campaign).

``provider.force_flush()`` (and ``uninstrument()``) export in the caller's thread. A
``KeyboardInterrupt`` raised there while the DAG exporter waited for a locked SQLite file went
up to the application, as it must, but the batch had already left the processor's queue: it was
neither stored, nor spilled, nor counted, and no line said so. The application caught its
``KeyboardInterrupt`` and went on; its first run was gone from the database for good. The batch is
now kept in the spill store on its way out (spilled: written later, and written again at most,
which changes no row), and the next export replays it. The interrupt comes while the application's
main thread is inside SQLite's busy wait, seen from ``/proc`` (Python raises it when the wait
returns, at most the 5 s export deadline later): a real lock, a real SIGINT.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmbagent_otel.dag.database import upgrade

from .test_campaign import SQLITE_HOLDER, lock_held

APP = textwrap.dedent('''
    import signal, sys
    # an interactive application's Ctrl-C: a parent started in the background (a non-interactive
    # shell's `&`) passes SIGINT down ignored, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel._spans import TracedSpan
    provider = cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)

    def run(name):
        with workflow(name, mode="one-shot"), phase("control"), step(1, "fit"):
            for call in range(3):
                with TracedSpan(f"chat m{call}", "llm", {"gen_ai.request.model": "m"}):
                    pass

    run("first")
    print("FLUSHING", flush=True)
    try:
        provider.force_flush()
        print("NOT INTERRUPTED", flush=True)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)  # the application's own handling: it goes on
    sys.stdin.readline()  # the database is free again
    run("second")
    cmbagent_otel.uninstrument()
    print("DONE", flush=True)
''')
SLEEPS = {"x86_64": {"35", "230"}, "aarch64": {"101", "115"}}  # nanosleep, clock_nanosleep


def _sleeping(pid: int) -> bool:
    """Whether the process's main thread is in a sleep system call (SQLite's busy wait)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] in SLEEPS[os.uname().machine]
    except (OSError, IndexError):
        return False


def _interrupted_run(tmp_path: Path) -> bool:
    """One application run, Ctrl-C while its force_flush waits for the locked database; asserts that
    no run is lost; returns whether the KeyboardInterrupt reached the application inside force_flush."""
    db = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url, "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / "spill"),
           "CMBAGENT_OTEL_EXPORT_TIMEOUT": "5", "OTEL_TRACES_EXPORTER": "cmbagent_dag",
           # only the application's force_flush exports: no live-DAG records, no scheduled batch
           "CMBAGENT_OTEL_LIVE_DAG": "false", "CMBAGENT_OTEL_BSP_SCHEDULE_DELAY": "600000"}
    env.pop("OTEL_SDK_DISABLED", None)
    env.pop("CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS", None)
    with lock_held(SQLITE_HOLDER, str(db)) as holder:
        app = subprocess.Popen([sys.executable, "-c", APP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "FLUSHING", app.communicate(timeout=60)
        while not _sleeping(app.pid):  # until the main thread waits for the lock inside the export
            assert app.poll() is None and holder.poll() is None, "the export never waited for the lock"
        app.send_signal(signal.SIGINT)
        line = app.stdout.readline().strip()
        assert line == "INTERRUPTED", (line, app.communicate(timeout=60))
    out, err = app.communicate("go\n", timeout=120)
    assert app.returncode == 0 and "DONE" in out, err[-3000:]
    with sqlite3.connect(db) as conn:
        runs = sorted(conn.execute("SELECT json_extract(meta, '$.name'), status FROM workflow_runs").fetchall())
        events = conn.execute("SELECT count(*) FROM execution_events").fetchone()[0]
    assert runs == [("first", "completed"), ("second", "completed")], (runs, err[-3000:])  # was second only
    assert events == 6
    return line == "INTERRUPTED"


@pytest.mark.skipif(os.uname().machine not in SLEEPS or not Path("/proc/self/syscall").exists(),
                    reason="needs /proc/<pid>/syscall on x86_64 or aarch64")
def test_ctrl_c_in_the_applications_export_keeps_the_batch(tmp_path: Path) -> None:
    assert _interrupted_run(tmp_path)
