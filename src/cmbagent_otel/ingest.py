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

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _forksafe
from . import environment_variables as env
from ._ingest_core import IngestCore, SpanWriter
from ._ingest_pool import CallPool, join_pool, seconds_left
from .otlp_decode import Limits

logger = logging.getLogger("cmbagent_otel.ingest")

__all__ = ["IngestServer", "SpanWriter"]

DEFAULT_RETRY_AFTER = 5
MAX_HTTP_REQUESTS = 64  # HTTP requests handled at once (rejections included); more get 503 + Retry-After
MAX_GRPC_REQUESTS = 64  # gRPC calls at once, each a thread while its message arrives; more get RESOURCE_EXHAUSTED
CONNECTIONS_PER_CLIENT_REQUEST = 8  # HTTP connections one address may hold per request it may have in flight
MAX_CONNECTIONS = 1024  # uvicorn's own cap (a plain 503): idle keep-alive connections are cheap
GRACE_S = 5.0  # seconds uvicorn and grpcio (side by side) give requests being written when the server stops
# Seconds a stop waits in all (the graces, then the call threads): a write waits at most WRITE_WAIT (3 s)
# for the database, so past GRACE_S only a request whose database statement itself hangs is still there.
STOP_WAIT_S = 3 * GRACE_S
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
    ``max_requests_per_client`` the requests one client address may have in flight. A request holding more
    than ``request_spans`` spans is answered 503/UNAVAILABLE with a retry delay once that many are written (a
    worker is not held for minutes by one client), its progress kept by the body's digest: the client's retry
    of the same body continues after the spans stored.
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
        request_spans: int | None = None,
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
        spans_at_once = int(env.get(env.INGEST_REQUEST_SPANS, request_spans))
        if min(self.max_bytes, budget, self.workers, self.request_timeout, self.min_rate, per_client,
               spans_at_once) <= 0:
            raise ValueError("max_bytes, max_inflight_bytes, workers, request_timeout, min_rate, "
                             "max_requests_per_client and request_spans must be positive")
        self.core = IngestCore(db_url=db_url, token=token or None, max_bytes=self.max_bytes, budget=budget,
                               retry_after=retry_after, limits=limits or Limits.default(), writer=writer,
                               writer_factory=writer_factory, max_pending=2 * self.workers,
                               max_per_client=per_client, request_spans=spans_at_once)
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread in start(), bind() or stop() (holding _lock)
        self._stop_requested = False  # stop() from a signal handler inside that thread's start()
        self._serving = False
        self._wakers: set[_Waker] = set()  # serve_forever()s asleep in the main thread
        self._sock: socket.socket | None = None
        self._uvicorn: Any = None
        self._app: Any = None
        self._http_thread: threading.Thread | None = None
        self._executor: CallPool | None = None
        self._grpc: Any = None
        self._http_port: int | None = None
        self._bound = False
        self._stopped = threading.Event()
        self._stopped.set()
        _forksafe.reset_in_child(self, "_lock")  # a child forked while a start or stop held it

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
        return self._grpc.port if self._grpc is not None else None  # None while it binds

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
    # Every method below takes ``_lock`` (one start, bind or stop at a time), and records which thread
    # holds it: a signal handler calling stop() runs in the thread it interrupted, and when that thread
    # is in start() or stop() waiting for the lock would wait for itself for ever (a non-reentrant lock;
    # a reentrant one would tear down a half-made server under start's feet).
    def _held_here(self) -> bool:
        return self._holder == threading.get_ident()

    def _holding(self, work: Callable[[], None]) -> None:
        """Run ``work`` under ``_lock``, this thread recorded as its holder while it runs."""
        me = threading.get_ident()
        with self._lock:
            self._holder = me
            try:
                work()
            finally:
                self._holder = None

    def bind(self) -> IngestServer:
        """Bind the sockets without serving yet (idempotent); raises ``OSError`` when a port is taken
        (nothing is left bound then)."""
        if self._held_here():
            raise RuntimeError("IngestServer.bind() called from a signal handler inside this thread's own "
                               "start() or stop()")
        try:
            self._holding(self._bind_locked)
        except BaseException:
            self.stop()  # an interrupt as the lock is let go, the sockets bound: they are not left bound
            raise
        return self

    def _bind_locked(self) -> None:
        if self._bound:
            return
        try:
            if self.requested_port is not None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                sock = self._sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.host, self.requested_port))
                    sock.listen(256)
                except OSError as exc:
                    address = f"[{self.host}]" if ":" in self.host else self.host
                    raise OSError(exc.errno, f"cannot listen on {address}:{self.requested_port} (OTLP/HTTP): "
                                  f"{exc.strerror}") from None
                self._http_port = sock.getsockname()[1]
            if self.requested_grpc_port is not None:
                from ._ingest_grpc import GrpcReceiver

                receiver = self._grpc = GrpcReceiver(self.core, self.host, self.requested_grpc_port,
                                                     workers=self.workers, max_concurrent=MAX_GRPC_REQUESTS,
                                                     timeout=self.request_timeout)
                receiver.bind()
        except BaseException:
            self._teardown()  # a port in use (or an interrupt) leaves no socket of the other receiver bound
            raise
        self._bound = True

    def start(self) -> IngestServer:
        """Bind and serve in daemon threads (idempotent); returns ``self``. A server can start again
        after :meth:`stop`. When it raises (a port in use: ``OSError``; an interrupt), nothing it made is
        left: no socket, no thread. A :meth:`stop` called meanwhile from a signal handler in this same
        thread takes effect before it returns (the server is then stopped)."""
        if self._held_here():
            raise RuntimeError("IngestServer.start() called from a signal handler inside this thread's own "
                               "start() or stop()")
        try:
            self._holding(self._start_or_teardown)
        except BaseException:
            self.stop()  # an interrupt as the lock is let go, the server made: it is not left serving
            raise
        return self

    def _start_or_teardown(self) -> None:
        self._stop_requested = False
        self.core.stopping.clear()
        try:
            self._start_locked()
        except BaseException:
            self._teardown()
            raise
        if self._stop_requested:  # stop() from a signal handler that interrupted this start
            self._teardown()

    def _start_locked(self) -> None:
        if self._serving:
            return
        self._stopped.clear()
        _stop_at_exit(self)
        self._bind_locked()
        self.core.prepare_soon()
        if self._grpc is not None:
            self._grpc.start()
        if self._sock is not None and self._http_thread is None:
            import uvicorn

            from ._ingest_http import OtlpHttpApp, protocol_class

            _quiet_uvicorn()
            # a request no thread can take now is refused (503), never stored later behind its client's back
            self._executor = CallPool(self.workers, "cmbagent-otel-ingest-http", refuse_without_thread=True)
            app = self._app = OtlpHttpApp(self.core, self._executor, max_requests=MAX_HTTP_REQUESTS,
                                          body_timeout=self.request_timeout, min_rate=self.min_rate)
            http = protocol_class(self.request_timeout, CONNECTIONS_PER_CLIENT_REQUEST * self.core.max_per_client,
                                  MAX_CONNECTIONS)
            config = uvicorn.Config(
                app, http=http, ws="none", lifespan="off", loop="asyncio", interface="asgi3",
                log_config=None, access_log=False, server_header=False, date_header=False,
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, timeout_graceful_shutdown=GRACE_S,
                h11_max_incomplete_event_size=64 * 1024,
            )
            server = self._uvicorn = uvicorn.Server(config)
            # recorded before it starts: a stop (or an interrupt here) finds it and ends it
            thread = self._http_thread = threading.Thread(
                target=server.run, kwargs={"sockets": [self._sock]}, name="cmbagent-otel-ingest-http", daemon=True)
            thread.start()  # the socket already listens: clients queue until uvicorn accepts
        self._serving = True

    def serve_forever(self, signals: Iterable[int] = (), *, started: Callable[[], object] | None = None
                      ) -> int | None:
        """Start, serve until :meth:`stop` is called (from any thread, or from a signal handler of the
        application's) or one of ``signals`` arrives, stop, and return that signal's number (``None``
        after :meth:`stop`). The server is stopped whenever this returns or raises.

        ``signals`` (e.g. ``(signal.SIGTERM, signal.SIGINT)``, the CLI's): handled for the time of the
        call, the previous handlers restored after the server has stopped (a second signal during the
        drain does not cut it short); the main thread only (``ValueError`` elsewhere). ``started`` is
        called once serving (in this thread).

        In the main thread the wait is on a socket set as :func:`signal.set_wakeup_fd`: Linux delivers a
        process-directed signal to any thread (grpcio's, uvicorn's), where Python only notes it, and a
        main thread asleep on a lock never ran the handler (the server served on, the signal ignored).
        The bytes of signals are passed on to a wakeup descriptor set before (an event loop's)."""
        wanted = {int(sig) for sig in signals}
        received: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            received.append(signum)

        previous: dict[int, Any] = {}
        waker = _Waker() if threading.current_thread() is threading.main_thread() else None
        try:
            if waker is not None:
                self._wakers.add(waker)
                waker.arm()
            for sig in wanted:
                previous[sig] = signal.signal(sig, handler)
            self.start()
            if started is not None:
                started()
            if waker is not None:
                waker.wait(lambda: self._stopped.is_set() or bool(received), wanted)
            else:
                self._stopped.wait()
        finally:
            try:
                self.stop()
            finally:
                for sig, old in previous.items():
                    signal.signal(sig, old)
                if waker is not None:
                    self._wakers.discard(waker)
                    waker.close()
        return received[0] if received else None

    def stop(self) -> None:
        """Stop serving and release the sockets, threads and the database connections it made
        (idempotent; from any thread, several at once, before a start; the server may start again).

        Requests still arriving are answered 503 (retry later) at once; requests being
        written finish first with their true answer (each waits at most
        :data:`~cmbagent_otel._ingest_core.WRITE_WAIT` seconds for the database, inside
        uvicorn's and grpcio's :data:`GRACE_S` grace, run side by side); one looking for the spans the
        database refuses is answered 503 at its next piece (its search kept for its client's retry).
        Every wait is bounded: all of them together by :data:`STOP_WAIT_S` (past it the threads left are
        daemons, logged, and the writer is left open for them). A stop called while another thread
        starts or stops the server waits for that first. Called from a signal handler that interrupted
        this thread's own :meth:`start` or :meth:`stop`, it returns at once and that call stops the
        server before it returns. Interrupted (``KeyboardInterrupt``), it still releases everything,
        then raises the interrupt."""
        if self._held_here():
            self.core.stopping.set()
            self._stop_requested = True
            return
        self._holding(self._teardown)

    def _teardown(self) -> None:
        """Release whatever is held (under ``_lock``), every step run even when one fails or is
        interrupted; the first interrupt is raised at the end, an error only logged. An interrupt in
        the bookkeeping around the steps runs them all again (each is idempotent): none is skipped."""
        try:
            self._release()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        end = time.monotonic() + STOP_WAIT_S

        def left() -> float:
            return seconds_left(end)

        server, app, thread = self._uvicorn, self._app, self._http_thread
        executor, grpc_receiver, sock = self._executor, self._grpc, self._sock
        ended: list[bool] = []
        # core.stopping first, before the receivers wait for the requests being written; a step of the
        # teardown, not set before it: an interrupt there left a serving server cutting its searches short
        steps: list[Callable[[], object]] = [self.core.stopping.set]
        if app is not None:
            steps.append(app.begin_shutdown)
        if server is not None:
            steps.append(lambda: setattr(server, "should_exit", True))
        if grpc_receiver is not None:  # its grace runs beside uvicorn's
            steps.append(lambda: grpc_receiver.begin_stop(GRACE_S))
        if thread is not None:
            steps.append(lambda: ended.append(_join(thread, left())))
        if sock is not None:
            steps.append(sock.close)
        if grpc_receiver is not None:
            steps.append(lambda: ended.append(grpc_receiver.finish_stop(left())))
        if executor is not None:
            steps.append(lambda: ended.append(join_pool(executor, left)))
        interrupt: BaseException | None = None
        for step in steps:
            for _ in range(2):  # an interrupted step is run once more (a wait cut short is waited again)
                try:
                    step()
                except Exception:
                    logger.warning("cmbagent-otel ingest: stopping: %s failed", getattr(step, "__name__", step),
                                   exc_info=True)
                except BaseException as exc:  # the app's interrupt: the rest is still released, then raised
                    interrupt = interrupt or exc
                    continue
                break
        self._forget_receivers()
        _live.discard(self)
        try:
            if all(ended) and self.core.startup_over(left()):
                self.core.close_writer()  # no thread of ours writes any more
            elif not all(ended):
                logger.warning("cmbagent-otel ingest: stopping: threads still busy after %.0f s, left to end "
                               "on their own (daemon threads)", STOP_WAIT_S)
        except BaseException as exc:
            interrupt = interrupt or exc
        finally:
            self._stopped.set()
            for waker in list(self._wakers):
                waker.wake()
        if interrupt is not None:
            raise interrupt

    def _forget_receivers(self) -> None:
        """Hold no receiver, thread or socket any more (released, or a forked child's copies)."""
        self._uvicorn = self._app = self._http_thread = self._executor = self._grpc = self._sock = None
        self._bound = self._serving = self._stop_requested = False
        self._http_port = None

    def _forget_in_child(self) -> None:
        """In a forked child: the parent's receivers are not this process's (their threads are not
        here; grpcio's state is not usable); only its copy of the HTTP listening socket is closed, which
        kept the port accepting connections nobody answered once the parent stopped. The objects are kept
        (never finalized here: their finalizers would call into grpcio)."""
        sock = self._sock
        _abandoned.append((self._uvicorn, self._app, self._http_thread, self._executor, self._grpc))
        self._forget_receivers()
        self._holder = None
        self._wakers = set()
        self._stopped = threading.Event()
        self._stopped.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _join(thread: threading.Thread, timeout: float) -> bool:
    """Join ``thread`` for at most ``timeout`` seconds; whether it ended. One whose ``start()`` was
    interrupted before it ran cannot be joined: it sees its server's ``should_exit`` and ends alone."""
    try:
        thread.join(timeout)
    except RuntimeError:  # "cannot join thread before it is started"
        return True
    return not thread.is_alive()


