"""OTLP/HTTP trace receiver that writes spans into the cmbagent DAG database.

Many agent processes on many machines export with the stock OTLP HTTP exporter (or through
an OpenTelemetry Collector) to one ``cmbagent-otel ingest`` server, which stores the spans
with the same :class:`~cmbagent_otel.dag.writer.DagWriter` the in-process DAG exporter
uses. Only ``POST /v1/traces`` is served, with ``application/x-protobuf`` or
``application/json`` bodies, optionally gzip-compressed.

Status codes follow the OTLP/HTTP specification: 200 with an
``ExportTraceServiceResponse`` (``partial_success`` when some spans were rejected), 400 for
malformed payloads, 401 without the configured bearer token, 413 above the size limit, 415
for unsupported content types or encodings, and 503 with ``Retry-After`` while the
database is unreachable, which the SDK's OTLP exporter retries.

Settings resolve argument > environment variable > default:
``CMBAGENT_OTEL_INGEST_HOST`` (``127.0.0.1``), ``CMBAGENT_OTEL_INGEST_PORT`` (``4318``),
``CMBAGENT_OTEL_INGEST_TOKEN`` (none), ``CMBAGENT_OTEL_INGEST_MAX_BYTES`` (16 MiB) and
``CMBAGENT_OTEL_DATABASE_URL`` (read by the writer).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import threading
import zlib
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan

from .otlp_decode import MalformedPayload, decode_request, encode_response

logger = logging.getLogger("cmbagent_otel.ingest")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_RETRY_AFTER = 5
TRACES_PATH = "/v1/traces"

ENV_HOST = "CMBAGENT_OTEL_INGEST_HOST"
ENV_PORT = "CMBAGENT_OTEL_INGEST_PORT"
ENV_TOKEN = "CMBAGENT_OTEL_INGEST_TOKEN"
ENV_MAX_BYTES = "CMBAGENT_OTEL_INGEST_MAX_BYTES"

_CONTENT_TYPES = {
    "application/x-protobuf": "protobuf",
    "application/protobuf": "protobuf",
    "application/json": "json",
}
_MIME = {"protobuf": "application/x-protobuf", "json": "application/json"}


class SpanWriter(Protocol):
    """What the server needs from a writer: store one batch in one transaction."""

    def write(self, spans: Sequence[ReadableSpan]) -> Any: ...


class _PayloadTooLarge(Exception):
    pass


class _HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _gunzip(body: bytes, limit: int) -> bytes:
    # Bounded decompression: a small gzip bomb must not allocate gigabytes.
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = decomp.decompress(body, limit + 1)
        if len(out) > limit or decomp.unconsumed_tail:
            raise _PayloadTooLarge
        out += decomp.flush()
    except zlib.error as exc:
        raise MalformedPayload(f"invalid gzip body: {exc}") from None
    if len(out) > limit:
        raise _PayloadTooLarge
    if not decomp.eof:
        raise MalformedPayload("truncated gzip body")
    return out


def _status_body(kind: str, code: int, message: str) -> bytes:
    # OTLP/HTTP: error responses carry a google.rpc.Status in the request's encoding.
    if kind == "protobuf":
        from google.rpc import status_pb2

        return status_pb2.Status(code=code, message=message).SerializeToString()
    return json.dumps({"code": code, "message": message}).encode()


# google.rpc.Code values for the Status body
_RPC_CODE = {
    HTTPStatus.BAD_REQUEST: 3,  # INVALID_ARGUMENT
    HTTPStatus.UNAUTHORIZED: 16,  # UNAUTHENTICATED
    HTTPStatus.NOT_FOUND: 5,
    HTTPStatus.METHOD_NOT_ALLOWED: 12,
    HTTPStatus.LENGTH_REQUIRED: 3,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: 8,  # RESOURCE_EXHAUSTED
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: 3,
    HTTPStatus.INTERNAL_SERVER_ERROR: 13,
    HTTPStatus.SERVICE_UNAVAILABLE: 14,  # UNAVAILABLE
}


class IngestServer:
    """An OTLP/HTTP receiver writing into the DAG database; runs in a background thread.

    ``db_url`` is passed to the writer (``None``: ``CMBAGENT_OTEL_DATABASE_URL`` or the
    default SQLite file). ``port=0`` binds an ephemeral port; read :attr:`port` after
    :meth:`start`. ``writer`` replaces the DAG writer (any object with ``write(spans)``;
    ``writer_factory`` builds it lazily so an unreachable database at start-up only turns
    requests into 503s). ``token`` requires ``Authorization: Bearer <token>``.
    """

    def __init__(
        self,
        db_url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        max_bytes: int | None = None,
        retry_after: int = DEFAULT_RETRY_AFTER,
        writer: SpanWriter | None = None,
        writer_factory: Callable[[], SpanWriter] | None = None,
    ) -> None:
        self.db_url = db_url
        self.host = host if host is not None else (os.environ.get(ENV_HOST) or DEFAULT_HOST)
        self.requested_port = port if port is not None else _env_int(ENV_PORT, DEFAULT_PORT)
        token = token if token is not None else os.environ.get(ENV_TOKEN)
        self._token = token.encode() if token else None
        self.max_bytes = max_bytes if max_bytes is not None else _env_int(ENV_MAX_BYTES, DEFAULT_MAX_BYTES)
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.retry_after = retry_after
        self._writer = writer
        self._writer_factory = writer_factory
        self._writer_lock = threading.Lock()
        self._write_lock: threading.Lock | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.spans_written = 0
        self.unavailable_responses = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"IngestServer(host={self.host!r}, port={self.port!r}, auth={'on' if self._token else 'off'})"

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        """The bound port (``None`` before :meth:`start`)."""
        return self._httpd.server_address[1] if self._httpd is not None else None  # type: ignore[return-value]

    @property
    def endpoint(self) -> str:
        """The full ``/v1/traces`` URL, for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}{TRACES_PATH}"

    def bind(self) -> IngestServer:
        """Bind the socket without serving yet (idempotent)."""
        if self._httpd is None:
            handler = type("IngestHandler", (_Handler,), {"ingest": self})
            httpd = ThreadingHTTPServer((self.host, self.requested_port), handler)
            httpd.daemon_threads = True
            self._httpd = httpd
        return self

    def start(self) -> IngestServer:
        """Bind and serve in a daemon thread; returns ``self``."""
        self.bind()
        if self._thread is None:
            assert self._httpd is not None
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="cmbagent-otel-ingest",
                                            daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until :meth:`stop` (or a signal)."""
        self.bind()
        assert self._httpd is not None
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and release the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        thread, self._thread = self._thread, None
        if httpd is not None:
            if thread is not None:
                httpd.shutdown()
                thread.join()
            httpd.server_close()

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request handling --------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)

    def _get_writer(self) -> SpanWriter:
        with self._writer_lock:
            if self._writer is None:
                if self._writer_factory is not None:
                    self._writer = self._writer_factory()
                else:
                    from .dag.writer import DagWriter

                    self._writer = DagWriter(self.db_url)
                if self._write_lock is None and self._is_sqlite():
                    # SQLite has one writer at a time; queueing here beats "database is locked".
                    self._write_lock = threading.Lock()
            return self._writer

    def _is_sqlite(self) -> bool:
        try:
            from .dag.database import resolve_url

            return resolve_url(self.db_url).startswith("sqlite")
        except Exception:
            return False

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        """Store ``spans``; raises ``_HTTPError`` 503 while the database is unavailable."""
        from .dag.writer import DatabaseUnavailable

        try:
            writer = self._get_writer()
            lock = self._write_lock
            if lock is not None:
                with lock:
                    writer.write(spans)
            else:
                writer.write(spans)
        except (DatabaseUnavailable, OSError) as exc:
            # OSError: the SQLite directory cannot be created/opened right now (full disk,
            # unmounted volume); retryable like a refused connection.
            with self._count_lock:
                self.unavailable_responses += 1
            logger.warning("cmbagent-otel ingest: database unavailable (%s); asking client to retry",
                           type(exc).__name__)
            raise _HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable, retry later",
                             {"Retry-After": str(self.retry_after)}) from None
        with self._count_lock:
            self.spans_written += len(spans)


class _Handler(BaseHTTPRequestHandler):
    ingest: IngestServer
    server_version = "cmbagent-otel-ingest"
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections and stalled uploads release their thread after this.
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, kind: str, err: _HTTPError) -> None:
        body = _status_body(kind, _RPC_CODE.get(err.status, 2), err.message)
        self._reply(err.status, body, _MIME[kind], err.headers)

    def do_GET(self) -> None:
        if self.path.split("?")[0] in ("/", "/health", "/healthz"):
            self._reply(HTTPStatus.OK, b'{"status":"ok"}', "application/json")
            return
        self.close_connection = True
        self._error("json", _HTTPError(HTTPStatus.NOT_FOUND, f"not found: {self.path[:100]}"))

    def do_POST(self) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        kind = _CONTENT_TYPES.get(ctype, "json")
        try:
            self._handle_post(ctype, kind)
        except _HTTPError as err:
            if err.status >= 400 and err.status != HTTPStatus.SERVICE_UNAVAILABLE:
                self.close_connection = True  # the unread body would corrupt the next request
            self._error(kind, err)
        except Exception:
            logger.exception("cmbagent-otel ingest: unexpected error")
            self.close_connection = True
            self._error(kind, _HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"))

    def _handle_post(self, ctype: str, kind: str) -> None:
        ingest = self.ingest
        if self.path.split("?")[0] != TRACES_PATH:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"only POST {TRACES_PATH} is served")
        if not ingest.authorized(self.headers.get("Authorization")):
            raise _HTTPError(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token",
                             {"WWW-Authenticate": 'Bearer realm="cmbagent-otel"'})
        if ctype not in _CONTENT_TYPES:
            raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                             f"unsupported Content-Type {ctype or '(none)'!r}; "
                             "use application/x-protobuf or application/json")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                             f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        body = self._read_body(ingest.max_bytes)
        try:
            if encoding == "gzip":
                body = _gunzip(body, ingest.max_bytes)
            batch = decode_request(body, kind, json_safe=True)
        except _PayloadTooLarge:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"decompressed body exceeds {ingest.max_bytes} bytes") from None
        except MalformedPayload as exc:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, str(exc)[:1000]) from None
        if batch.spans:
            ingest.write(batch.spans)
        if batch.rejected:
            logger.info("cmbagent-otel ingest: rejected %d span(s): %s", batch.rejected, batch.error_message)
        self._reply(HTTPStatus.OK, encode_response(kind, batch.rejected, batch.error_message), _MIME[kind])

    def _read_body(self, limit: int) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked":
            return self._read_chunked(limit)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        try:
            length = int(raw)
        except ValueError:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
        if length < 0:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        if length > limit:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "truncated chunk")
            parts.append(chunk)
            self.rfile.readline(1024)


# --- CLI ---------------------------------------------------------------------------------
def add_ingest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``ingest`` subcommand on an argparse ``subparsers`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        help="run an OTLP/HTTP receiver that writes spans into the DAG database",
        description="Receive OTLP/HTTP traces (POST /v1/traces, protobuf or JSON, optionally gzip) "
        "and store them in the cmbagent DAG database.",
    )
    # SUPPRESS: a default here would overwrite the top-level ``cmbagent-otel --db URL``.
    configure_parser(parser, db_default=argparse.SUPPRESS)
    parser.set_defaults(func=run_ingest)
    return parser


def configure_parser(parser: argparse.ArgumentParser, *, db_default: Any = None) -> None:
    """Add the ingest options to ``parser``."""
    parser.add_argument("--db", dest="db", metavar="URL", default=db_default,
                        help="database URL (default: CMBAGENT_OTEL_DATABASE_URL or the default SQLite file)")
    parser.add_argument("--host", default=None, help=f"bind address (default: ${ENV_HOST} or {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"port (default: ${ENV_PORT} or {DEFAULT_PORT})")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer <token>' (default: ${ENV_TOKEN}; prefer the env var, "
                        "command lines are visible to other users)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help=f"request size limit in bytes, compressed and decompressed (default: {DEFAULT_MAX_BYTES})")


def run_ingest(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit code."""
    import sys

    from .dag.database import BadDatabaseURL, redacted, resolve_url

    db = getattr(args, "db", None)
    try:
        target = redacted(resolve_url(db))
        server = IngestServer(db, host=args.host, port=args.port, token=args.token, max_bytes=args.max_bytes)
        server.bind()
    except (BadDatabaseURL, ValueError) as exc:
        print(f"cmbagent-otel ingest: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cmbagent-otel ingest: error: cannot listen on {args.host or DEFAULT_HOST}:{args.port}: {exc}",
              file=sys.stderr)
        return 2
    if server.host not in ("127.0.0.1", "::1", "localhost") and server._token is None:
        logger.warning("cmbagent-otel ingest: listening on %s without a token; set %s", server.host, ENV_TOKEN)
    print(f"cmbagent-otel ingest: listening on {server.endpoint} -> {target}"
          f"{' (bearer token required)' if server._token else ''}", flush=True)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd, server._httpd = server._httpd, None
        if httpd is not None:
            httpd.server_close()
    print(f"cmbagent-otel ingest: stopped after {server.spans_written} span(s)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmbagent_otel.ingest``: the ``ingest`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="cmbagent-otel ingest")
    configure_parser(parser)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return run_ingest(parser.parse_args(argv))


def _register_cli() -> None:
    try:
        from .cli import subcommand
    except ImportError:  # the CLI module is optional for library use
        return
    subcommand("ingest")(add_ingest_parser)


_register_cli()

if __name__ == "__main__":
    raise SystemExit(main())
