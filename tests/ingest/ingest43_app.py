"""An application serving an ``IngestServer`` itself, run as a script by test_ingest43_*.py.

``python ingest43_app.py DB MODE`` prints ``ports HTTP GRPC`` once serving, then:

* ``handler``: serves with ``serve_forever()`` in the main thread; its own SIGTERM handler calls
  ``server.stop()``; prints ``returned None`` when ``serve_forever`` returns;
* ``signals``: ``serve_forever((SIGTERM,))``; prints ``returned <the signal's number>``;
* ``exit``: starts the server (request timeout one hour), opens a gRPC call that never sends its
  message, prints ``waiting`` once the server holds it, and leaves the interpreter with the server
  still running.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator

from cmbagent_otel.ingest import IngestServer

KEPT: list[object] = []  # what lives until the interpreter exits
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def main(db: str, mode: str) -> None:
    server = IngestServer(db, host="127.0.0.1", port=0, grpc_port=0,
                          request_timeout=3600 if mode == "exit" else None)

    def announce() -> None:
        print(f"ports {server.port} {server.grpc_port}", flush=True)

    if mode == "handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
        server.bind()
        announce()
        print(f"returned {server.serve_forever()}", flush=True)
    elif mode == "signals":
        print(f"returned {server.serve_forever((signal.SIGTERM,), started=announce)}", flush=True)
    elif mode == "exit":
        import grpc

        server.start()
        announce()
        never = threading.Event()

        def silent() -> Iterator[bytes]:
            never.wait()
            return
            yield b""  # a generator that yields nothing

        channel = grpc.insecure_channel(server.grpc_endpoint)
        call = channel.stream_unary(EXPORT).future(silent())  # kept: a call collected is cancelled
        while server.core.requests != 1:  # the server's call thread waits for the message
            never.wait(0.01)
        print("waiting", flush=True)
        KEPT.append(call)  # the process ends with the call waiting, as at any moment of an application's life
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
