"""KeyboardInterrupt at every step of ``IngestServer.stop()``, deeper than test_ingest43_lifecycle.py's sweep
(session 45): every return into the receivers' modules (ingest.py, _ingest_grpc.py, _ingest_http.py,
_ingest_pool.py, _ingest_core.py) and into grpcio's server module, in the thread that stops (where a signal
handler's interrupt lands). Once the stop has begun, it still releases everything (no thread, no descriptor
left), then raises the interrupt; cut before, the server serves on, whole, for the next stop."""

from __future__ import annotations

from pathlib import Path
from types import FrameType

import grpc._server
import pytest

import cmbagent_otel
from tests.faults.conftest import interrupt_at
from tests.ingest.test_ingest43_lifecycle import (  # noqa: F401  (baseline: the fixture)
    assert_nothing_left,
    baseline,
    grpc_export,
    nth_step,
    post,
    server_for,
    spans,
    steps_of,
    where,
)

_PACKAGE = Path(cmbagent_otel.__file__).parent
FILES = {str(_PACKAGE / name) for name in ("ingest.py", "_ingest_grpc.py", "_ingest_http.py", "_ingest_pool.py",
                                             "_ingest_core.py")} | {grpc._server.__file__}


def _step(frame: FrameType, event: str) -> bool:
    if event == "c_return":
        return frame.f_code.co_filename in FILES and frame.f_code.co_name != "__del__"
    # not a finalizer or weak reference callback the collector ran there, nor a call made from one: the
    # interpreter ignores (prints) what they raise, a signal handler's interrupt as any other
    return (event == "return" and frame.f_back is not None and frame.f_back.f_code.co_filename in FILES
            and frame.f_code.co_name not in ("__del__", "_remove") and frame.f_back.f_code.co_name != "__del__")


def test_keyboard_interrupt_at_each_deep_step_of_stop_leaves_nothing(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:  # noqa: F811
    probe = server_for(sqlite_url).start()
    assert post(probe, spans()) == 200
    grpc_export(probe, spans())
    count = steps_of(probe.stop, _step)
    assert count > 30
    for n in range(count):
        server = server_for(sqlite_url).start()
        assert post(server, spans()) == 200
        grpc_export(server, spans())
        try:
            with interrupt_at(nth_step(n, _step)) as raised:
                server.stop()
        except pytest.fail.Exception:  # fewer steps this time (what the collector or a join ran): swept
            server.stop()
            assert_nothing_left(baseline, f"(step {n}: not reached)")
            continue
        at = where(n, raised)
        if server.port is not None:  # cut before it began: serving still, on both receivers
            assert "_teardown" not in at and server.grpc_port is not None, at
            assert post(server, spans()) == 200, at
            grpc_export(server, spans())
            server.stop()
        assert server.port is None and server.grpc_port is None, at
        raised.clear()  # what a frame lost to the interrupt lives as long as its traceback
        assert_nothing_left(baseline, at)
        server.stop()  # idempotent after an interrupted stop
