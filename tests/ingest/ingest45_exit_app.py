"""An application that leaves the interpreter (a normal exit) while its ``IngestServer`` is writing a
request, run as a script by test_ingest45_exit.py.

``python ingest45_exit_app.py DB`` prints ``ports HTTP GRPC`` once serving; the first write then waits
(at most 60 s) until the server is stopping, so the request is still being written when the exit's
stop begins; ``writing`` is printed when it starts, after which the main thread returns, and ``written in
S s`` when the write is done (S: seconds from the stop's beginning).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel.dag.writer import DagWriter
from cmbagent_otel.ingest import IngestServer


class HeldUntilStopping:
    """A DAG writer whose write waits for the server's stop to begin, then writes."""

    def __init__(self, db: str, server: list[IngestServer]) -> None:
        self.writer = DagWriter(db)
        self.server = server
        self.entered = threading.Event()

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        print("writing", flush=True)
        self.entered.set()
        self.server[0].core.stopping.wait(60)
        began = time.monotonic()
        self.writer.write(spans)
        print(f"written in {time.monotonic() - began:.3f} s", flush=True)


def main(db: str) -> None:
    made: list[HeldUntilStopping] = []
    holder: list[IngestServer] = []

    def factory() -> HeldUntilStopping:
        made.append(HeldUntilStopping(db, holder))
        return made[0]

    server = IngestServer(db, host="127.0.0.1", port=0, grpc_port=0, writer_factory=factory)
    holder.append(server)
    server.start()
    print(f"ports {server.port} {server.grpc_port}", flush=True)
    assert made, "the server makes its writer as it starts"  # IngestCore.prepare_soon
    if not made[0].entered.wait(60):
        raise SystemExit("no request came")
    # the main thread returns: the interpreter exits with the request being written


if __name__ == "__main__":
    main(sys.argv[1])
