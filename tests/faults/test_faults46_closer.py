"""The descriptor cleanup runs every close (46th fault campaign; session 45's brief).

``_forksafe.closer`` is one call of C code (a ``deque`` consuming ``map`` objects over the descriptors: no
signal-handler window, see test_faults44_cleanup_entry). Its closes were ``os.close``, which raises: the first
close that failed stopped the cleanup, the descriptors after it stayed open (a held one locked), none was
forgotten by the fork handler's list, and from the caller's ``finally`` the close's error replaced what was
under way. The application closing one of our descriptors under us (a thread of it closing descriptors it
thinks are its own, a daemonising library's ``closerange``) makes the close fail with ``EBADF``: a spill file
written whole, ``fsync``'d and renamed into place was reported lost. Each close is now
``os.closerange(fd, fd + 1)``, which ignores the close's error.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from cmbagent_otel import _forksafe, spill

from .conftest import FDS, call_at, descriptors_on, locked_elsewhere, plan_run_spans

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")


def test_every_descriptor_is_closed_and_forgotten_when_one_close_fails(tmp_path: Path) -> None:
    """Fails on main: ``EBADF`` out of the cleanup, the second descriptor still open and locked, both held."""
    import fcntl  # POSIX only, as the lock under test

    gone = os.open(tmp_path, os.O_RDONLY)
    opened: list[int] = []
    close = _forksafe.closer(opened)
    _forksafe.open_into(opened, tmp_path, os.O_RDONLY)
    opened.insert(0, gone)
    for fd in opened:
        _forksafe.hold_fd(fd)
    fcntl.flock(opened[1], fcntl.LOCK_EX)
    os.close(gone)  # closed under us: its close fails with EBADF
    try:
        close()
    finally:
        left = descriptors_on(tmp_path)
        for name in left:
            os.close(int(name))
    assert not left
    assert not locked_elsewhere(tmp_path)
    assert not set(opened) & set(_forksafe._held_fds)


def test_a_spill_file_whose_descriptor_the_application_closed_is_spilled(tmp_path: Path) -> None:
    """The application closes the ``.tmp``'s descriptor after it was written, ``fsync``'d and renamed: the batch
    is spilled, its file reads back whole, no descriptor is left. Fails on main: ``OSError: [Errno 9] Bad file
    descriptor`` out of ``append``, the batch counted lost while its file is in place (replayed later)."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    spans = plan_run_spans("closed under us")

    def renamed(frame: FrameType, event: str, arg: Any) -> bool:
        return event == "c_return" and arg is os.replace and frame.f_code is spill.SpillStore._write.__code__

    def close_ours() -> None:
        for name in descriptors_on(lambda target: target.startswith(str(tmp_path / "spill"))):
            os.close(int(name))

    with call_at(renamed, close_ours) as ran:
        [written] = store.append(spans)
    assert ran, "os.replace was not reached"
    assert len(spill.read_spill(written).spans) == len(spans)
    assert not descriptors_on(lambda target: target.startswith(str(tmp_path)))
    assert not set(_forksafe._held_fds) - set(map(int, os.listdir(FDS)))  # none held that is closed
