"""A KeyboardInterrupt landing inside grpcio's own code while the ingest server starts (session 44).
test_ingest43_lifecycle.py interrupts each return into ingest.py; here the interrupt lands deeper, in
``grpc._server._start``, once grpcio has started the server (its stage set, its ``_serve`` thread started)
but before :meth:`GrpcReceiver.start` noted it. The stop then started it "again" (grpcio:
``ValueError: Cannot start already-started server!``), a failed step, and never stopped it: the gRPC
port's socket and grpcio's ``_serve`` thread were left for the life of the process."""

from __future__ import annotations

from types import FrameType
from typing import Any

import pytest

from tests.faults.conftest import interrupt_at
from tests.ingest.test_ingest43_lifecycle import (  # noqa: F401  (baseline: the fixture)
    baseline,
    grpc_export,
    held,
    post,
    refused,
    server_for,
    spans,
    where,
)


def assert_no_socket_or_thread_left(before: tuple[set[str], set[str]], where: str) -> None:
    """grpcio's C core may keep a completion queue's epoll and eventfds after an interrupted start (as after a
    failed bind, see the baseline fixture): not counted; sockets and threads are."""
    threads, fds = held()
    assert threads - before[0] == set(), f"threads left after stop {where}"
    assert {fd for fd in fds - before[1] if ":socket:" in fd} == set(), f"sockets left after stop {where}"


def _inside_grpc_start(after: str) -> Any:
    def hit(frame: FrameType, event: str, arg: Any) -> bool:
        return (event == "return" and frame.f_code.co_name == after and frame.f_back is not None
                and frame.f_back.f_code.co_name == "_start" and "grpc" in frame.f_back.f_code.co_filename)

    return hit


@pytest.mark.parametrize("after", ["_request_call", "start"])  # the call requested, the _serve thread started
def test_an_interrupt_inside_grpcios_start_leaves_no_port_and_no_thread(
        sqlite_url: str, baseline: tuple[set[str], set[str]], after: str) -> None:  # noqa: F811
    server = server_for(sqlite_url)
    with interrupt_at(_inside_grpc_start(after)) as raised:
        server.start()
    at = where(0, raised)
    assert "_start" in at, at
    raised.clear()
    assert server.port is None and server.grpc_port is None, at
    assert_no_socket_or_thread_left(baseline, at)
    server.start()  # and it starts again, both receivers serving
    assert post(server, spans()) == 200
    grpc_export(server, spans())
    port = server.grpc_port
    server.stop()
    assert port is not None and refused(port)
    assert_no_socket_or_thread_left(baseline, at)
