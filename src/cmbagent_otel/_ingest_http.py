"""OTLP/HTTP trace receiver of ``cmbagent-otel ingest``: a minimal ASGI app served by uvicorn.

uvicorn (with h11) does the HTTP work: request parsing, Content-Length and chunked
transfer coding (an invalid chunk size or length is a 400 from h11, never a read past the
body), keep-alive, and back-pressure (it stops reading a connection while the app has not
taken the last 64 KiB). The app only handles ``POST /v1/traces`` (and ``GET /health``):
it reserves the request's memory before reading the body, reads it with a size bound and
an idle timeout, and hands it to a worker thread to decode and store.

A request turned away before its body was read (401, 413, 415, 503...) is answered at
once, then the rest of its body is read and discarded (up to twice the size limit, with an
idle timeout) before the connection closes: closing with unread data makes the kernel send
a reset that can destroy the response before the client reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from ._ingest_core import IngestCore, IngestError
from .otlp_decode import encode_response

logger = logging.getLogger("cmbagent_otel.ingest")

TRACES_PATH = "/v1/traces"
HEALTH_PATHS = ("/", "/health", "/healthz")
_CONTENT_TYPES = {
    "application/x-protobuf": "protobuf",
    "application/protobuf": "protobuf",
    "application/json": "json",
}
_MIME = {"protobuf": b"application/x-protobuf", "json": b"application/json"}
_STATUS = {
    "invalid": HTTPStatus.BAD_REQUEST,
    "too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
    "unauthenticated": HTTPStatus.UNAUTHORIZED,
}
# google.rpc.Code values for the Status body of error responses
_RPC_CODE = {
    HTTPStatus.BAD_REQUEST: 3,  # INVALID_ARGUMENT
    HTTPStatus.UNAUTHORIZED: 16,  # UNAUTHENTICATED
    HTTPStatus.NOT_FOUND: 5,
    HTTPStatus.METHOD_NOT_ALLOWED: 12,
    HTTPStatus.REQUEST_TIMEOUT: 4,  # DEADLINE_EXCEEDED
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: 8,  # RESOURCE_EXHAUSTED
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: 3,
    HTTPStatus.INTERNAL_SERVER_ERROR: 13,
    HTTPStatus.SERVICE_UNAVAILABLE: 14,  # UNAVAILABLE
}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _status_body(kind: str, code: int, message: str) -> bytes:
    # OTLP/HTTP: error responses carry a google.rpc.Status in the request's encoding.
    if kind == "protobuf":
        from google.rpc import status_pb2

        return status_pb2.Status(code=code, message=message).SerializeToString()
    return json.dumps({"code": code, "message": message}).encode()


class _Reject(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _Disconnected(Exception):
    pass


class OtlpHttpApp:
    """The ASGI application. ``max_requests`` bounds the requests handled at once (503
    with ``Retry-After`` beyond); ``body_timeout`` is how long a body may stall."""

    def __init__(self, core: IngestCore, executor: ThreadPoolExecutor, *, max_requests: int,
                 body_timeout: float = 30.0, drain_timeout: float = 2.0) -> None:
        self.core = core
        self.executor = executor
        self.max_requests = max_requests
        self.body_timeout = body_timeout
        self.drain_timeout = drain_timeout
        self.active = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        kind = _CONTENT_TYPES.get(ctype, "json")
        state = {"body_read": False, "started": False}
        try:
            await self._handle(scope, headers, ctype, kind, receive, send, state)
        except _Reject as err:
            await self._reject(err, kind, headers, receive, send, state)
        except _Disconnected:
            self.core.count("disconnects")
            client = scope.get("client")
            logger.debug("cmbagent-otel ingest: client %s disconnected before its request was read",
                         f"{client[0]}:{client[1]}" if client else "?")
        except Exception:
            logger.exception("cmbagent-otel ingest: unexpected error (HTTP)")
            if not state["started"]:
                err = _Reject(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
                await self._reject(err, kind, headers, receive, send, state)

    async def _handle(self, scope: dict[str, Any], headers: dict[str, str], ctype: str, kind: str,
                      receive: Receive, send: Send, state: dict[str, bool]) -> None:
        method, path = scope["method"], scope["path"]
        if path in HEALTH_PATHS and method in ("GET", "HEAD"):
            state["body_read"] = True
            health = {"status": "ok", "in_flight": self.core.pending, "memory_reserved": self.core.admission.used,
                      "spans_written": self.core.spans_written}
            await self._respond(send, state, HTTPStatus.OK, json.dumps(health).encode(), b"application/json")
            return
        if path != TRACES_PATH:
            raise _Reject(HTTPStatus.NOT_FOUND, f"only POST {TRACES_PATH} is served")
        if method != "POST":
            raise _Reject(HTTPStatus.METHOD_NOT_ALLOWED, f"only POST {TRACES_PATH} is served",
                          [(b"allow", b"POST")])
        core = self.core
        if not core.authorized(headers.get("authorization")):
            raise _Reject(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token",
                          [(b"www-authenticate", b'Bearer realm="cmbagent-otel"')])
        if ctype not in _CONTENT_TYPES:
            raise _Reject(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Type {ctype or '(none)'!r}; "
                          "use application/x-protobuf or application/json")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise _Reject(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        declared = int(headers["content-length"]) if "content-length" in headers else None  # h11 checked it
        if declared is not None and declared > core.max_bytes:
            raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds {core.max_bytes} bytes")
        if self.active >= self.max_requests or not core.enter():
            raise self._busy("too many requests in flight")
        self.active += 1
        ticket = core.admission.ticket()
        try:
            factor = core.factor(kind)
            if declared is not None:
                self._reserve(ticket, declared * factor)
            body = await self._read_body(receive, ticket, factor, declared is None, state)
            loop = asyncio.get_running_loop()
            try:
                outcome = await loop.run_in_executor(self.executor, core.process, body, kind,
                                                     encoding == "gzip", ticket)
            except IngestError as err:
                raise self._from_error(err) from None
            del body
            await self._respond(send, state, HTTPStatus.OK,
                                encode_response(kind, outcome.rejected, outcome.error_message), _MIME[kind])
        finally:
            ticket.close()
            core.leave()
            self.active -= 1

    def _busy(self, why: str) -> _Reject:
        return _Reject(HTTPStatus.SERVICE_UNAVAILABLE, f"ingest is busy ({why}), retry later",
                       [(b"retry-after", str(self.core.retry_after).encode())])

    def _from_error(self, err: IngestError) -> _Reject:
        status = _STATUS.get(err.kind, HTTPStatus.INTERNAL_SERVER_ERROR)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            return _Reject(status, err.message, [(b"retry-after", str(self.core.retry_after).encode())])
        return _Reject(status, err.message)

    def _reserve(self, ticket: Any, total: int) -> None:
        try:
            ticket.hold(total)
        except IngestError as err:
            raise self._from_error(err) from None

    async def _read_body(self, receive: Receive, ticket: Any, factor: int, incremental: bool,
                         state: dict[str, bool]) -> bytes:
        parts: list[bytes] = []
        size = 0
        limit = self.core.max_bytes
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise _Reject(HTTPStatus.REQUEST_TIMEOUT, f"no body data for {self.body_timeout:g}s") from None
            if message["type"] == "http.disconnect":
                state["body_read"] = True
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds {limit} bytes")
            if incremental:
                self._reserve(ticket, size * factor)
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                state["body_read"] = True
                return b"".join(parts)

    async def _respond(self, send: Send, state: dict[str, bool], status: HTTPStatus, body: bytes,
                       content_type: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                       more: bool = False) -> None:
        state["started"] = True
        await send({"type": "http.response.start", "status": int(status), "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _reject(self, err: _Reject, kind: str, headers: dict[str, str], receive: Receive, send: Send,
                      state: dict[str, bool]) -> None:
        if state["started"]:
            return
        body = _status_body(kind, _RPC_CODE.get(err.status, 2), err.message)
        extra = list(err.headers)
        pending = not state["body_read"] and ("content-length" in headers or "transfer-encoding" in headers)
        if pending:
            extra.append((b"connection", b"close"))
        if not pending or headers.get("expect", "").lower() == "100-continue":
            # nothing to read, or a client waiting for "100 Continue" that will not send it
            await self._respond(send, state, err.status, body, _MIME[kind], extra)
            return
        await self._respond(send, state, err.status, body, _MIME[kind], extra, more=True)
        await self._drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self, receive: Receive) -> None:
        """Read and discard the rest of a rejected body, bounded in bytes and idle time."""
        left = 2 * self.core.max_bytes
        while left > 0:
            try:
                message = await asyncio.wait_for(receive(), self.drain_timeout)
            except asyncio.TimeoutError:
                return
            if message["type"] == "http.disconnect":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
