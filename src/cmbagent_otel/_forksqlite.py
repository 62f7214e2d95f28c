"""Our SQLite calls across ``fork()``: a fork waits for them, and a child forked inside one keeps off SQLite.

SQLite is not fork-safe. Its global mutexes (the memory allocator's, taken by every allocation; the Unix VFS's,
taken to open, close and lock a file) are copied held into a child forked while another thread was inside a
SQLite call, and the child's first SQLite call waits on them for ever; a file's lock state is kept in the
process too, so a child forked inside a transaction finds that file locked by a connection it does not have.
Measured with the DAG exporter: a thread writing SQLite all the time while the main thread forked, 1 child in
400 hung at its first SQLite call and, with our exporter's own transactions, 24 children in 40 found the database
locked and spilled their batch after waiting out their export timeout.

So the DAG writer marks its SQLite calls (:func:`sqlite_calls`), and a fork waits for the marked calls of the
other threads to end, bounded (:func:`cmbagent_otel._forksafe.fork_wait_until`, shared with the gRPC exports'
wait); a call starting while the fork is being prepared waits for the fork, so none starts between the wait and
the fork. A child forked while a marked call was still under way (the wait ran out, or the forking thread was
inside one itself) never calls SQLite: :func:`forked_inside_sqlite` says so, and the writer spills instead. The
application's own SQLite calls are not ours to mark: a child forked while one of the application's threads was
inside SQLite may still hang at its first SQLite call, ours or the application's.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

from ._forksafe import fork_wait_until, interrupt_after_fork

_state = threading.Condition()  # guards _inside and _forking; a new one in a forked child
_inside: dict[int, int] = {}  # thread ident -> how many of our SQLite calls it is inside (nested marks)
_forking = [False]  # a fork is being prepared: from our before-fork hook to the fork's end in the parent
_forked_inside = [False]  # this process was forked while a thread of its parent was inside our SQLite calls


class _Mark:
    """The context of :func:`sqlite_calls`: the calling thread is inside our SQLite calls."""

    __slots__ = ()

    def __enter__(self) -> None:
        me = threading.get_ident()
        with _state:
            if _forking[0] and me not in _inside:
                # bounded: past it this call goes on, and a child forked meanwhile keeps off SQLite
                _state.wait_for(_not_forking, 60.0)
            _inside[me] = _inside.get(me, 0) + 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        me = threading.get_ident()
        with _state:
            depth = _inside.pop(me, 1) - 1
            if depth > 0:
                _inside[me] = depth
            else:
                _state.notify_all()


_MARK = _Mark()


def sqlite_calls() -> _Mark:
    """A context inside which the calling thread may call SQLite: a fork waits for it to end (bounded)."""
    return _MARK


def forked_inside_sqlite() -> bool:
    """Whether this process was forked while its parent was inside our SQLite calls: it must not call SQLite."""
    return _forked_inside[0]


def _not_forking() -> bool:
    return not _forking[0]


def _others_inside() -> bool:
    """Whether a thread other than this one is inside our SQLite calls; forgets the marks of threads gone (one
    a ``KeyboardInterrupt`` ended between its mark and its ``try``). The caller holds ``_state``."""
    me = threading.get_ident()
    others = _inside.keys() - {me}
    if others:
        gone = others - {thread.ident for thread in threading.enumerate()}
        for ident in gone:
            del _inside[ident]
        others -= gone
    return bool(others)


def _before_fork() -> None:
    """Wait, bounded, for the other threads' SQLite calls of ours to end; hold new ones until after the fork."""
    try:
        with _state:
            _forking[0] = True
            if _others_inside():
                _state.wait_for(lambda: not _others_inside(), max(0.0, fork_wait_until() - time.monotonic()))
    except KeyboardInterrupt:  # the application gets it after the fork (a fork hook's exception is lost)
        interrupt_after_fork()
    except Exception:  # never stop a fork
        pass


def _after_in_parent() -> None:
    with _state:
        _forking[0] = False
        _state.notify_all()


def _after_in_child() -> None:
    global _state
    # only this thread is left: the others' marks and waits are the parent's, and so may be _state's lock
    _forked_inside[0] = _forked_inside[0] or bool(_inside)
    _inside.clear()
    _forking[0] = False
    _state = threading.Condition()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
