"""OTLP trace receivers (gRPC and HTTP) that write spans into the cmbagent DAG database.

Many agent processes on many machines export with the stock OTLP exporters (or through an
OpenTelemetry Collector) to one ``cmbagent-otel ingest`` server, which stores the spans
with the same :class:`~cmbagent_otel.dag.writer.DagWriter` the in-process DAG exporter
uses. It serves OTLP/gRPC (``TraceService/Export``, on grpcio) and OTLP/HTTP
(``POST /v1/traces``, ``application/x-protobuf`` or ``application/json``, optionally
gzip, on uvicorn) side by side; well-kept servers do the protocol work, this module wires
them to one shared core (:mod:`cmbagent_otel._ingest_core`).

OTLP/HTTP status codes: 200 with an ``ExportTraceServiceResponse`` (``partial_success``
when some spans were rejected), 400 for malformed payloads (or anything that cannot be
read fully), 401 without the configured bearer token, 413 above the size limit, 415 for
unsupported content types or encodings, and 503 with ``Retry-After`` while the database is
unreachable or busy (no commit within 3 s) or the memory budget is in use, which the SDK's
OTLP exporter retries. 200 is sent only once the request's spans are committed. The
gRPC codes are the matching ones (see :mod:`cmbagent_otel._ingest_grpc`).

Slow clients cannot take the server: headers and bodies have deadlines (408, or the
connection or RPC cancelled), one client address has a cap of requests in flight, and a body
still arriving reserves only the memory of what has arrived (see the receivers' modules).

Settings resolve argument > environment variable > default; the ``CMBAGENT_OTEL_INGEST_*``
variables (bind address, ports, token, size limits, workers, request timeout, minimum rate,
requests per client) and their defaults are listed in
:mod:`cmbagent_otel.environment_variables`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import environment_variables as env
from ._ingest_core import IngestCore, SpanWriter
from .otlp_decode import Limits

logger = logging.getLogger("cmbagent_otel.ingest")

__all__ = ["IngestServer", "SpanWriter"]

DEFAULT_RETRY_AFTER = 5
MAX_HTTP_REQUESTS = 64  # HTTP requests handled at once (rejections included); more get 503 + Retry-After
MAX_GRPC_REQUESTS = 64  # gRPC calls at once, each a thread while its message arrives; more get RESOURCE_EXHAUSTED
CONNECTIONS_PER_CLIENT_REQUEST = 8  # HTTP connections one address may hold per request it may have in flight
MAX_CONNECTIONS = 1024  # uvicorn's own cap (a plain 503): idle keep-alive connections are cheap
TRACES_PATH = "/v1/traces"


def _port(value: int | str | None, name: str) -> int | None:
    """A port setting: argument (a bad one raises ValueError) > environment > default; ``None`` means off."""
    if value is None:
        return env.get(name)  # type: ignore[no-any-return]
    try:
        return env.parse_port(value)
    except ValueError:
        raise ValueError(f"port must be within 0-65535 (0: any free port) or 'off', got {value!r}") from None


def _quiet_uvicorn() -> None:
    # uvicorn logs each malformed request at WARNING ("Invalid HTTP request received."):
    # clients sending garbage must not be able to flood the server's log.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:
            log.setLevel(logging.ERROR)


class IngestServer:
    """OTLP/gRPC and OTLP/HTTP receivers writing into the DAG database, in background threads.

    ``db_url`` is passed to the writer (``None``: ``CMBAGENT_OTEL_DATABASE_URL`` or the
    default SQLite file); an invalid one, or an in-memory SQLite database, raises
    :class:`~cmbagent_otel.dag.database.BadDatabaseURL` (a ``ValueError``). ``port`` (HTTP)
    and ``grpc_port``: ``0`` binds an ephemeral port (read :attr:`port` / :attr:`grpc_port`
    after :meth:`bind`), ``"off"`` serves no such receiver. ``writer`` replaces the DAG writer
    (any object with ``write(spans)``;
    ``writer_factory`` builds it lazily so an unreachable database at start-up only turns
    requests into 503s). ``token`` requires ``Authorization: Bearer <token>`` (HTTP header or
    gRPC metadata). ``max_bytes`` bounds one request (compressed and decompressed),
    ``max_inflight_bytes`` the memory all requests in flight may reserve (their bodies and
    decoding), ``workers`` the decoding/writing threads of each receiver; at most twice
    ``workers`` requests are decoded or wait for a worker at once (both receivers together),
    more are answered 503/UNAVAILABLE with a retry delay at once rather than queued past their
    client's timeout. ``request_timeout`` (seconds) bounds the wait for a request's headers and
    again for its body (HTTP: plus one second per ``min_rate`` bytes received), and
    ``max_requests_per_client`` the requests one client address may have in flight.
    """

    def __init__(
        self,
        db_url: str | None = None,
        *,
        host: str | None = None,
        port: int | str | None = None,
        grpc_port: int | str | None = None,
        token: str | None = None,
        max_bytes: int | None = None,
        max_inflight_bytes: int | None = None,
        workers: int | None = None,
        request_timeout: float | None = None,
        min_rate: int | None = None,
        max_requests_per_client: int | None = None,
        retry_after: int = DEFAULT_RETRY_AFTER,
        writer: SpanWriter | None = None,
        writer_factory: Callable[[], SpanWriter] | None = None,
        limits: Limits | None = None,
    ) -> None:
        if writer is None and writer_factory is None:
            from .dag.database import storable_url

            storable_url(db_url)  # BadDatabaseURL now, not a 503 for every request later
        self.db_url = db_url
        self.host = str(env.get(env.INGEST_HOST, host))
        self.requested_port = _port(port, env.INGEST_PORT)
        self.requested_grpc_port = _port(grpc_port, env.INGEST_GRPC_PORT)
        if self.requested_port is None and self.requested_grpc_port is None:
            raise ValueError("both receivers are off: set a port for HTTP or gRPC")
        token = env.get(env.INGEST_TOKEN, token)
        self.max_bytes = int(env.get(env.INGEST_MAX_BYTES, max_bytes))
        budget = int(env.get(env.INGEST_MAX_INFLIGHT_BYTES, max_inflight_bytes))
        self.workers = int(env.get(env.INGEST_WORKERS, workers))
        self.request_timeout = float(env.get(env.INGEST_REQUEST_TIMEOUT, request_timeout))
        self.min_rate = int(env.get(env.INGEST_MIN_RATE, min_rate))
        per_client = int(env.get(env.INGEST_MAX_REQUESTS_PER_CLIENT, max_requests_per_client))
        if min(self.max_bytes, budget, self.workers, self.request_timeout, self.min_rate, per_client) <= 0:
            raise ValueError("max_bytes, max_inflight_bytes, workers, request_timeout, min_rate and "
                             "max_requests_per_client must be positive")
        self.core = IngestCore(db_url=db_url, token=token or None, max_bytes=self.max_bytes, budget=budget,
                               retry_after=retry_after, limits=limits or Limits.default(), writer=writer,
                               writer_factory=writer_factory, max_pending=2 * self.workers,
                               max_per_client=per_client)
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._uvicorn: Any = None
        self._app: Any = None
        self._http_thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._grpc: Any = None
        self._http_port: int | None = None
        self._bound = False
        self._stopped = threading.Event()

    def __repr__(self) -> str:  # never shows the token
        return (f"IngestServer(host={self.host!r}, port={self.port!r}, grpc_port={self.grpc_port!r}, "
                f"auth={'on' if self.core.token_required else 'off'})")

    # --- what tests and operators read ---------------------------------------------------
    @property
    def spans_written(self) -> int:
        return self.core.spans_written

    @property
    def unavailable_responses(self) -> int:
        return self.core.unavailable_responses

    @property
    def port(self) -> int | None:
        """The bound OTLP/HTTP port (``None`` before :meth:`bind` or when HTTP is off)."""
        return self._http_port

    @property
    def grpc_port(self) -> int | None:
        """The bound OTLP/gRPC port (``None`` before :meth:`bind` or when gRPC is off)."""
        return self._grpc.port if self._grpc is not None else None

    def _host_for_url(self) -> str:
        return self.host if ":" not in self.host else f"[{self.host}]"

    @property
    def endpoint(self) -> str:
        """The full ``/v1/traces`` URL, for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (HTTP)."""
        return f"http://{self._host_for_url()}:{self.port}{TRACES_PATH}"

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` of the gRPC receiver, for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (with ``grpc``)."""
        return f"{self._host_for_url()}:{self.grpc_port}"

    # --- lifecycle ---------------------------------------------------------------------
    def bind(self) -> IngestServer:
        """Bind the sockets without serving yet (idempotent); raises ``OSError`` when a port is taken."""
        with self._lock:
            if self._bound:
                return self
            try:
                if self.requested_port is not None:
                    family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        sock.bind((self.host, self.requested_port))
                        sock.listen(256)
                    except OSError as exc:
                        sock.close()
                        address = f"[{self.host}]" if ":" in self.host else self.host
                        raise OSError(exc.errno, f"cannot listen on {address}:{self.requested_port} (OTLP/HTTP): "
                                      f"{exc.strerror}") from None
                    self._sock = sock
                    self._http_port = sock.getsockname()[1]
                if self.requested_grpc_port is not None:
                    from ._ingest_grpc import GrpcReceiver

                    self._grpc = GrpcReceiver(self.core, self.host, self.requested_grpc_port, workers=self.workers,
                                              max_concurrent=MAX_GRPC_REQUESTS, timeout=self.request_timeout)
            except BaseException:
                self._close_sockets()
                raise
            self._bound = True
        return self

    def _close_sockets(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._grpc is not None:
            self._grpc.stop(None)
            self._grpc = None
        self._http_port = None

    def start(self) -> IngestServer:
        """Bind and serve in daemon threads; returns ``self``."""
        self.bind()
        self.core.stopping.clear()
        self.core.prepare_soon()
        self._stopped.clear()
        with self._lock:
            if self._grpc is not None:
                self._grpc.start()
            if self._sock is not None and self._http_thread is None:
                import uvicorn

                from ._ingest_http import OtlpHttpApp, Workers, protocol_class

                _quiet_uvicorn()
                self._executor = Workers(max_workers=self.workers, thread_name_prefix="cmbagent-otel-ingest-http")
                app = OtlpHttpApp(self.core, self._executor, max_requests=MAX_HTTP_REQUESTS,
                                  body_timeout=self.request_timeout, min_rate=self.min_rate)
                self._app = app
                http = protocol_class(self.request_timeout, CONNECTIONS_PER_CLIENT_REQUEST * self.core.max_per_client,
                                      MAX_CONNECTIONS)
                config = uvicorn.Config(
                    app, http=http, ws="none", lifespan="off", loop="asyncio", interface="asgi3",
                    log_config=None, access_log=False, server_header=False, date_header=False,
                    limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, timeout_graceful_shutdown=5,
                    h11_max_incomplete_event_size=64 * 1024,
                )
                server = uvicorn.Server(config)
                self._uvicorn = server
                sock = self._sock
                thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                          name="cmbagent-otel-ingest-http", daemon=True)
                thread.start()  # the socket already listens: clients queue until uvicorn accepts
                self._http_thread = thread
        return self

    def serve_forever(self) -> None:
        """Bind and serve until :meth:`stop` is called from another thread (or a signal handler)."""
        self.start()
        self._stopped.wait()

    def stop(self) -> None:
        """Stop serving and release the sockets (idempotent).

        Requests still arriving are answered 503 (retry later) at once; requests being
        written finish first with their true answer (each waits at most
        :data:`~cmbagent_otel._ingest_core.WRITE_WAIT` seconds for the database, inside
        uvicorn's and grpcio's 5 s grace); one looking for the spans the database refuses is
        answered 503 at its next piece (its search kept for its client's retry)."""
        self.core.stopping.set()  # before the receivers wait for the requests being written
        with self._lock:
            server, self._uvicorn = self._uvicorn, None
            app, self._app = self._app, None
            thread, self._http_thread = self._http_thread, None
            executor, self._executor = self._executor, None
            grpc_receiver, self._grpc = self._grpc, None
            sock, self._sock = self._sock, None
            self._bound = False
            self._http_port = None
        if app is not None:
            app.begin_shutdown()
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join()
        if sock is not None:
            sock.close()
        if grpc_receiver is not None:
            grpc_receiver.stop(5.0)
        if executor is not None:
            executor.shutdown(wait=True)
        self._stopped.set()

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # ``python -m cmbagent_otel.ingest ...``: the same as ``cmbagent-otel ingest ...``
    import sys

    from .cli import main

    raise SystemExit(main(["ingest", *sys.argv[1:]]))
