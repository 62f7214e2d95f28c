"""OTLP/HTTP trace receiver of ``cmbagent-otel ingest``: a minimal ASGI app served by uvicorn.

uvicorn (with h11) does the HTTP work: request parsing, Content-Length and chunked
transfer coding (an invalid chunk size or length is a 400 from h11, never a read past the
body), keep-alive, and back-pressure (it stops reading a connection while the app has not
taken the last 64 KiB). The app only handles ``POST /v1/traces`` (and ``GET /health``):
it reads the body with a size bound and a deadline, reserving memory as the bytes arrive,
and hands it to a worker thread to decode and store.

Slow clients cannot hold the server: a connection must complete its request headers
within the request timeout (:func:`protocol_class`, else it is closed), the body must
arrive within the same timeout plus one second per ``min_rate`` bytes received (else 408),
one client address may have at most ``max_per_client`` requests in flight (else 503) and
eight times that many connections open (else the connection is closed at once), and a
body waiting to arrive reserves only the memory of what has arrived, never its declared
length. :meth:`OtlpHttpApp.begin_shutdown` answers every request still arriving at once
(503, retry later), so stopping the server waits only for requests being written.

A request turned away before its body was read (401, 413, 415, 503...) is answered at
once, then the rest of its body is read and discarded (up to twice the size limit, for at
most ``drain_timeout`` seconds) before the connection closes: closing with unread data
makes the kernel send a reset that can destroy the response before the client reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
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


def protocol_class(header_timeout: float, max_connections_per_client: int,
                   max_connections: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for request headers and a cap of connections per
    client address (uvicorn itself waits for headers forever, and counts only connections in all).

    ``max_connections`` (uvicorn's ``limit_concurrency``): a connection arriving when that many
    are open closes the one that has waited longest for request headers (idle keep-alive or
    slow), so clients with many addresses holding connections open without a request cannot
    keep everyone else at uvicorn's 503 until the header deadline; requests being read or
    answered are never closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # only the event loop's thread touches these
    connections: dict[str, int] = {}  # per client address
    waiting: OrderedDict[Any, None] = OrderedDict()  # connections waiting for request headers, oldest first
    evicting: set[Any] = set()  # closed for a newcomer, not lost yet

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _peer: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else ""
            self._peer = peer
            connections[peer] = connections.get(peer, 0) + 1
            if connections[peer] > max_connections_per_client:
                transport.close()
                return
            self._arm_header_timer()
            if max_connections is not None:
                while len(self.connections) - len(evicting) >= max_connections and self._evict_oldest():
                    pass

        def _evict_oldest(self) -> bool:
            for other in waiting:
                if other is not self:
                    del waiting[other]
                    other._cancel_header_timer()
                    evicting.add(other)
                    other.transport.close()
                    return True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            evicting.discard(self)
            self._cancel_header_timer()
            if self._peer is not None:
                count = connections.pop(self._peer) - 1
                if count:
                    connections[self._peer] = count
                self._peer = None
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._request_in_progress():
                self._cancel_header_timer()  # the app's body deadline applies from here

        def on_response_complete(self) -> None:
            self._arm_header_timer()  # before uvicorn looks at pipelined requests
            super().on_response_complete()

        def _request_in_progress(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_overdue)
            waiting[self] = None

        def _cancel_header_timer(self) -> None:
            waiting.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if not self._request_in_progress() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class OtlpHttpApp:
    """The ASGI application. ``max_requests`` bounds the requests handled at once (503
    with ``Retry-After`` beyond); a body must arrive within ``body_timeout`` seconds plus one
    per ``min_rate`` bytes received (else 408)."""

    def __init__(self, core: IngestCore, executor: Executor, *, max_requests: int,
                 body_timeout: float = 30.0, min_rate: int = 16384, drain_timeout: float = 2.0) -> None:
        self.core = core
        self.executor = executor
        self.max_requests = max_requests
        self.body_timeout = body_timeout
        self.min_rate = min_rate
        self.drain_timeout = drain_timeout
        self.active = 0
        self.no_thread = 0  # requests answered 503 because no worker thread could be started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Future[None] | None = None

    def begin_shutdown(self) -> None:
        """From any thread: answer every request still arriving now (503, ``Connection: close``)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(self._set_closing)

    def _set_closing(self) -> None:
        closing = self._closing_future()
        if not closing.done():
            closing.set_result(None)

    def _closing_future(self) -> asyncio.Future[None]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    @property
    def closing(self) -> bool:
        return self._closing is not None and self._closing.done()

    async def _receive(self, receive: Receive, timeout: float) -> dict[str, Any]:
        """The next ASGI message; ``_Reject`` at the deadline or when the server stops."""
        if timeout <= 0:
            raise _Reject(HTTPStatus.REQUEST_TIMEOUT, "request body too slow")
        closing = self._closing_future()
        if closing.done():
            raise self._stopping()
        task = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait((task, closing), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        if closing.done():
            raise self._stopping()
        raise _Reject(HTTPStatus.REQUEST_TIMEOUT, "request body too slow")

    def _stopping(self) -> _Reject:
        return _Reject(HTTPStatus.SERVICE_UNAVAILABLE, "ingest is stopping, retry later",
                       [(b"retry-after", str(self.core.retry_after).encode())])

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
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
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful shutdown times out
            # (a database write that outlasts it): answer if we can, never a traceback.
            if not state["started"]:
                with contextlib.suppress(BaseException):
                    await self._respond(send, state, HTTPStatus.SERVICE_UNAVAILABLE,
                                        _status_body(kind, 14, "ingest is stopping, retry later"), _MIME[kind],
                                        [(b"connection", b"close")])
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
            health = {"status": "ok", "in_flight": self.core.requests, "memory_reserved": self.core.admission.used,
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
        if self.closing:
            raise self._stopping()
        if self.active >= self.max_requests or core.pending >= core.max_pending:
            raise self._busy("too many requests in flight")
        client = scope["client"][0] if scope.get("client") else ""
        if not core.open(client):
            raise self._busy(f"{core.max_per_client} requests from {client or 'this client'} in flight")
        self.active += 1
        ticket = core.admission.ticket()
        try:
            factor = core.factor(kind)
            if declared is not None:
                try:
                    ticket.check(declared * factor)  # reserved as the bytes arrive, never up front
                except IngestError as err:
                    raise self._from_error(err) from None
            body = await self._read_body(receive, ticket, factor, state)
            if not core.enter():
                raise self._busy("too many requests in flight")
            gone = threading.Event()
            watch = asyncio.ensure_future(self._watch(receive, gone))
            try:
                loop = asyncio.get_running_loop()
                try:
                    work = loop.run_in_executor(self.executor, core.process, body, kind,
                                                "gzip" if encoding == "gzip" else None, ticket, time.monotonic(),
                                                gone.is_set)
                except RuntimeError:
                    # submit() could not start a worker thread (a pids or memory limit) or the pool is shut
                    # down: nothing was stored, the client keeps the spans (a 500 made OTLP clients drop them)
                    self.no_thread += 1
                    logger.log(logging.WARNING if self.no_thread == 1 else logging.DEBUG,
                               "cmbagent-otel ingest: no thread could be started to store a request (%d so far); "
                               "answered 503, the client retries", self.no_thread, exc_info=True)
                    raise self._busy("no thread free to store it") from None
                outcome = await work
            except IngestError as err:
                raise self._from_error(err) from None
            finally:
                watch.cancel()
                core.leave()
            del body
            await self._respond(send, state, HTTPStatus.OK,
                                encode_response(kind, outcome.rejected, outcome.error_message), _MIME[kind])
        finally:
            ticket.close()
            core.close(client)
            self.active -= 1

    @staticmethod
    async def _watch(receive: Receive, gone: threading.Event) -> None:
        """Set ``gone`` when the client disconnects while its request is written (the body has been read:
        uvicorn's next message is the disconnect): the worker then writes no more of it."""
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

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

    async def _read_body(self, receive: Receive, ticket: Any, factor: int, state: dict[str, bool]) -> bytes:
        loop = asyncio.get_running_loop()
        start = loop.time()
        parts: list[bytes] = []
        size = 0
        limit = self.core.max_bytes
        while True:
            deadline = start + self.body_timeout + size / self.min_rate
            message = await self._receive(receive, deadline - loop.time())
            if message["type"] == "http.disconnect":
                state["body_read"] = True
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds {limit} bytes")
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
        if pending or self.closing:
            extra.append((b"connection", b"close"))
        if not pending or self.closing or headers.get("expect", "").lower() == "100-continue":
            # nothing to read, a server stopping (no time to read the rest), or a client
            # waiting for "100 Continue" that will not send it
            await self._respond(send, state, err.status, body, _MIME[kind], extra)
            return
        await self._respond(send, state, err.status, body, _MIME[kind], extra, more=True)
        await self._drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self, receive: Receive) -> None:
        """Read and discard the rest of a rejected body, bounded in bytes and time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        left = 2 * self.core.max_bytes
        while left > 0:
            try:
                message = await self._receive(receive, deadline - loop.time())
            except _Reject:
                return
            if message["type"] == "http.disconnect":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
