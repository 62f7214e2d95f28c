"""A request being written when the application leaves the interpreter normally (session 45). The
receivers' threads are daemons: only the exit's stop (an ``atexit`` function) gives the request its grace.
It must be answered whole (and then stored), never cut off half-written; refused only when its write
outlasts the grace (a starved machine). Python 3.12+ starts no thread in an ``atexit`` function, grpcio's
grace thread among them: the gRPC call was cancelled at once (UNAVAILABLE "Cancelling all calls"), its
spans stored all the same; the receiver now gives the grace itself."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cmbagent_otel.ingest import GRACE_S

from .conftest import finished
from .test_ingest_limits import EXPORT, pb_request, stored_traces

APP = Path(__file__).with_name("ingest45_exit_app.py")
WAIT = 60.0


def _app(db: Path) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, str(APP), f"sqlite:///{db}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ports "):
        raise AssertionError(f"{line}{finished(proc)[1]}")
    _, http_port, grpc_port = line.split()
    return proc, int(http_port), int(grpc_port)


@pytest.mark.parametrize("receiver", ["http", "grpc"])
def test_a_request_being_written_at_exit_is_answered_whole(tmp_path: Path, receiver: str) -> None:
    db = tmp_path / "ingest.db"
    proc, http_port, grpc_port = _app(db)
    request, trace_id = pb_request(3)
    refused: object = None
    try:
        if receiver == "http":
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=WAIT)
            conn.request("POST", "/v1/traces", request.SerializeToString(),
                         {"Content-Type": "application/x-protobuf"})
            answer = conn.getresponse()
            status, body = answer.status, answer.read()  # IncompleteRead / RemoteDisconnected: cut off
            assert len(body) == int(answer.headers["content-length"])
            refused = None if status == 200 else (status, body)
        else:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                try:
                    channel.unary_unary(EXPORT)(request.SerializeToString(), timeout=WAIT)
                except grpc.RpcError as exc:  # before, on Python 3.12: UNAVAILABLE "Cancelling all calls"
                    refused = exc
        out, err = finished(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "writing" in out and "Traceback" not in err, err[-3000:]
    if refused is not None:  # only a write that outlasted the grace (a starved machine) may be refused
        took = [float(line.split()[2]) for line in out.splitlines() if line.startswith("written in ")]
        assert not took or took[0] >= GRACE_S, (refused, out)
        return
    assert f"{trace_id:032x}" in stored_traces(db)
