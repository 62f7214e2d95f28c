"""The ingest server's lifecycle as a library API (session 43): every order of start and stop, from
one thread or many, interrupted at each step, and what a stopped server still holds (nothing: no
thread, no socket, no file descriptor, counted). Real sockets, HTTP and gRPC clients, SQLite and
PostgreSQL."""

from __future__ import annotations

import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

import cmbagent_otel.ingest as ingest
from cmbagent_otel._ingest_grpc import GrpcReceiver
from cmbagent_otel.ingest import IngestServer
from tests.faults.conftest import descriptors_on, interrupt_at, plan_run_spans

WAIT = 60.0  # bound of every wait for the server (generous: the machine is shared)
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
INGEST = ingest.__file__


def held() -> tuple[set[str], set[str]]:
    """This process's Python threads (by name and id) and file descriptors (by number and target), once
    garbage is collected: grpcio's server state holds a completion queue (an epoll, an eventfd) in a
    reference cycle, closed when the collector frees it; what is left is what something still reaches."""
    import gc

    gc.collect()
    threads = {f"{t.name}:{t.ident}" for t in threading.enumerate()}
    return threads, {f"{fd}:{target}" for fd, target in _targets().items()}


def _targets() -> dict[str, str]:
    import os

    found = {}
    for fd in descriptors_on(lambda path: True):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


@pytest.fixture
def baseline(sqlite_url: str) -> tuple[set[str], set[str]]:
    """What the process holds with no server, taken after one server has started and stopped, and one
    failed to bind a gRPC port in use (grpcio's C core keeps a few descriptors of its own for the life of
    the process from its first use of each: two epolls and two eventfds for the failed bind, the same
    after any number of them)."""
    warm = sqlite_url.replace(".db", "-warm.db")
    server = IngestServer(warm, host="127.0.0.1", port=0, grpc_port=0)
    server.start()
    post(server, spans())
    grpc_export(server, spans())
    server.stop()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        with pytest.raises(OSError):
            IngestServer(warm, host="127.0.0.1", port="off", grpc_port=holder.getsockname()[1]).start()
    return held()


def assert_nothing_left(baseline: tuple[set[str], set[str]], where: object = "") -> None:
    threads, fds = held()
    assert threads - baseline[0] == set(), f"threads left after stop {where}"
    assert fds - baseline[1] == set(), f"descriptors left after stop {where}"


_SPANS: list[ReadableSpan] = []


def spans() -> list[ReadableSpan]:
    if not _SPANS:
        _SPANS.extend(plan_run_spans("ingest43", steps=1))
    return _SPANS


