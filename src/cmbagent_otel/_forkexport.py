"""OTLP exporters across ``fork()``: the child sends on connections of its own.

The SDK's OTLP exporters keep one connection to the collector for their whole life (a gRPC channel, a
``requests`` session's keep-alive sockets), and a forked child inherits it. A child forked while a thread of
the parent was inside a gRPC call (the batch processor's worker exporting) got gRPC's state half-copied: gRPC
skips its own fork handlers while a call is in flight, and the child's first export through the inherited
channel never returned, past its deadline, so the child hung at its exit flush for ever. Over HTTP the child
sent its requests on the parent's keep-alive socket, between the parent's: the collector read a corrupt body
and refused a batch of one or the other.

A fork now waits for the OTLP exports in flight in this process to end (at most the exporter's own timeout,
which bounds an export), so gRPC runs its fork handlers; and a forked child's first export makes an exporter
of its own (a new channel or session). The parent's stays in the child untouched: neither used nor closed
(closing it there could wait on gRPC's copied state too, or end a session the parent still uses).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._forksafe import reset_in_child

logger = logging.getLogger("cmbagent_otel")

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_EXPORT_TIMEOUT_S = 10.0  # the SDK exporters' default (OTEL_EXPORTER_OTLP_TIMEOUT)
MAX_FORK_WAIT_S = 60.0  # however long an exporter's own timeout: a fork never waits longer for its export


class PerProcess(Generic[T]):
    """An exporter per process: ``exporter`` here, and in a forked child a new one from ``make()`` (at its first
    use there), the parent's copy left alone. ``make`` None: the child uses the parent's (nothing to remake)."""

    def __init__(self, exporter: T, make: Callable[[], T] | None = None) -> None:
        self._exporter = exporter
        self._make = make
        self._pid = os.getpid()
        self._sending = threading.Lock()  # held while an export is in flight: a fork waits for it
        self._making = threading.Lock()
        reset_in_child(self, "_sending", "_making")
        self._wait_s = _timeout_of(exporter) + 1.0
        with _all_lock:  # registration only: the fork hook reads the list without it (a thread may hold it then)
            if len(_all) >= _prune_at[0]:
                _all[:] = [ref for ref in _all if ref() is not None]
                _prune_at[0] = max(64, 2 * len(_all))
            _all.append(weakref.ref(self))

    @property
    def exporter(self) -> T:
        """The exporter in use: the parent's in a forked child until :meth:`own` has made the child's."""
        return self._exporter

    def made_here(self) -> T | None:
        """The exporter if this process made it (or has no other to make), else None."""
        return self._exporter if self._pid == os.getpid() or self._make is None else None

    def own(self) -> T:
        """This process's exporter, made now in a forked child; raises what ``make()`` raises."""
        if self._pid == os.getpid() or self._make is None:
            return self._exporter
        with self._making:
            if self._pid != os.getpid():
                made = self._make()
                _inherited.append(self._exporter)  # kept: a gRPC channel dropped here would close itself
                self._exporter, self._pid = made, os.getpid()
        return self._exporter

    def send(self, send: Callable[[T], R], failed: R) -> R:
        """``send(exporter)`` with this process's exporter, marked in flight for a fork to wait for; ``failed``
        when a forked child's exporter could not be made (its exports fail, as when sending fails)."""
        try:
            exporter = self.own()
        except Exception:
            logger.debug("cmbagent_otel: could not make this process's OTLP exporter", exc_info=True)
            return failed
        with self._sending:
            return send(exporter)

    def force_flush(self, timeout_millis: float) -> bool:
        """Flush this process's exporter (a forked child has nothing to flush in its parent's)."""
        exporter: Any = self.made_here()
        return exporter is None or bool(exporter.force_flush(timeout_millis))

    def shutdown(self, **kwargs: Any) -> None:
        """Shut down this process's exporter; a forked child leaves its parent's alone."""
        exporter: Any = self.made_here()
        if exporter is not None:
            exporter.shutdown(**kwargs)


def _timeout_of(exporter: Any) -> float:
    """The seconds an export of ``exporter`` may take (the SDK exporters' ``_timeout``), within bounds."""
    try:
        return min(MAX_FORK_WAIT_S, max(0.0, float(getattr(exporter, "_timeout", DEFAULT_EXPORT_TIMEOUT_S))))
    except (TypeError, ValueError):
        return DEFAULT_EXPORT_TIMEOUT_S


_all: list[weakref.ref[PerProcess[Any]]] = []
_all_lock = threading.Lock()
_prune_at = [64]  # the length at which _all is pruned next (twice what the last pruning kept)
reset_in_child(sys.modules[__name__], "_all_lock")
_inherited: list[Any] = []  # a forked child's copies of its parent's exporters (see PerProcess.own)
_acquire = type(_all_lock).acquire
_release = type(_all_lock).release


def _before_fork() -> None:
    """Wait for the exports in flight (each exporter's lock taken, then given back at once)."""
    try:
        # no lock: the copy is one C call, and a thread of the application may hold _all_lock at the fork
        owners = [owner for ref in _all[:] if (owner := ref()) is not None]
        if not owners:
            return
        locks = [owner._sending for owner in owners]
        wait = functools.partial(_acquire, timeout=max(owner._wait_s for owner in owners))
        # one C call takes each lock and gives it back: no signal handler runs between the two (a Ctrl-C there
        # would leave it held, and this process's exports waiting for it for ever). Nothing is held across the
        # fork: an export starting after this (another thread given the GIL by a later fork hook) only makes
        # the child's first export through its own new channel fail within its deadline, as without the wait
        collections.deque(map(_release, itertools.compress(locks, map(wait, locks))), 0)
    except Exception:  # never stop a fork
        logger.debug("cmbagent_otel: could not wait for the exports in flight before a fork", exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)
