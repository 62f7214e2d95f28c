"""Application signal handling that tests for ``SIG_DFL`` where ours is (44th fault campaign; session 43's Left).

``instrument()`` puts its SIGTERM/SIGHUP handler where the default is. An application (or a library) that
installs its own afterwards read ours where it read ``SIG_DFL`` without us, and the shapes that test for the
default first took another branch: ``if previous is SIG_DFL: <end the process> elif callable(previous):
previous(...)`` called ours and went on after SIGTERM; ``previous in (SIG_DFL, SIG_IGN)`` did not exit; a library
that installs its handler only over the default (``signal.getsignal(SIGTERM) == SIG_DFL``) installed nothing.
Now the application sees the default there (``_termination._virtual_default``). Each shape runs in a child
without and with ``instrument()``: the exit and the output must be the same, and with us the run is exported
(failed when the signal ended the process, completed when it went on).
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from .test_faults43_chained_signal_handlers import _run
from .test_signal_flush import _rows

CHILD = textwrap.dedent('''
    import os, signal, sys
    shape, instrumented = sys.argv[1], sys.argv[2] == "instrumented"
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    if instrumented:
        cmbagent_otel.instrument(instrument_cmbagent=False, instrument_threading=False)

    def default_first_is(signum, frame):  # the default tested with `is` before previous is called
        print("CLEANUP", flush=True)
        if previous is signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif callable(previous):
            previous(signum, frame)

    def default_first_in(signum, frame):  # the default or ignored: exits as a stopped process does
        print("CLEANUP", flush=True)
        if previous in (signal.SIG_DFL, signal.SIG_IGN):
            sys.exit(128 + signum)
        previous(signum, frame)

    def library_over_default(signum, frame):  # installed only where the default is (read with getsignal)
        print("LIBRARY", flush=True)
        sys.exit(0)

    def read_later(signum, frame):  # what is installed read in the handler, not at installation
        print("CLEANUP", signal.getsignal(signal.SIGHUP) == signal.SIG_DFL, flush=True)

    if shape == "library_over_default":
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, library_over_default)
    else:
        previous = signal.signal(signal.SIGTERM, globals()[shape])
    with workflow("stopped run", mode="planning-control"), phase("control"):
        with step(1, "step 1"):
            print("READY", flush=True)
            sys.stdin.readline()
    print("WENT ON", flush=True)
''')

# shape: the exit without us (a negative signal number: ended by it) and what it prints after READY
SHAPES = {"default_first_is": (-signal.SIGTERM, ["CLEANUP"]),
          "default_first_in": (128 + signal.SIGTERM, ["CLEANUP"]),
          "library_over_default": (0, ["LIBRARY"]),
          "read_later": (0, ["CLEANUP True", "WENT ON"])}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_an_application_testing_for_the_default_behaves_as_without_us(tmp_path: Path, shape: str) -> None:
    """Fails on 5712a9c for each shape: with us ``default_first_is`` and ``default_first_in`` went on (exit 0,
    ``WENT ON``), the library installed nothing (the process ended by SIGTERM, no ``LIBRARY``), ``read_later``
    printed ``CLEANUP False``."""
    assert _run(tmp_path, shape, "plain", CHILD)[:2] == SHAPES[shape]
    code, out, db = _run(tmp_path, shape, "instrumented", CHILD)
    assert (code, out) == SHAPES[shape]
    runs, nodes, _ = _rows(db)
    # went on, or left the blocks by sys.exit(0): completed; ended by the signal (ours, put back as the default
    # the handler read) or by a failing exit: stored failed, not `executing` for ever
    status = "completed" if code == 0 else "failed"
    assert runs == [status] and nodes.get("step_1") == status
