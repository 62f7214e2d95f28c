"""``IngestServer.serve_forever()`` in an application's main thread, stopped by a signal (session 43).

Linux delivers a process-directed signal to any thread that does not block it (grpcio's, uvicorn's);
Python runs the handler only when the main thread next runs Python code. ``serve_forever()`` slept in
``Event.wait()``: an application whose SIGTERM handler calls ``stop()`` served on for ever when the
signal landed on another thread. The signal is forced onto a grpcio thread with ``tgkill`` once the
main thread sleeps, as tests/ingest/test_ingest_slow_clients.py does for the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import finished, main_thread_asleep, sigterm_onto_a_grpc_thread

APP = Path(__file__).with_name("ingest43_app.py")
WAIT = 60.0  # bound of every wait for the child (generous: the machine is shared)


def spawn(db: Path, mode: str) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, str(APP), f"sqlite:///{db}", mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ports "):
        proc.kill()
        raise AssertionError(f"the app did not serve: {line}{proc.communicate()[1]}")
    _, http, grpc_port = line.split()
    return proc, int(http), int(grpc_port)


@pytest.mark.parametrize(("mode", "returned"), [("handler", "None"), ("signals", str(int(signal.SIGTERM)))])
def test_serve_forever_returns_on_a_sigterm_taken_by_another_thread(tmp_path: Path, mode: str,
                                                                     returned: str) -> None:
    """``handler``: the application's SIGTERM handler calls ``stop()``; ``signals``: ``serve_forever``
    handles SIGTERM itself (the CLI's way, now the library's). Either returns, the server stopped."""
    proc, _port, _grpc_port = spawn(tmp_path / "served.db", mode)
    out, err = finished(proc, WAIT, lambda pid: (main_thread_asleep(pid, WAIT), sigterm_onto_a_grpc_thread(pid)))
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"returned {returned}", out
    assert "Traceback" not in err, err


def test_exit_with_a_server_still_running_does_not_wait_for_its_calls(tmp_path: Path) -> None:
    """An application leaving the interpreter with the server running and a gRPC call waiting for its
    message: concurrent.futures' exit hook joined the call's thread, which waits for the message until
    the request timeout (here an hour). The server is stopped at exit now (the call cancelled)."""
    proc, _, _ = spawn(tmp_path / "exit.db", "exit")
    out, err = finished(proc, WAIT)
    assert proc.returncode == 0, err
    assert out.strip() == "waiting", out
    assert "Traceback" not in err, err
