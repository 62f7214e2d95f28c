"""The descriptors holding a file lock of ours, at a Ctrl-C and at a fork (thirty-ninth fault campaign).

The SQLite folder's ``creation_lock``, the spill store's ``.tmp`` being written (``_write``) and the ``.tmp``
a ``recover()`` looks at (``_abandoned``) each open a descriptor, register it with ``_forksafe.hold_fd`` (a
child forked meanwhile closes its copy) and ``flock`` it.

* A ``KeyboardInterrupt`` at the ``hold_fd`` call (a signal handler runs when a call starts) came before the
  ``try`` that closes the descriptor: it leaked, one per Ctrl-C (``creation_lock``, ``_abandoned``; ``_write``
  at its ``_hold`` call, whose ``try`` closed nothing).
* The spill store forgot the descriptor and then closed it without ``LOCK_UN``: a child forked between the
  two (another thread's ``multiprocessing`` worker) no longer closed its copy and kept the lock for its whole
  life (a ``.tmp`` seen held by a live writer by every ``recover()``).

Each fault is forced at its exact point with ``sys.setprofile``, as ``test_faults38_interrupted_start.py``
does; the fork is a real ``os.fork()`` there, the lock seen with a real ``flock`` from another descriptor.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

from cmbagent_otel import _forksafe, spill
from cmbagent_otel.dag import database

from .conftest import locked_elsewhere, plan_run_spans


def _open_under(folder: Path) -> list[str]:
    """What this process's open descriptors name inside ``folder`` (or the folder itself)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target == str(folder) or target.startswith(f"{folder}/"):
                names.append(target)
    return names


@contextlib.contextmanager
def _interrupt_at_call(callee: CodeType, caller: CodeType) -> Iterator[list[BaseException]]:
    """Raise a ``KeyboardInterrupt`` when ``caller`` calls ``callee`` (before its first line), once."""
    raised: list[BaseException] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is callee and frame.f_back is not None \
                and frame.f_back.f_code is caller and not raised:
            raised.append(KeyboardInterrupt())
            raise raised[-1]  # the interpreter removes the hook when it raises

    sys.setprofile(profile)
    try:
        yield raised
    finally:
        sys.setprofile(None)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_ctrl_c_at_creation_locks_hold_fd_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 3c387d5: the folder's descriptor stays open after the interrupt."""
    with _interrupt_at_call(_forksafe.hold_fd.__code__, database._FolderLock.__enter__.__code__) as raised, \
            pytest.raises(KeyboardInterrupt) as caught, database.creation_lock(tmp_path / "cmbagent.db"):
        pytest.fail("the block ran")
    assert raised and caught.value is raised[0]
    assert _open_under(tmp_path) == []
    with database.creation_lock(tmp_path / "cmbagent.db"):  # and the folder is not left locked
        assert _open_under(tmp_path) == [str(tmp_path)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_ctrl_c_at_a_spill_writes_hold_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 3c387d5: the ``.tmp``'s descriptor stays open (its file unlinked) after the interrupt."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    with _interrupt_at_call(spill._hold.__code__, spill.SpillStore._write.__code__) as raised, \
            pytest.raises(KeyboardInterrupt) as caught:
        store.append(plan_run_spans("interrupted"))
    assert raised and caught.value is raised[0]
    assert _open_under(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == []  # nothing half-written left
    assert len(store.append(plan_run_spans("after"))) == 1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_ctrl_c_at_recovers_hold_fd_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 3c387d5: the abandoned ``.tmp``'s descriptor stays open after the interrupt."""
    store, tmp = _abandoned_tmp(tmp_path)
    with _interrupt_at_call(_forksafe.hold_fd.__code__, spill._Abandoned._held.__code__) as raised, \
            pytest.raises(KeyboardInterrupt) as caught:
        store.recover()
    assert raised and caught.value is raised[0]
    assert _open_under(tmp_path) == []
    assert store.recover() == 1 and not tmp.exists()  # a later recover() takes it


def _abandoned_tmp(tmp_path: Path) -> tuple[spill.SpillStore, Path]:
    """A spill store holding a complete ``.tmp`` whose writer died (a pid that is not alive)."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    [written] = store.append(plan_run_spans("recovered"))
    match = spill._NAME.match(written.name)
    assert match is not None, written.name
    dead = 2**22 + 12345  # above pid_max's default: never a live process
    tmp = written.with_name(written.name.replace(f"-{match.group('pid')}-", f"-{dead}-") + ".tmp")
    written.rename(tmp)
    return store, tmp



@contextlib.contextmanager
def _fork_at_close(where: set[CodeType], at: str = "close()") -> Iterator[list[int]]:
    """Fork (a child that lives until this block ends) when a frame whose code is in ``where`` is about to run
    its cleanup (the line ``close()`` of its ``finally``: since session 44 one C call that closes and then
    forgets, ``_forksafe.closer``; before, the ``os.close`` of a descriptor ``_forksafe`` no longer held, in the
    helpers it called), or the line starting with ``at`` (the last of a block whose exit is that call): what
    another thread's fork at that instant does. Yields the child's pid (once forked)."""
    children: list[int] = []
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        if not children and event == "line" \
                and linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip().startswith(at):
            pid = os.fork()
            if pid == 0:  # the child: holds what it was forked with until told to end
                sys.settrace(None)
                os.close(write_end)
                os.write(ready_write, b".")  # its fork handlers (which close our held copies) have run
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
            os.read(ready_read, 1)  # a copy the child closes is closed before the parent looks at the lock
        return line

    sys.settrace(lambda frame, event, arg: line if frame.f_code in where else None)
    try:
        yield children
    finally:
        sys.settrace(None)
        os.close(write_end)  # the child's read ends
        for pid in children:
            os.waitpid(pid, 0)
        for fd in (read_end, ready_read, ready_write):
            os.close(fd)


def test_a_child_forked_as_a_spill_file_is_closed_keeps_no_lock(tmp_path: Path) -> None:
    """Fails on 3c387d5: the spill file just written stays locked by the child."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    with _fork_at_close({spill.SpillStore._write.__code__}) as children:
        [written] = store.append(plan_run_spans("written"))
        assert children, "no fork at the close"
        assert not locked_elsewhere(written)


def test_a_child_forked_as_recover_closes_a_tmp_keeps_no_lock(tmp_path: Path) -> None:
    """Fails on 3c387d5: the ``.tmp`` recover() cannot read now stays locked by the child, so every later
    recover() takes it for one a live writer holds."""
    store, tmp = _abandoned_tmp(tmp_path)
    owner = tmp.stat().st_uid
    if owner == 0:
        os.chown(tmp, 65534, -1)  # another user's (SpillUnreadable): left for a later recover()
    else:
        tmp.chmod(0)  # cannot be read now (SpillUnreadable): left for a later recover()
    # the block's exit (session 46: _varblock.CExit) is the closer's C call: forked at the block's last line
    with _fork_at_close({spill.SpillStore.recover.__code__}, at="continue  # cannot tell now") as children:
        assert store.recover() == 0
        assert children, "no fork at the close"
        os.chown(tmp, owner, -1) if owner == 0 else tmp.chmod(0o600)
        assert not locked_elsewhere(tmp)
        assert store.recover() == 1 and not tmp.exists()
