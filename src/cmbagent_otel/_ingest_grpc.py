"""OTLP/gRPC trace receiver of ``cmbagent-otel ingest``, on grpcio's server.

grpcio does the transport work: HTTP/2, a cap on concurrent RPCs (RESOURCE_EXHAUSTED
beyond it) and ``grpc.max_receive_message_length`` (on the message as sent). The service takes
the raw request bytes (no deserializer), still compressed when the client compressed them:
they are inflated in a worker, bounded by the size limit and reserved from the memory budget
as they grow (see :func:`message_encoding`), and decoded by the same bounded walk the HTTP
receiver uses.

grpcio's synchronous server gives each RPC a thread that waits for the request message
without any limit of time, so a client that opens a call and never finishes its message
would hold that thread (and a place) for ever. The method is therefore served as
client-streaming (the same bytes on the wire; an OTLP client sends one message): the
handler starts at once, a watchdog cancels a call whose message has not arrived within the
request timeout, one client address may have only so many calls in flight, and decoding
takes one of ``workers`` places only once the message is complete.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ._ingest_core import IngestCore, IngestError
from ._ingest_pool import CallPool, join_pool, seconds_left
from .otlp_decode import encode_response

logger = logging.getLogger("cmbagent_otel.ingest")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
IDLE_CONNECTION_MS = 5 * 60 * 1000

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}


def _retry_info(seconds: int) -> bytes:
    from google.protobuf.duration_pb2 import Duration
    from google.rpc.error_details_pb2 import RetryInfo

    return RetryInfo(retry_delay=Duration(seconds=seconds)).SerializeToString()


def client_address(peer: str | None) -> str:
    """The address part of a grpcio peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``)."""
    if not peer:
        return ""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def message_encoding(message: bytes) -> str | None:
    """How a request message grpcio handed over still compressed is packed: ``"gzip"``, ``"deflate"`` (a
    zlib header; a protobuf message may begin the same way, see :meth:`IngestCore.process`) or ``None``.

    grpcio's own decompression (``grpc.per_message_decompression``, off here) inflates every call's message
    in full (up to ``grpc.max_receive_message_length``) the moment it arrives, before the service sees it,
    and outside the memory budget: 64 calls of 16 KiB each took the server to 770 MB. Inflated here, in a
    worker, it is bounded and reserved as the HTTP receiver's gzip bodies are. grpcio says nothing of the
    call's ``grpc-encoding`` or the message's compressed flag then; the bytes tell: a gzip member begins
    ``1f 8b`` (a protobuf message never does: wire type 7), a zlib stream with its two-byte header."""
    if message[:2] == b"\x1f\x8b":
        return "gzip"
    if len(message) >= 2 and message[0] & 0x0F == 8 and message[0] >> 4 <= 7 and not message[1] & 0x20 \
            and int.from_bytes(message[:2], "big") % 31 == 0:
        return "deflate"
    return None


class Watchdog:
    """Runs a callback at a deadline unless it is cancelled first: one thread for every call."""

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []  # [deadline, key, callback or None once cancelled]
        self._entries: dict[int, list[Any]] = {}
        self._ids = itertools.count()
        # a plain lock under the condition, taken by stop() as ``with self._lock``: its __enter__ is C code,
        # where Condition's is Python, and an interrupt landing as that returned (a stop from the main thread,
        # a signal handler's KeyboardInterrupt) left the reentrant lock held: the thread never woke, left
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, delay: float, callback: Callable[[], Any]) -> int:
        with self._cond:
            key = next(self._ids)
            entry = [time.monotonic() + delay, key, callback]
            heapq.heappush(self._heap, entry)
            self._entries[key] = entry
            if self._thread is None and not self._stopped:
                thread = threading.Thread(target=self._run, name="cmbagent-otel-ingest-grpc-watchdog", daemon=True)
                try:
                    thread.start()
                    self._thread = thread
                except RuntimeError:
                    # no thread can start now (a pids or memory limit): the call is served, its deadline
                    # kept for the next schedule() to start the thread; set before start(), the dead thread
                    # stopped every later one (no deadline enforced for the server's life) and the error
                    # failed the call
                    logger.debug("cmbagent_otel: gRPC deadline watchdog not started", exc_info=True)
            self._cond.notify()
            return key

    def cancel(self, key: int) -> None:
        with self._cond:
            entry = self._entries.pop(key, None)
            if entry is not None:
                entry[2] = None  # the call (and what it holds) is not kept until its deadline
                # a cancelled entry waits in the heap for its deadline: under steady load, one per call
                # of the last `timeout` seconds (30 s by default); dropped once they are most of it
                if len(self._heap) > 64 and len(self._heap) > 2 * len(self._entries):
                    self._heap = [e for e in self._heap if e[2] is not None]
                    heapq.heapify(self._heap)

    def stop(self, timeout: float | None = None) -> None:
        """End the thread, waiting for it at most ``timeout`` seconds (a callback running: a call's cancel)."""
        with self._lock:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, key, callback = heapq.heappop(self._heap)
                self._entries.pop(key, None)
            if callback is None:
                continue
            try:
                callback()
            except Exception:  # a call that already ended
                logger.debug("cmbagent-otel ingest: cancelling an overdue gRPC call failed", exc_info=True)


class TraceService:
    """``TraceService/Export`` over raw bytes."""

    def __init__(self, core: IngestCore, *, timeout: float, workers: int, watchdog: Watchdog,
                 max_waiting: int | None = None) -> None:
        self.core = core
        self.timeout = timeout
        self._workers = threading.BoundedSemaphore(workers)
        self._watchdog = watchdog
        # calls waiting for their message, oldest first; a call arriving when there are
        # ``max_waiting`` cancels the oldest, so calls that never send (from many addresses,
        # each under its own cap) cannot fill grpcio's maximum_concurrent_rpcs until the deadline
        self.max_waiting = max_waiting
        self._waiting: dict[grpc.ServicerContext, None] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def cancel_waiting(self) -> None:
        """Cancel every call still waiting for its message, and those that come later (stop)."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
        for context in waiting:
            context.cancel()

    def export(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        core = self.core
        metadata = dict(context.invocation_metadata() or ())
        if not core.authorized(metadata.get("authorization")):
            self._abort(context, IngestError("unauthenticated", "missing or invalid bearer token"))
        client = client_address(context.peer())
        if not core.open(client):
            self._abort(context, IngestError(
                "unavailable", f"ingest is busy ({core.max_per_client} requests from {client or 'this client'} "
                "in flight), retry later"))
        try:
            request = self._receive(requests, context)
            if request is None:
                if context.is_active():  # reached the service once the stop had begun: sent again later
                    self._abort(context, IngestError("unavailable", "ingest is stopping, retry later"))
                return b""  # the call was cancelled (by the client, the watchdog or stop): nobody reads this
            if not core.enter():
                self._abort(context, IngestError("unavailable", "ingest is busy (too many requests in flight)"))
            admitted = time.monotonic()
            try:
                # a call whose client deadline passes while every worker is busy is not stored: its client
                # was told DEADLINE_EXCEEDED and sends the batch again (stored twice) or counts it lost
                if not self._workers.acquire(timeout=min(context.time_remaining(), threading.TIMEOUT_MAX)):
                    self._expired(context)
                try:
                    if not context.is_active() or context.time_remaining() <= 0:
                        self._expired(context)
                    return self._process(request, context, admitted)
                finally:
                    self._workers.release()
            finally:
                core.leave()
        finally:
            core.close(client)

    def _receive(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        """The request message, or None when the call ends without one within the timeout."""
        oldest = None
        with self._lock:
            if self._stopping:
                return None
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
            self._waiting[context] = None
        if oldest is not None:
            oldest.cancel()
        key = self._watchdog.schedule(self.timeout, context.cancel)
        try:
            return next(requests, b"")  # no message at all: an empty request, as for a unary call
        except grpc.RpcError:
            return None
        finally:
            self._watchdog.cancel(key)
            with self._lock:
                self._waiting.pop(context, None)

    def _process(self, request: bytes, context: grpc.ServicerContext, admitted: float) -> bytes:
        core = self.core
        ticket = core.admission.ticket()
        try:
            ticket.hold(len(request) * core.factor("protobuf"))
            outcome = core.process(request, "protobuf", message_encoding(request), ticket, admitted,
                                   lambda: not context.is_active())
        except IngestError as err:
            self._abort(context, err)
        except Exception:
            logger.exception("cmbagent-otel ingest: unexpected error (gRPC)")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            ticket.close()
        return encode_response("protobuf", outcome.rejected, outcome.error_message)

    def _expired(self, context: grpc.ServicerContext) -> None:
        self.core.count("expired_calls")
        logger.debug("cmbagent-otel ingest: a gRPC call's deadline passed before a worker was free; not stored")
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for a worker")

    def _abort(self, context: grpc.ServicerContext, err: IngestError) -> None:
        if err.kind == "unavailable":
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", _retry_info(self.core.retry_after)),))
        context.abort(_CODES.get(err.kind, grpc.StatusCode.UNKNOWN), err.message)


class GrpcReceiver:
    """A grpcio server bound to ``host:port`` serving :class:`TraceService`: ``max_concurrent``
    calls at once (each a thread while its message arrives, at most ``timeout`` seconds),
    ``workers`` of them decoding and writing."""

    def __init__(self, core: IngestCore, host: str, port: int, *, workers: int, max_concurrent: int,
                 timeout: float = 30.0) -> None:
        self._settings = (core, host, port, workers, max_concurrent, timeout)
        self._watchdog = Watchdog()
        self._pool: CallPool | None = None
        self._server: Any = None
        self._service: TraceService | None = None
        self.port: int | None = None
        self._started = False
        self._stopped: threading.Event | None = None

    def bind(self) -> GrpcReceiver:
        """Make grpcio's server and bind the port (``OSError`` when it is taken). Apart from the
        constructor, so the caller holds the receiver before it holds a socket: an interrupt as this
        returns leaves the server where :meth:`begin_stop` finds it."""
        core, host, port, workers, max_concurrent, timeout = self._settings
        # grpcio never shuts down the pool it is given: its threads outlived the server (idle, for the
        # life of the process) unless stop() does it. A call no thread can take waits in its queue
        self._pool = CallPool(max_concurrent, "cmbagent-otel-ingest-grpc")
        self._server = grpc.server(
            self._pool,
            maximum_concurrent_rpcs=max_concurrent,
            options=[
                ("grpc.max_receive_message_length", core.max_bytes),  # compressed: inflated in a worker
                ("grpc.per_message_decompression", 0),  # see message_encoding
                ("grpc.max_send_message_length", 1 << 20),
                ("grpc.so_reuseport", 0),  # a second ingest on the same port must fail, not share it
                # a connection that never completes its HTTP/2 handshake is dropped
                ("grpc.server_handshake_timeout_ms", max(1, int(timeout * 1000))),
                # a client multiplexing more calls on one connection than it may have in flight
                # waits for a stream (HTTP/2 flow control) instead of being turned away
                ("grpc.max_concurrent_streams", core.max_per_client),
                # idle connections are closed (GOAWAY; clients reconnect when they next export)
                ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ],
        )
        # room is kept for the calls being decoded and written, and for newcomers
        service = TraceService(core, timeout=timeout, workers=workers, watchdog=self._watchdog,
                               max_waiting=max(1, max_concurrent - 2 * workers - 1))
        self._service = service
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Export": grpc.stream_unary_rpc_method_handler(service.export)})
        self._server.add_generic_rpc_handlers((handler,))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio reports a port in use this way
            raise OSError(errno.EADDRINUSE, f"cannot listen on {address} (OTLP/gRPC): {exc}") from None
        return self

    def start(self) -> None:
        if not self._started:
            self._server.start()
            self._started = True

    def begin_stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, cancel those still waiting for their message at once, and
        give those being written ``grace`` seconds (without waiting: see :meth:`finish_stop`)."""
        if self._server is not None:
            if not self._started:
                # grpcio closes its listening sockets only when a started server stops: one bound and
                # stopped unstarted kept its port (and descriptor) for the life of the process, even
                # once collected. Started and stopped at once, its port is free; a client connecting
                # meanwhile is refused by the stop as any other
                # ValueError "Cannot start already-started server!": an interrupt cut grpcio's start short
                # after it had started the server (its _serve thread, its port): the stop below ends it
                with contextlib.suppress(ValueError):
                    self.start()
            try:
                self._stopped = self._server.stop(grace)
            except RuntimeError:
                # grpcio's grace is a thread of its own, and none can start: at interpreter exit (Python
                # 3.12+: "can't create new thread at interpreter shutdown") or at a pids limit. The grace
                # is given here instead, in this thread: grpcio has begun its shutdown (no call accepted any
                # more) before it failed to start the thread; the calls waiting for their message are
                # cancelled, those being written are waited for until answered (grpcio's termination), then
                # the rest cancelled. Cancelled at once, a call being written at exit was refused
                # (UNAVAILABLE "Cancelling all calls") though its spans were stored
                if self._service is not None and grace:
                    self._service.cancel_waiting()
                    self._server.wait_for_termination(grace)
                self._stopped = self._server.stop(None)
        if self._service is not None:
            self._service.cancel_waiting()

    def finish_stop(self, timeout: float | None) -> bool:
        """Wait at most ``timeout`` seconds in all for grpcio's stop (its grace), the deadline
        watchdog and the call threads; whether all of them ended in time."""
        end = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if end is None else seconds_left(end)

        stopped = self._stopped
        done = stopped is None or stopped.wait(left())
        self._watchdog.stop(left())
        return (self._pool is None or join_pool(self._pool, left)) and done

    def stop(self, grace: float | None = 5.0, timeout: float | None = None) -> bool:
        """:meth:`begin_stop` then :meth:`finish_stop`."""
        self.begin_stop(grace)
        return self.finish_stop(timeout)

