"""The ingest receivers' thread pools, and bounded waits for them (public API only).

``concurrent.futures.ThreadPoolExecutor`` has no bounded wait for its threads (``shutdown(wait=True)``
waits for ever; its thread set is private), its threads are joined by concurrent.futures' own exit hook
before any ``atexit`` function runs (a gRPC call waiting for its message held the interpreter's exit for
the whole request timeout unless a private ``threading`` hook stopped the server first), and a thread it
cannot start (a pids or memory limit) raised from ``submit`` with the work left queued, handled only by
overriding a private method. :class:`CallPool` is a small executor of daemon threads that knows its threads
and says what to do when none can start.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

logger = logging.getLogger("cmbagent_otel.ingest")


def seconds_left(end: float) -> float:
    """Seconds until the ``time.monotonic()`` deadline ``end`` (never negative)."""
    return max(0.0, end - time.monotonic())


class CallPool(futures.Executor):
    """At most ``max_workers`` daemon threads running submitted work, started on demand and kept until
    :meth:`shutdown`. Daemon threads: the interpreter's exit does not wait for them (the server's exit hook,
    an ordinary ``atexit`` function, stops it and waits for its work with a bound).

    When no thread can start and none is idle, ``refuse_without_thread`` makes ``submit`` cancel the work
    and raise the ``RuntimeError`` (the HTTP receiver answers 503: a request refused is never stored);
    otherwise the work stays queued for a thread the pool has or the next ``submit`` starts (grpcio submits
    every call from its one serving thread, which an error would end)."""

    def __init__(self, max_workers: int, thread_name_prefix: str, *, refuse_without_thread: bool = False) -> None:
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._refuse = refuse_without_thread
        self._queue: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count()
        self._shut = False
        self.failed_starts = 0

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads started so far (a copy)."""
        with self._lock:
            return list(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: futures.Future[Any] = futures.Future()
            item = [future, fn, args, kwargs]
            self._queue.put(item)
            if self._idle.acquire(blocking=False) or len(self._threads) >= self._max_workers:
                return future
            thread = threading.Thread(target=self._work, name=f"{self._prefix}_{next(self._numbers)}", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self.failed_starts += 1
                if self._refuse and future.cancel():
                    item[1:] = [None, (), {}]  # the queued item holds no request body until a worker drops it
                    raise
                logger.log(logging.WARNING if self.failed_starts == 1 else logging.DEBUG,
                           "cmbagent-otel ingest: no thread could be started for %s (%d so far); the work waits "
                           "for one", self._prefix, self.failed_starts, exc_info=True)
            else:
                self._threads.append(thread)
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the submitter, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs  # nothing of a request kept while idle
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; ``cancel_futures`` drops the work not begun; ``wait`` waits (without a bound: see
        :func:`join_pool`) for the threads to end."""
        with self._lock:
            self._shut = True
            if cancel_futures or not self._threads:  # without a thread, nothing would ever run it
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


def join_pool(pool: CallPool, left: Callable[[], float | None]) -> bool:
    """Shut ``pool`` down (work not begun is dropped) and wait for its threads, each at most ``left()``
    seconds; whether they all ended."""
    pool.shutdown(wait=False, cancel_futures=True)
    threads = pool.threads
    for thread in threads:
        thread.join(left())
    return not any(thread.is_alive() for thread in threads)
