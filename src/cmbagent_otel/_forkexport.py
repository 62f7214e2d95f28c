"""OTLP exporters across ``fork()``: the child sends on connections of its own.

The SDK's OTLP exporters keep one connection to the collector for their whole life (a gRPC channel, a
``requests`` session's keep-alive sockets), and a forked child inherits it. Over HTTP the child sent its
requests on the parent's keep-alive socket, between the parent's: the collector read a corrupt body and refused
a batch of one or the other. A child forked while a thread of the parent was inside a gRPC call got gRPC's
state half-copied: gRPC's core skips its own fork handlers while another thread is calling into it ("Other
threads are currently calling into gRPC, skipping fork() handlers"), and the child's first export never
returned, past its deadline, so the child hung at its exit flush for ever.

A forked child's first export now makes an exporter of its own (a new channel or session). The parent's stays
in the child untouched: neither used nor closed (closing it there could wait on gRPC's copied state too, or end
a session the parent still uses). For gRPC, a fork also waits for the exports in flight in this process to end,
so that gRPC runs its fork handlers; an HTTP exporter needs nothing more than the child's own session. The wait
is bounded by each export's own deadline and by ``_forksafe.FORK_WAIT_CAP_S`` in all, and is skipped for an exporter
whose outage is ongoing (its exports are failing: the one in flight will fail too, and between its retries it
is not inside gRPC).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._forksafe import append_pruned, fork_wait_until, interrupt_after_fork, reset_in_child
from ._outage import OutageTally

logger = logging.getLogger("cmbagent_otel")

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_EXPORT_TIMEOUT_S = 10.0  # the SDK exporters' default (OTEL_EXPORTER_OTLP_TIMEOUT)


class PerProcess(Generic[T]):
    """An exporter per process: ``exporter`` here, and in a forked child a new one from ``make()`` (at its first
    use there), the parent's copy left alone. ``make`` None: the child uses the parent's (nothing to remake).

    A fork waits for this process's exports through it when they go over gRPC (:func:`uses_grpc`), unless
    ``outage`` (the exporter's failures) says they are failing."""

    def __init__(self, exporter: T, make: Callable[[], T] | None = None, *,
                 outage: OutageTally | None = None) -> None:
        self._exporter = exporter
        self._make = make
        self._outage = outage
        self._pid = os.getpid()
        self._making = threading.Lock()
        reset_in_child(self, "_making")
        self._fork_waits = uses_grpc(exporter)
        self._wait_s = _timeout_of(exporter) + 1.0  # an export ends by then: its deadline, and a margin
        # the exports in flight: their end (set when it came), thread and start. A registration a KeyboardInterrupt
        # left behind is never set: a fork waits for it no longer than an export lasts
        self._flights: dict[threading.Event, tuple[int, float]] = {}
        with _all_lock:  # registration only: the fork hook reads the list without it (a thread may hold it then)
            append_pruned(_all, weakref.ref(self), _prune_at)

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
                self._flights = {}  # the parent's
                self._exporter, self._pid = made, os.getpid()
        return self._exporter

    def send(self, send: Callable[[T], R], failed: R) -> R:
        """``send(exporter)`` with this process's exporter, marked in flight for a fork to wait for (gRPC);
        ``failed`` when a forked child's exporter could not be made (its exports fail, as when sending fails)."""
        try:
            exporter = self.own()
        except Exception:
            logger.debug("cmbagent_otel: could not make this process's OTLP exporter", exc_info=True)
            return failed
        if not self._fork_waits:
            return send(exporter)
        ended = threading.Event()
        flights = self._flights
        try:
            flights[ended] = (threading.get_ident(), time.monotonic())
            return send(exporter)
        finally:
            ended.set()
            flights.pop(ended, None)

    def force_flush(self, timeout_millis: float) -> bool:
        """Flush this process's exporter (a forked child has nothing to flush in its parent's)."""
        exporter: Any = self.made_here()
        return exporter is None or bool(exporter.force_flush(timeout_millis))

    def shutdown(self, **kwargs: Any) -> None:
        """Shut down this process's exporter; a forked child leaves its parent's alone."""
        exporter: Any = self.made_here()
        if exporter is not None:
            exporter.shutdown(**kwargs)

    def _exports_to_wait_for(self, me: int) -> list[tuple[threading.Event, float]]:
        """The exports a fork now waits for, each with the time it is over by: none unless this process made
        the exporter, it goes over gRPC and its outage is not ongoing; never the forking thread's own."""
        if not self._fork_waits or self._pid != os.getpid() or (self._outage is not None and self._outage.ongoing):
            return []
        return [(ended, started + self._wait_s) for ended, (thread, started) in self._flights.copy().items()
                if thread != me]


def uses_grpc(exporter: Any) -> bool:
    """Whether ``exporter`` is one of the SDK's OTLP/gRPC exporters."""
    grpc_exporter = sys.modules.get("opentelemetry.exporter.otlp.proto.grpc.exporter")
    mixin = getattr(grpc_exporter, "OTLPExporterMixin", None)
    return isinstance(mixin, type) and isinstance(exporter, mixin)


def _timeout_of(exporter: Any) -> float:
    """The seconds an export of ``exporter`` may take (the SDK exporters' ``_timeout``)."""
    try:
        return max(0.0, float(getattr(exporter, "_timeout", DEFAULT_EXPORT_TIMEOUT_S)))
    except (TypeError, ValueError):
        return DEFAULT_EXPORT_TIMEOUT_S


_all: list[weakref.ref[PerProcess[Any]]] = []
_all_lock = threading.Lock()
_prune_at = [64]  # the length at which _all is pruned next (see append_pruned)
reset_in_child(sys.modules[__name__], "_all_lock")
_inherited: list[Any] = []  # a forked child's copies of its parent's exporters (see PerProcess.own)


def _before_fork() -> None:
    """Wait for the gRPC exports in flight, each until it ends or its deadline, ``_forksafe.FORK_WAIT_CAP_S`` in
    all with the wait for our SQLite calls (:mod:`cmbagent_otel._forksqlite`)."""
    try:
        cap = fork_wait_until()
        me = threading.get_ident()
        # no lock: the copy is one C call, and a thread of the application may hold _all_lock at the fork
        for ref in _all[:]:
            owner = ref()
            for ended, over_by in owner._exports_to_wait_for(me) if owner is not None else ():
                # nothing is held across the fork: an export starting after this (another thread given the GIL
                # by a later fork hook) is the case gRPC's core skips its fork handlers for, as without the wait
                ended.wait(max(0.0, min(over_by, cap) - time.monotonic()))
    except KeyboardInterrupt:  # the application gets it after the fork (a fork hook's exception is lost)
        interrupt_after_fork()
    except Exception:  # never stop a fork
        logger.debug("cmbagent_otel: could not wait for the exports in flight before a fork", exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)
