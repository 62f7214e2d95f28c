"""Ctrl-C as a deferral of our SIGTERM handler is entered or left (46th fault campaign).

``_termination.signals_deferred()`` holds our SIGTERM/SIGHUP handler's work back while the main thread itself
exports (``force_flush``: the application's, ``uninstrument()``'s); the handler notes the signal and the block's
end acts on it. It was a ``contextlib`` context manager: a ``KeyboardInterrupt`` as its generator yielded to
``__enter__`` (``next()``'s return) or as ``__exit__`` was entered left the deferral in place for as long as the
interrupt's traceback was kept (an interactive session keeps the last one), and the next SIGTERM was noted and
never acted on: the process went on. It is now a ``_varblock.VarSet``, whose exit is C code.

The child interrupts the block at each of its signal points in turn (``conftest.interrupt_at``: a Python
function's entry, a C call's return), keeps every interrupt, then sends itself SIGTERM.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTED_WITHIN_S = 600

APP = textwrap.dedent('''
    import os, signal
    import cmbagent_otel
    from cmbagent_otel import _termination
    from tests.faults.conftest import each_interrupt, runs_under

    cmbagent_otel.instrument(exporters="none", instrument_cmbagent=False, instrument_threading=False)

    def block():
        with _termination.signals_deferred():
            pass

    kept = [raised for _, raised in each_interrupt(  # with their tracebacks
        block, lambda frame, event: event in ("call", "c_return") and runs_under(frame, block.__code__))]
    print("POINTS", len(kept), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    print("WENT ON AFTER SIGTERM", flush=True)
''')


def test_sigterm_after_interrupted_deferrals_still_ends_the_process(tmp_path: Path) -> None:
    """Fails on main 75098e5: the process went on after SIGTERM, then hung at its exit (the kept generators'
    ``finally`` ran our stop there, which waits for a thread that never starts)."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_SDK_DISABLED"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, "-c", APP], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    # the start (instrument(): AG2's import) gets a bound of its own: a loaded machine makes it minutes; the hang
    # looked for comes after the signal
    if not select.select([proc.stdout], [], [], STARTED_WITHIN_S)[0]:
        proc.kill()
        pytest.fail(f"the child did not start within {STARTED_WITHIN_S} s: {proc.communicate()}")
    points = proc.stdout.readline()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # main: the kept generators' finally ran our stop at the exit, which hung
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the process went on after SIGTERM and never ended: {points + out!r}")
    assert points.startswith("POINTS "), (points, out, err[-2000:])
    assert int(points.split()[1]) >= 2, points
    assert "WENT ON" not in out and proc.returncode == -signal.SIGTERM, (out, proc.returncode, err[-2000:])
