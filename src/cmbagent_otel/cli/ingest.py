"""``cmbagent-otel ingest``: OTLP/gRPC and OTLP/HTTP receivers writing into the DAG database."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import threading
from typing import Any

from .. import environment_variables as env
from ._common import CLIError, one_line, positive_int, shown

NAME = "ingest"
HELP = "run OTLP receivers (gRPC and HTTP) that write spans into the DAG database"
DESCRIPTION = ("Receive OTLP traces over gRPC (TraceService/Export) and HTTP (POST /v1/traces, protobuf or JSON, "
               "optionally gzip; GET /health) and store them in the cmbagent DAG database.")


def _default(name: str) -> str:
    return f"${name} or {env.SETTINGS[name].shown_default()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help=f"bind address (default: {_default(env.INGEST_HOST)})")
    parser.add_argument("--port", default=None, metavar="PORT",
                        help=f"OTLP/HTTP port, 0 = any free port, 'off' = none (default: {_default(env.INGEST_PORT)})")
    parser.add_argument("--grpc-port", default=None, metavar="PORT",
                        help=f"OTLP/gRPC port, 0 = any free port, 'off' = none "
                        f"(default: {_default(env.INGEST_GRPC_PORT)})")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer <token>' (default: ${env.INGEST_TOKEN}; prefer the env "
                        "var, command lines are visible to other users)")
    parser.add_argument("--max-bytes", type=positive_int, default=None,
                        help=f"request size limit in bytes, compressed and decompressed "
                        f"(default: {_default(env.INGEST_MAX_BYTES)})")
    parser.add_argument("--max-inflight-bytes", type=positive_int, default=None,
                        help="memory budget of all requests in flight "
                        f"(default: {_default(env.INGEST_MAX_INFLIGHT_BYTES)})")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help=f"decoding/writing threads per receiver (default: {_default(env.INGEST_WORKERS)})")


def _check_database(server: Any, target: str) -> None:
    """Name a database the server cannot write (a corrupt file, another application's tables, an
    unreachable server) when it starts, not only once a client sends spans: what the server's own
    start-time check found (:meth:`~cmbagent_otel._ingest_core.IngestCore.startup_error`), not a
    check of its own (which held the schema lock for up to 30 s more)."""
    from ..ingest import logger

    exc = server.core.startup_error()
    if exc is not None:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        logger.warning("cmbagent-otel ingest: cannot write to %s: %s; requests are answered 503 (clients keep "
                       "their spans and retry) until it can be written", target, one_line(shown(reason[0])))
    _settle_heap()


# Net allocations between young collections in the server process (CPython's default: 700). A
# request's spans and rows live until it is answered, so at 700 each young collection walked
# them and promoted them, to be walked again by the older generations: 305 young and 27 middle
# collections per 15k spans, ~5 us of CPU per span; at 10,000, 4 young ones. What is freed by
# reference counting (nearly all a request makes) never waits for a collection either way.
YOUNG_COLLECTION_THRESHOLD = 10_000


def _settle_heap() -> None:
    # The server's long-lived objects (the write path's modules, SQLAlchemy's and Alembic's, the
    # writer) are walked by every full collection the requests' garbage starts: ~6 us of CPU per
    # span ingested (bench_ingest). Only this process, the CLI's, is the server's own to freeze,
    # and to tune.
    with contextlib.suppress(Exception):
        gc.collect()
        gc.freeze()
        _, middle, old = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    # gRPC's C core wrote a line of its own to stderr ("E1202 ... add_port.cc:83] Failed to add port")
    # before ours when the gRPC port could not be bound (in use: 4317 is often a collector's), where the
    # CLI promises one error line; an operator's GRPC_VERBOSITY is kept. Set before grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from ..dag.database import BadDatabaseURL, redacted, storable_url
    from ..ingest import IngestServer, logger

    if not logger.handlers:  # the server's own warnings (no token on a public address, ...) reach the operator
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        target = redacted(storable_url(args.db))
        server = IngestServer(args.db, host=args.host, port=args.port, grpc_port=args.grpc_port, token=args.token,
                              max_bytes=args.max_bytes, max_inflight_bytes=args.max_inflight_bytes,
                              workers=args.workers)
    except (BadDatabaseURL, ValueError) as exc:
        raise CLIError(str(exc)) from None
    try:
        server.bind()
    except (TypeError, UnicodeError):  # --host that is no host name: "encoding of hostname failed"
        raise CLIError("cannot listen there: --host is not a host name or address") from None
    except OSError as exc:
        hint = (" (4318 and 4317 are OTLP's standard ports, often taken by a collector: choose others with "
                "--port/--grpc-port, or `off` for none)") if exc.errno == errno.EADDRINUSE else ""
        raise CLIError(f"{exc.strerror or exc}{hint}") from None
    if server.host not in ("127.0.0.1", "::1", "localhost") and not server.core.token_required:
        logger.warning("cmbagent-otel ingest: listening on %s without a token; set %s", server.host, env.INGEST_TOKEN)
    listening = []
    if server.port is not None:
        listening.append(f"{server.endpoint} (OTLP/HTTP)")
    if server.grpc_port is not None:
        listening.append(f"{server.grpc_endpoint} (OTLP/gRPC)")
    print(f"cmbagent-otel ingest: listening on {' and '.join(listening)} -> {target}"
          f"{' (bearer token required)' if server.core.token_required else ''}", flush=True)

    def check() -> None:
        threading.Thread(target=_check_database, args=(server, target), name="cmbagent-otel-ingest-check",
                         daemon=True).start()

    # SIGTERM/SIGINT stop it, whichever thread the kernel gives them to; they stay handled while the
    # server drains (its writes end within a few seconds): a second SIGTERM or Ctrl-C must not kill it
    # with acknowledged requests mid-answer
    server.serve_forever((signal.SIGTERM, signal.SIGINT), started=check)
    print(f"cmbagent-otel ingest: stopped after {server.spans_written} span(s)", flush=True)
    return 0

