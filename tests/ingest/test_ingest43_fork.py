"""A process forked after its ingest server started (a multiprocessing worker, a subprocess made by fork)."""

from __future__ import annotations

import logging
import os
import select
import signal

from cmbagent_otel.ingest import IngestServer, logger
from tests.ingest.test_ingest43_lifecycle import WAIT, refused


def test_a_child_forked_after_start_holds_no_port_and_its_stop_returns_at_once(sqlite_url: str) -> None:
    """The child's copy of the HTTP listening socket kept the port accepting connections after the parent
    stopped (queued for ever: nobody accepts them), as long as the child lived. The child's own stop()
    waited for the parent's threads, which are not in the child: grpcio's stop event is never set there
    (for ever on 5d6278f). Now the child forgets the parent's receivers at the fork: its stop() has nothing
    to wait for, and logs nothing."""
    server = IngestServer(sqlite_url, host="127.0.0.1", port=0, grpc_port=0).start()
    port, grpc_port = server.port, server.grpc_port
    assert port is not None and grpc_port is not None
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: waits for the parent's stop, then stops its copy
        code = 1
        try:
            os.close(go_write)
            os.close(done_read)
            os.read(go_read, 1)
            records: list[logging.LogRecord] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = records.append  # type: ignore[method-assign]
            logger.addHandler(handler)
            server.stop()
            code = 0 if not records and server.port is None else 2
            os.write(done_write, bytes([code]))
        finally:
            os._exit(code)
    os.close(go_read)
    os.close(done_write)
    try:
        server.stop()
        assert refused(port), "the child's copy of the HTTP socket still listens"
        assert refused(grpc_port)
        os.write(go_write, b"x")
        answered = select.select([done_read], [], [], WAIT)[0]
        assert answered and os.read(done_read, 1) == b"\0", "the child's stop() did not return (or logged)"
    finally:
        os.close(go_write)
        os.close(done_read)
        if not os.waitpid(pid, os.WNOHANG)[0]:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
