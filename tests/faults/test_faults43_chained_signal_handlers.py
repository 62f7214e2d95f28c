"""An application's SIGTERM handler installed after ours, in the shapes real ones take (41st fault campaign).

``instrument()`` puts its handler in place of the default; an application that installs its own afterwards gets
ours back as ``previous`` where it got ``SIG_DFL`` without us. Each shape below runs twice in a child process,
without and with ``instrument()``, and the exit must be the same. The shape found in public code that did not
(``if callable(previous): previous(signum, frame)`` then ``elif previous == signal.SIG_DFL:`` ending the
process): without us the handler takes its default branch and the process ends by the signal; with us it
called ours, which flushed and returned, and the process went on after SIGTERM (a container's stop waited for
its SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import hangup_as_default
from .test_signal_flush import _rows

CHILD = textwrap.dedent('''
    import os, signal, sys
    shape, instrumented = sys.argv[1], sys.argv[2] == "instrumented"
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    if instrumented:
        cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)
    previous = signal.getsignal(signal.SIGTERM)

    def callable_then_default(signum, frame):  # found in public code (twice), and with SystemExit
        print("CLEANUP", flush=True)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def callable_then_exit(signum, frame):  # found in public code: its default branch exits 128 + signum
        print("CLEANUP", flush=True)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            raise SystemExit(128 + signum)

    def callable_only(signum, frame):  # the handler goes on: the application stops itself later
        print("CLEANUP", flush=True)
        if callable(previous):
            previous(signum, frame)

    def guarded(signum, frame):  # calls only a handler of the application's
        print("CLEANUP", flush=True)
        if previous not in (signal.SIG_DFL, signal.SIG_IGN, None):
            previous(signum, frame)

    def restore_and_resend(signum, frame):  # the previous handler back, the signal sent again
        print("CLEANUP", flush=True)
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, globals()[shape])
    with workflow("stopped run", mode="planning-control"), phase("control"):
        with step(1, "step 1"):
            print("READY", flush=True)
            sys.stdin.readline()
    print("WENT ON", flush=True)
''')

# shape: the exit without us (a negative signal number: ended by it)
SHAPES = {"callable_then_default": -signal.SIGTERM, "callable_only": 0, "guarded": 0,
          "restore_and_resend": -signal.SIGTERM, "callable_then_exit": 128 + signal.SIGTERM}
# with us, where it differs: none since session 44 (the handler reads the default where ours is, and takes its
# own default branch: callable_then_exit ended by the signal with us, by its SystemExit without)
WITH_US: dict[str, int] = {}


def _run(tmp_path: Path, shape: str, mode: str, child: str = CHILD) -> tuple[int, list[str], Path]:
    db = tmp_path / mode / "cmbagent.db"
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{db}",
           "CMBAGENT_OTEL_SPILL_DIR": str(tmp_path / mode / "spill"), "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    env.pop("OTEL_SDK_DISABLED", None)
    proc = subprocess.Popen([sys.executable, "-c", child, shape, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=hangup_as_default)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY", proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    # a process that went on waits on its stdin: closed here, it ends its run normally
    rest, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    return proc.returncode, rest.splitlines(), db


@pytest.mark.parametrize("shape", list(SHAPES))
def test_an_application_handler_installed_after_ours_ends_the_process_as_without_us(tmp_path: Path,
                                                                                    shape: str) -> None:
    """Fails on 5d6278f for ``callable_then_default`` and ``callable_then_exit``: with us the process went on
    (exit 0, ``WENT ON``)."""
    without = _run(tmp_path, shape, "plain")
    assert without[:2] == (SHAPES[shape], ["CLEANUP"] + (["WENT ON"] if SHAPES[shape] == 0 else []))
    code, out, db = _run(tmp_path, shape, "instrumented")
    assert (code, out) == (WITH_US.get(shape, without[0]), without[1])
    runs, nodes, _ = _rows(db)
    if code == 0:  # went on: the run ended normally
        assert runs == ["completed"] and nodes.get("step_1") == "completed"
    else:  # ended by the signal: what was recorded exported first, the run failed (not `executing` for ever)
        assert runs == ["failed"] and nodes.get("step_1") == "failed"