class _Waker:
    """What :meth:`IngestServer.serve_forever` sleeps on in the main thread: a socket pair set as the
    signal wakeup descriptor (written by the C-level handler in whichever thread a signal lands) and
    woken by :meth:`IngestServer.stop` from any thread (a zero byte: no signal has number 0)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous: int | None = None

    def arm(self) -> None:
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is already pending) or closed
            self.writer.send(b"\0")

    def wait(self, done: Callable[[], bool], wanted: set[int]) -> None:
        """Until ``done()`` (asked after each wake: a handler of the application's has run by then, on
        the loop's way back) or one of ``wanted`` arrives."""
        while not done():
            data = self.reader.recv(64)
            numbers = data.replace(b"\0", b"")
            if numbers and self.previous is not None and self.previous >= 0:
                with contextlib.suppress(OSError):
                    os.write(self.previous, numbers)
            if wanted.intersection(numbers):
                return

    def close(self) -> None:
        try:
            if self.previous is not None:
                signal.set_wakeup_fd(self.previous)
        finally:
            self.reader.close()
            self.writer.close()


# Servers serving now, stopped when the interpreter exits (an ordinary atexit function: the receivers'
# threads are daemons, so neither concurrent.futures' exit hook nor the interpreter's join of threads
# waits for them first; a gRPC call waiting for its message held the exit for the whole request timeout,
# 30 s by default, when its thread was a ThreadPoolExecutor's). Stopping lets the requests being written
# finish (a daemon thread is cut where it stands once atexit is over). Held strongly: a server the
# application no longer references still serves (its threads do not reference it).
_live: set[IngestServer] = set()
_exit_hook: list[bool] = []


def _stop_at_exit(server: IngestServer) -> None:
    _live.add(server)
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_stop_all)


_abandoned: list[object] = []  # a forked child's copies of its parent's receivers, never finalized there


def _forget_all_in_child() -> None:
    for server in list(_live):
        server._forget_in_child()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)


def _stop_all() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception:
            logger.debug("cmbagent-otel ingest: stopping at exit failed", exc_info=True)


if __name__ == "__main__":  # ``python -m cmbagent_otel.ingest ...``: the same as ``cmbagent-otel ingest ...``
    import sys

    from .cli import main

    raise SystemExit(main(["ingest", *sys.argv[1:]]))
