"""Cut a PostgreSQL connection still in use past its deadline: the client's own bound.

The writer bounds every wait on the server (``lock_timeout``, ``statement_timeout``,
``connect_timeout``: :func:`cmbagent_otel.dag.database.deadline`), but a server that stops
answering (a network partition, a paused VM, a frozen server process) runs none of them: the
connection stays open, its kernel takes what is sent, keepalives are answered, and psycopg
waits for an answer for ever, holding the exporter (and with it ``force_flush()``,
``uninstrument()`` and the process's exit). So a connection checked out under a deadline is
armed here: past the deadline plus :data:`GRACE_S` (the server's own timeout normally answers
first), its socket is shut down, psycopg's wait ends with "server closed the connection" (a
retryable fault), and the batch goes to the spill store. Checking the connection in disarms it.

The socket is reached through a duplicate of its descriptor taken when the connection is
armed (in the thread that uses it), so a descriptor closed and reused meanwhile is never
touched; ``shutdown()`` acts on the socket, not on the descriptor, and closing the duplicate
alone never closes the connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import MutableMapping
from typing import Any

from .._forksafe import reset_in_child

GRACE_S = 1.0
WATCHED = "cmbagent_otel_watched"  # the key of an armed connection's token in its pool record's ``info``

logger = logging.getLogger("cmbagent_otel.dag")


class Watchdog:
    """One daemon thread per process ending the connections whose deadline has passed, running only
    while a connection is armed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        reset_in_child(self, "_lock")
        self._armed: dict[int, tuple[int, str]] = {}  # token -> (duplicated descriptor, label)
        self._due: list[tuple[float, int]] = []  # heap of (end, token); disarmed tokens are skipped
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def arm(self, fd: int, end: float, label: str, info: MutableMapping[str, Any] | None = None) -> int | None:
        """Shut the socket ``fd`` down at ``end`` (``time.monotonic()``) + :data:`GRACE_S` unless
        disarmed first; returns the token for :meth:`disarm` (None when ``fd`` cannot be watched).
        ``label`` names the database in the log line (no credentials). ``info`` (the pool record's):
        the token is put there under :data:`WATCHED` as it is armed, not after ``arm`` returned.

        A Ctrl-C (a signal handler's ``KeyboardInterrupt``, raised when a call returns) as ``os.dup`` or
        ``arm`` returned lost the duplicate or the token: the duplicate leaked, or the connection stayed
        armed, and the watchdog cut it at that deadline while the pool had lent it again. The duplicate
        is taken into a list in the call that makes it (as ``_forksafe.open_into`` does) and an interrupt
        before the token is held by ``info`` undoes the arming."""
        duplicate: list[int] = []
        token = None
        try:
            try:
                duplicate.extend(map(os.dup, (fd,)))
            except OSError:
                return None
            with self._lock:
                self._forked()
                token = next(self._tokens)
                self._armed[token] = (duplicate[0], label)
                if info is not None:
                    info[WATCHED] = token  # no call between: armed and held by the record at once
                duplicate.clear()  # the watchdog's now (closed by disarm or the cut)
                heapq.heappush(self._due, (end + GRACE_S, token))
                if self._thread is None or not self._thread.is_alive():
                    thread = threading.Thread(target=self._run, name="cmbagent-otel-deadline", daemon=True)
                    try:
                        thread.start()
                    except RuntimeError:
                        # no thread can start now (a pids or memory limit): this connection goes unwatched,
                        # as one whose descriptor cannot be; left armed, its duplicate leaked and a thread
                        # started later cut it at this stale deadline while the pool had lent it again
                        if info is not None:
                            info.pop(WATCHED, None)
                        os.close(self._armed.pop(token)[0])
                        self._thread = None
                        return None
                    self._thread = thread
                elif self._due[0][1] == token:
                    self._wake.notify()
        except BaseException:
            self._unarm(duplicate, token)
            raise
        return token

    def _unarm(self, duplicate: list[int], token: int | None) -> None:
        """Undo an :meth:`arm` interrupted before the watchdog held the duplicate ``duplicate`` (emptied
        once it did: from then on the record's ``info`` holds the token, and its disarm closes it). Never
        raises."""
        try:
            if duplicate:
                if token is not None:
                    with self._lock:
                        self._armed.pop(token, None)
                os.close(duplicate.pop())
        except Exception:
            logger.debug("cmbagent_otel: could not undo an interrupted arming", exc_info=True)

    def disarm(self, token: int | None) -> None:
        """Forget ``token`` (the connection was given back in time)."""
        if token is None:
            return
        with self._lock:
            self._forked()
            entry = self._armed.pop(token, None)
            if not self._armed and self._due:
                self._wake.notify()  # nothing left to watch: the thread ends now, not at the stale deadline
            elif len(self._due) > 64 and len(self._due) > 2 * len(self._armed):
                # a disarmed entry waits for the front of the heap: while another connection stays armed,
                # one per checkout of the last deadline's worth of time; dropped once they are most of it
                self._due = [item for item in self._due if item[1] in self._armed]
                heapq.heapify(self._due)
        if entry is not None:
            os.close(entry[0])

    def _forked(self) -> None:
        # in a forked child the descriptors are the parent's connections: close our duplicates,
        # never shut them down (that would cut the parent's); the thread did not survive the fork
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        for fd, _label in self._armed.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._armed.clear()
        self._due.clear()
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    return
                while self._due and self._due[0][1] not in self._armed:
                    heapq.heappop(self._due)
                if not self._due:
                    # idle: end (a long-running process keeps no thread for a database it stopped
                    # using); the next arm() starts one again
                    self._thread = None
                    return
                end, token = self._due[0]
                left = end - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._due)
                fd, label = self._armed.pop(token)
            _cut(fd, label)


def _cut(fd: int, label: str) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        logger.warning("cmbagent_otel: the database %s did not answer within the deadline (+%.0f s); its "
                       "connection was cut", label, GRACE_S)
    except OSError:
        pass  # already closed by the server or the driver
    finally:
        sock.close()


watchdog = Watchdog()