def post(server: IngestServer, batch: Sequence[ReadableSpan]) -> int:
    request = urllib.request.Request(server.endpoint, data=encode_spans(batch).SerializeToString(), method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(request, timeout=WAIT) as answer:
        return int(answer.status)


def grpc_export(server: IngestServer, batch: Sequence[ReadableSpan]) -> None:
    with grpc.insecure_channel(server.grpc_endpoint) as channel:
        channel.unary_unary(EXPORT)(encode_spans(batch).SerializeToString(), timeout=WAIT)


def refused(port: int) -> bool:
    """Whether nothing listens on ``port`` (127.0.0.1) any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def server_for(url: str, **settings: Any) -> IngestServer:
    return IngestServer(url, host="127.0.0.1", port=settings.pop("port", 0), grpc_port=settings.pop("grpc_port", 0),
                        **settings)


# --- every order ------------------------------------------------------------------------------

def test_stop_before_start_twice_then_start_twice_stop_twice_and_start_again(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    server = server_for(sqlite_url)
    server.stop()
    server.stop()
    assert_nothing_left(baseline)
    server.start()
    port, grpc_port = server.port, server.grpc_port
    assert server.start().port == port and server.grpc_port == grpc_port  # idempotent: the same sockets
    assert post(server, spans()) == 200
    grpc_export(server, spans())
    server.stop()
    server.stop()
    assert server.port is None and server.grpc_port is None
    assert port is not None and grpc_port is not None and refused(port) and refused(grpc_port)
    assert_nothing_left(baseline)
    server.start()  # a stopped server starts again, and serves
    assert post(server, spans()) == 200
    grpc_export(server, spans())
    server.stop()
    assert_nothing_left(baseline)
    assert server.spans_written == 4 * len(spans())


def test_stop_leaves_no_postgres_connection(pg_url: str, baseline: tuple[set[str], set[str]]) -> None:
    server = server_for(pg_url).start()
    assert post(server, spans()) == 200
    server.stop()
    assert_nothing_left(baseline)


def test_the_context_manager_stops_under_an_exception_and_lets_it_through(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    raised = ZeroDivisionError("the application's own")
    with pytest.raises(ZeroDivisionError) as caught, server_for(sqlite_url) as server:
        assert post(server, spans()) == 200
        grpc_export(server, spans())
        raise raised
    assert caught.value is raised
    assert server.port is None
    assert_nothing_left(baseline)


def test_serve_forever_in_a_thread_returns_on_stop_from_another(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    server = server_for(sqlite_url)
    served = threading.Event()
    returned: list[object] = []
    thread = threading.Thread(target=lambda: returned.append(server.serve_forever(started=served.set)))
    thread.start()
    assert served.wait(WAIT)
    assert post(server, spans()) == 200
    server.stop()
    thread.join(WAIT)
    assert not thread.is_alive() and returned == [None]
    assert_nothing_left(baseline)


def test_signals_are_for_the_main_thread_only(sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    import signal

    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server_for(sqlite_url).serve_forever((signal.SIGTERM,))
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(WAIT)
    assert len(errors) == 1
    assert_nothing_left(baseline)


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_port_in_use_is_a_clear_error_and_leaves_nothing(
        sqlite_url: str, baseline: tuple[set[str], set[str]], taken: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        server = server_for(sqlite_url, **{"port" if taken == "http" else "grpc_port": port})
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} .OTLP/{taken.replace('http', 'HTTP')}"
                           .replace("grpc", "gRPC")):
            server.start()
        assert server.port is None and server.grpc_port is None
        threads, fds = held()
        assert threads - baseline[0] == set()
        assert fds - baseline[1] == {f"{fd}:{target}" for fd, target in _targets().items()
                                     if fd == str(holder.fileno())} - baseline[1]
    finally:
        holder.close()
    server.stop()
    assert_nothing_left(baseline)


# --- many threads -------------------------------------------------------------------------------

class HeldWriter:
    """A writer whose write waits (at most WAIT) until ``release`` is set: a request being written."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.spans = 0

    def write(self, batch: Sequence[ReadableSpan]) -> None:
        self.entered.set()
        self.release.wait(WAIT)
        self.spans += len(batch)


def test_every_stop_from_many_threads_returns_once_the_server_is_stopped(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    """Eight threads stop the server while a request is being written. One did the stop; the others
    found nothing to take and returned at once, the port still listening (a caller starting a server
    on it again got EADDRINUSE). Each returns now once the server is stopped, and none raises."""
    writer = HeldWriter()
    server = server_for(sqlite_url, writer=writer).start()
    port = server.port
    assert port is not None
    answers: list[int] = []
    client = threading.Thread(target=lambda: answers.append(post(server, spans())))
    client.start()
    assert writer.entered.wait(WAIT)
    called = threading.Semaphore(0)
    after: list[bool] = []
    errors: list[BaseException] = []

    def stopper() -> None:
        try:
            called.release()
            server.stop()
            after.append(refused(port))
        except BaseException as exc:
            errors.append(exc)

    stoppers = [threading.Thread(target=stopper) for _ in range(8)]
    for thread in stoppers:
        thread.start()
    for _ in stoppers:  # every stopper has called (or is calling) stop(): the write may end
        assert called.acquire(timeout=WAIT)
    writer.release.set()
    for thread in [*stoppers, client]:
        thread.join(WAIT)
    assert errors == [] and after == [True] * 8
    assert answers == [200] and writer.spans == len(spans())
    assert_nothing_left(baseline)


# --- a signal handler's stop() inside start() -----------------------------------------------------

def in_a_thread(action: Callable[[], object], hook: Callable[[FrameType, str, Any], Any]) -> list[object]:
    """``action()`` in a new thread with ``hook`` as its profile function; its result (or exception), once
    it ends (at most WAIT: a thread deadlocked on a lock it holds itself stays behind, the test fails)."""
    out: list[object] = []

    def run() -> None:
        sys.setprofile(hook)
        try:
            out.append(action())
        except BaseException as exc:
            out.append(exc)
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=run, daemon=True, name="ingest43-starter")
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "start() never returned: deadlocked by the stop() called inside it"
    return out


def stop_inside_grpc_start(server: IngestServer) -> Callable[[FrameType, str, Any], Any]:
    """A profile hook calling ``server.stop()`` as the gRPC receiver's start returns to the server (under the
    server's lock), as a SIGTERM handler of the application's runs there, once."""
    done: list[bool] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if not done and event == "return" and frame.f_code is GrpcReceiver.start.__code__:
            done.append(True)
            server.stop()

    return hook


def test_stop_from_a_signal_handler_inside_start_stops_the_server(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    server = server_for(sqlite_url)
    out = in_a_thread(server.start, stop_inside_grpc_start(server))
    assert out == [server]
    assert server.port is None and server.grpc_port is None  # stopped before start() returned
    assert_nothing_left(baseline)
    server.start()  # and nothing is left held: it starts again
    assert post(server, spans()) == 200
    server.stop()
    assert_nothing_left(baseline)


def test_stop_from_a_signal_handler_inside_serve_forevers_start_returns(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    server = server_for(sqlite_url)
    out = in_a_thread(server.serve_forever, stop_inside_grpc_start(server))
    assert out == [None]
    assert_nothing_left(baseline)


# --- KeyboardInterrupt at each step -------------------------------------------------------------

def _step(frame: FrameType, event: str) -> bool:
    """A point where a signal handler's interrupt lands in the server's own code: a call made from
    ingest.py returning to it."""
    if event == "c_return":
        return frame.f_code.co_filename == INGEST
    return (event == "return" and frame.f_back is not None and frame.f_back.f_code.co_filename == INGEST
            # not a finalizer or weak reference callback the collector ran there: the interpreter ignores
            # (prints) whatever they raise, a signal handler's interrupt as any other
            and frame.f_code.co_name not in ("__del__", "_remove"))


def where(n: int, raised: list[BaseException]) -> str:
    """The step an interrupt was raised at, for a failure's message."""
    import traceback

    frames = traceback.extract_tb(raised[0].__traceback__) if raised else []
    return f"(step {n}: " + " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-4:])) + ")"


def steps_of(action: Callable[[], object], step: Callable[[FrameType, str], bool] = _step) -> int:
    count = [0]

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if step(frame, event):
            count[0] += 1

    sys.setprofile(hook)
    try:
        action()
    finally:
        sys.setprofile(None)
    return count[0]


def nth_step(n: int, step: Callable[[FrameType, str], bool] = _step) -> Callable[[FrameType, str, Any], bool]:
    seen = [0]

    def hit(frame: FrameType, event: str, arg: Any) -> bool:
        if not step(frame, event):
            return False
        seen[0] += 1
        return seen[0] == n + 1

    return hit


def test_keyboard_interrupt_at_each_step_of_start_leaves_nothing(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    probe = server_for(sqlite_url)
    count = steps_of(probe.start)
    probe.stop()
    assert count > 10
    for n in range(count):
        server = server_for(sqlite_url)
        with interrupt_at(nth_step(n)) as raised:
            server.start()
        assert server.port is None and server.grpc_port is None, where(n, raised)
        at = where(n, raised)
        # the interrupt's traceback holds the frames it went through, and what a frame made and lost
        # (a socket whose constructor the interrupt cut short) lives as long as the exception does;
        # an application drops it once handled, as here
        raised.clear()
        assert_nothing_left(baseline, at)
        server.start()  # the lock was let go
        server.stop()


def test_keyboard_interrupt_at_each_step_of_stop_still_releases_everything(
        sqlite_url: str, baseline: tuple[set[str], set[str]]) -> None:
    """Once a stop has begun, an interrupt no longer leaves a half-stopped server: everything is released,
    then the interrupt raised. It took the receivers out of the server first, then waited for them: cut
    there, the threads and sockets were left, and no later stop() found them. One landing before the stop
    began (before it holds the server's lock) leaves the server serving, whole, for the next stop()."""
    probe = server_for(sqlite_url).start()
    assert post(probe, spans()) == 200
    count = steps_of(probe.stop)
    assert count > 10
    for n in range(count):
        server = server_for(sqlite_url).start()
        assert post(server, spans()) == 200
        with interrupt_at(nth_step(n)) as raised:
            server.stop()
        at = where(n, raised)
        if server.port is not None:  # cut before it began: serving still, on both receivers
            assert "_teardown" not in at and server.grpc_port is not None, at
            assert not server.core.stopping.is_set(), at  # its searches for refused spans are not cut short
            assert post(server, spans()) == 200, at
            grpc_export(server, spans())
            server.stop()
        assert server.port is None and server.grpc_port is None, at
        # the interrupt's traceback holds the frames it went through, and what a frame made and lost
        # (a socket whose constructor the interrupt cut short) lives as long as the exception does;
        # an application drops it once handled, as here
        raised.clear()
        assert_nothing_left(baseline, at)
        server.stop()  # idempotent after an interrupted stop
