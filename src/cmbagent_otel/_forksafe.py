"""Locks that a forked child gets back unlocked, and file locks it gives up.

``fork()`` copies every lock as it is but only the calling thread: a lock that another
thread held at that moment (the export thread in the middle of a batch, a background
migration, an application thread learning a secret) stays held in the child by nobody, and
the child's first ``with lock`` waits for ever. The standard library resets its own locks
in the child (logging, concurrent.futures); this does the same for ours, with the method
the standard library uses (``_at_fork_reinit``, CPython 3.9+), so every reference to the
lock sees it reset. What the lock protected may be half-updated in the child, as with the
standard library's; our locks guard caches and counters that stay usable.

File locks (``flock``) are the other way round: they belong to the open file description, which
the child shares, so one the parent held at the fork stays held until the child has closed its
copy too: a ``multiprocessing`` worker kept it for its whole life. The child closes every file
descriptor of ours that held one (:func:`hold_fd`).
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import functools
import itertools
import operator
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_owners: list[tuple[weakref.ref[Any], tuple[str, ...]]] = []
_owners_lock = threading.Lock()
_prune_at = [64]  # the length at which _owners is pruned next (see append_pruned; a cursor per group chat)
# descriptors holding a flock of ours (spill files being written, the SQLite folder's creation lock), each with
# the (device, inode) it is open on (None: not known), so that a child closes only a copy of that file
_held_fds: dict[int, tuple[int, int] | None] = {}

# however long the calls in flight may last, a fork waits at most this long in all for them (the gRPC exports,
# our SQLite calls); the precedent is gRPC's own Python fork handler, which waits at most 5 s for gRPC's threads
# (_AWAIT_THREADS_TIMEOUT_SECONDS in grpc/_cython/_cygrpc/fork_posix.pyx.pxi, grpcio 1.85)
FORK_WAIT_CAP_S = 5.0
_wait_until: list[float] = []  # when the waits of the fork being prepared end (set by the first to ask)
_interrupts: list[int] = []  # SIGINT once a wait before the fork was interrupted: delivered after the fork
_interrupt_hooked: list[bool] = []


def reset_in_child(owner: Any, *names: str) -> None:
    """Reset the locks ``owner.<name>`` (an object or a module, held weakly) in a forked child."""
    with _owners_lock:
        append_pruned(_owners, (weakref.ref(owner), names), _prune_at, operator.itemgetter(0))


def append_pruned(items: list[T], item: T, prune_at: list[int],
                  ref_of: Callable[[T], weakref.ref[Any]] | None = None) -> None:
    """Append ``item`` to a registry of weakly held objects, first dropping the items whose object is gone
    (``ref_of(item)``: the item's weak reference; None: the item is one) once the list has reached
    ``prune_at[0]``, which becomes twice what was kept (64 at least): many objects alive at once cost one pass
    per doubling, not one per registration. The caller holds the registry's lock."""
    if len(items) >= prune_at[0]:
        items[:] = [kept for kept in items if (kept if ref_of is None else ref_of(kept))() is not None]
        prune_at[0] = max(64, 2 * len(items))
    items.append(item)


def hold_fd(fd: int) -> None:
    """Have a child forked from now on close ``fd`` at once (call before locking it; :func:`closer` forgets it)."""
    try:
        info = os.fstat(fd)
        _held_fds[fd] = (info.st_dev, info.st_ino)
    except OSError:
        _held_fds[fd] = None


def open_into(opened: list[int], path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """``os.open(path, flags, mode, dir_fd=dir_fd)``, its descriptor appended to ``opened`` by the same C call
    that opened it (``list.extend`` over a ``map``: no Python code runs between the two), and returned.

    A signal handler runs when a call returns to Python code: a ``KeyboardInterrupt`` raised there as
    ``os.open`` returned lost the descriptor with the return value, before any ``try`` could hold it (a
    leaked descriptor, a folder or ``.tmp`` never unlocked, a ``.tmp`` never removed). The caller keeps
    ``opened`` in a ``try`` around this call whose ``finally`` (or ``except``) closes what it holds
    (:func:`closer`): an interrupt as this function returns finds the descriptor there."""
    opened.extend(map(functools.partial(os.open, flags=flags, mode=mode, dir_fd=dir_fd), (path,)))
    return opened[-1]


def closer(opened: list[int]) -> Callable[[], object]:
    """The cleanup of the descriptors :func:`open_into` will put into ``opened``: made before the ``try`` whose
    ``finally`` calls it. It closes each, then forgets it (:func:`hold_fd`), and runs once (a second call does
    nothing); ``opened`` is left as it is, so the caller can tell afterwards that the open succeeded.

    It is one call of C code (``deque`` consuming ``map`` objects over the list, which read it when the cleanup
    runs): a signal handler runs when a Python function is entered, and a ``KeyboardInterrupt`` at the entry of
    a cleanup function (``close_opened``, ``close_held`` before) came before its ``try`` and left the
    descriptor open, a held one locked. Closed before forgotten, without ``LOCK_UN`` first: a child forked
    before the close finds it held and closes its copy; one forked after finds the number closed, or on
    another file (reused meanwhile by another thread), which it leaves (the (device, inode) kept).

    Every descriptor is closed and forgotten, and nothing is raised: each close is ``os.closerange(fd, fd + 1)``,
    which ignores the close's error. ``os.close`` raised it and the cleanup stopped there: the descriptors after
    it stayed open (a held one locked) and none was forgotten, and from a ``finally`` the error (``EBADF`` for a
    number the application closed under us, ``EIO`` from a network file system) replaced the exception under
    way, the spill write's or the application's. A close frees the number whatever it returns (Linux: with
    ``EINTR`` and ``EIO`` too); what was written is ``fsync``'d, and its errors raised, before."""
    return functools.partial(collections.deque, itertools.chain(
        map(os.closerange, opened, map((1).__add__, opened)),
        map(_held_fds.pop, opened, itertools.repeat(None))), 0)


def fork_wait_until() -> float:
    """When the waits of the fork being prepared end: :data:`FORK_WAIT_CAP_S` after the first of our before-fork
    hooks asked, all of them together."""
    if not _wait_until:
        _wait_until.append(time.monotonic() + FORK_WAIT_CAP_S)
    return _wait_until[0]


def interrupt_after_fork() -> None:
    """Have the application get the ``KeyboardInterrupt`` that interrupted a before-fork hook's wait once the fork
    is done: raised by ``os.fork()`` in the parent, its child made (an exception out of a fork hook is only
    reported, "Exception ignored in"). Call from the hook's ``except KeyboardInterrupt``.

    The interrupt is SIGINT simulated again (``_thread.interrupt_main``), by an after-fork hook of C calls only,
    appended now, so that it runs after the after-fork hooks of Python registered so far: in a Python hook the
    interrupt would be raised again, and lost again. SIGINT's handler runs a second time."""
    if not _interrupts:
        _interrupts.append(signal.SIGINT)
    if not _interrupt_hooked:
        _interrupt_hooked.append(True)
        # sorting [SIGINT] by interrupt_main calls interrupt_main(SIGINT); sorting [] calls nothing
        os.register_at_fork(after_in_parent=functools.partial(sorted, _interrupts, key=_thread.interrupt_main))
        os.register_at_fork(after_in_parent=_interrupts.clear)


def _after_in_parent() -> None:
    _wait_until.clear()


def _after_in_child() -> None:
    _wait_until.clear()
    _interrupts.clear()
    for fd, file in list(_held_fds.items()):
        with contextlib.suppress(OSError):  # closed in the parent before the fork (see closer)
            info = os.fstat(fd)
            if file is None or (info.st_dev, info.st_ino) == file:
                os.close(fd)
    _held_fds.clear()
    # the forking thread is the only one: nobody holds _owners_lock in the child except a dead thread
    _owners_lock._at_fork_reinit()  # type: ignore[attr-defined]
    for ref, names in _owners:
        owner = ref()
        if owner is None:
            continue
        for name in names:
            lock = getattr(owner, name, None)
            reinit = getattr(lock, "_at_fork_reinit", None)
            if reinit is not None:
                reinit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=_after_in_parent, after_in_child=_after_in_child)
