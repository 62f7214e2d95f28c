"""The ingest server as an operator runs it (databases come from tests/conftest.py: db_url, pg_url)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

# The helper app is imported by name here and run as a script by the subprocess tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


class IngestProcess:
    """``cmbagent-otel ingest`` in a subprocess (ephemeral ports), as an operator runs it."""

    def __init__(self, db_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        import re
        import subprocess

        code = "import cmbagent_otel.ingest; from cmbagent_otel.cli import main; raise SystemExit(main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "--db", db_url, "ingest", "--port", "0", "--grpc-port", "0", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1/traces \(OTLP/HTTP\) and 127\.0\.0\.1:(\d+)",
                          line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"ingest did not start: {line}{self.proc.communicate()[1]}")
        self.port, self.grpc_port = int(match.group(1)), int(match.group(2))

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in KiB (``VmHWM``: peak resident set size)."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, then (exit code, stdout, stderr)."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def main_thread_asleep(pid: int, wait: float = 60.0) -> None:
    """Wait (at most ``wait`` s) until the process's main thread sleeps in its wait, on a lock (a futex) or
    on the wakeup socket: a signal landing earlier is handled at once, which proves nothing."""
    import threading
    import time

    wchan = Path(f"/proc/{pid}/task/{pid}/wchan")
    deadline = time.monotonic() + wait
    pause = threading.Event()  # never set: a bounded pause between polls
    while not wchan.read_text().startswith(("futex", "unix_stream_read")):
        assert time.monotonic() < deadline, wchan.read_text()
        pause.wait(0.01)


def sigterm_onto_a_grpc_thread(pid: int) -> None:
    """SIGTERM delivered (``tgkill``) to one of grpcio's own threads of process ``pid``, not its main thread."""
    import ctypes
    import signal

    names: dict[int, str] = {}
    for tid in (int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended since the listing
            names[tid] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    threads = list(names)
    grpc_threads = [tid for tid in threads if names[tid] != "python"]  # grpcio's C threads live as long as it
    assert grpc_threads, names
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, grpc_threads[0], int(signal.SIGTERM)) == 0, ctypes.get_errno()


def finished(proc: Any, wait: float = 60.0, signal_first: Any = None) -> tuple[str, str]:
    """(stdout, stderr) of the subprocess ``proc`` once it exits, within ``wait`` s (``TimeoutExpired`` else);
    ``signal_first`` (a callable of the pid) runs first. Whatever happens, no child is left running."""
    try:
        if signal_first is not None:
            signal_first(proc.pid)
        out, err = proc.communicate(timeout=wait)
        return out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def post_json(srv: Any, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``doc`` as OTLP/JSON to an in-process ``IngestServer``: (status, the answer's JSON)."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps(doc).encode()  # json.dumps writes a lone surrogate as JSON.stringify does
    request = urllib.request.Request(srv.endpoint, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
