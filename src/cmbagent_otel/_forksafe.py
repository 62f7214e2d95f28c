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

import contextlib
import functools
import os
import threading
import weakref
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock, nothing to give up
    fcntl = None  # type: ignore[assignment]

_owners: list[tuple[weakref.ref[Any], tuple[str, ...]]] = []
_owners_lock = threading.Lock()
# descriptors holding a flock of ours (spill files being written, the SQLite folder's creation lock)
_held_fds: set[int] = set()


def reset_in_child(owner: Any, *names: str) -> None:
    """Reset the locks ``owner.<name>`` (an object or a module, held weakly) in a forked child."""
    with _owners_lock:
        if len(_owners) >= 64:
            _owners[:] = [(ref, kept) for ref, kept in _owners if ref() is not None]
        _owners.append((weakref.ref(owner), names))


def hold_fd(fd: int) -> None:
    """Have a child forked from now on close ``fd`` at once (call before locking it)."""
    _held_fds.add(fd)


def open_into(opened: list[int], path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """``os.open(path, flags, mode, dir_fd=dir_fd)``, its descriptor appended to ``opened`` by the same C call
    that opened it (``list.extend`` over a ``map``: no Python code runs between the two), and returned.

    A signal handler runs when a call returns to Python code: a ``KeyboardInterrupt`` raised there as
    ``os.open`` returned lost the descriptor with the return value, before any ``try`` could hold it (a
    leaked descriptor, a folder or ``.tmp`` never unlocked, a ``.tmp`` never removed). The caller keeps
    ``opened`` in a ``try`` around this call whose ``finally`` (or ``except``) closes what it holds
    (:func:`close_opened`): an interrupt as this function returns finds the descriptor there."""
    opened.extend(map(functools.partial(os.open, flags=flags, mode=mode, dir_fd=dir_fd), (path,)))
    return opened[-1]


def close_opened(opened: list[int]) -> None:
    """:func:`close_held` each descriptor :func:`open_into` put into ``opened`` (once: the list is left as it
    was, so the caller can tell afterwards that the open succeeded)."""
    for fd in opened:
        close_held(fd)


def close_held(fd: int) -> None:
    """Unlock, forget and close ``fd`` (one :func:`hold_fd` was called for).

    In that order: ``LOCK_UN`` gives the lock up for every copy of the descriptor, so a child forked
    after ``fd`` is forgotten (it no longer closes its copy) and before it is closed holds no lock (it
    kept it for its whole life: a ``.tmp`` seen held by a live writer, a folder lock held); forgotten
    before closed, so a child never closes a number reused meanwhile. The close is in a ``finally``:
    a Ctrl-C at the unlock or the forgetting does not leak the descriptor."""
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks, or a descriptor already bad
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        try:
            _held_fds.discard(fd)
        finally:
            os.close(fd)


def _after_in_child() -> None:
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
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
    os.register_at_fork(after_in_child=_after_in_child)
