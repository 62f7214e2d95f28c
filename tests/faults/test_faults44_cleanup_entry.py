"""Ctrl-C at the entry of the cleanup that closes our descriptors (44th fault campaign; session 43's Left).

Every ``os.open`` of ours stores its descriptor in a list as it opens it (``_forksafe.open_into``), and the
caller's ``finally`` closed what the list held with ``_forksafe.close_opened``, which called ``close_held`` per
descriptor. A signal handler runs when a Python function is entered: a ``KeyboardInterrupt`` there came before
either function's ``try`` and the descriptor stayed open (a held one kept its ``flock``: the SQLite folder's
creation lock, whose next wait in this process ran out ``_flock_within``'s bound; a spill file written, read or
recovered; a folder of a cmbagent work dir walked), one per Ctrl-C.

Each test runs one operation again and again with the interrupt at each point a signal handler can run (a
Python function's entry, a C call's return to our code: ``conftest.interrupt_at``) while a descriptor of the
operation is open, and requires none left open afterwards. A ``contextlib`` context manager's own frames are
left out: the generator of one interrupted there (as ``next()`` returns in ``__enter__`` or as ``__exit__`` is
entered) holds its descriptor until it is collected, as every such manager does (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from cmbagent_otel import _forksafe, spill
from cmbagent_otel.dag import database
from cmbagent_otel.integrations import cmbagent as cmbagent_integration

from .conftest import FDS, descriptors_on, interrupt_at, locked_elsewhere, plan_run_spans

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")

_CONTEXTLIB = contextlib.__file__
_OURS = str(Path(_forksafe.__file__).parent)


def _under(folder: Path) -> Callable[[str], bool]:
    return lambda target: target == str(folder) or target.startswith(f"{folder}/")


def _signal_point(frame: FrameType, event: str) -> bool:
    """Where a signal handler runs: a Python function's entry, or a C call's return to our code."""
    if frame.f_code.co_filename == _CONTEXTLIB:
        return False
    return event == "call" or (event == "c_return" and frame.f_code.co_filename.startswith(_OURS))


def _leaks(action: Callable[[], Any], folder: Path) -> list[str]:
    """Run ``action`` again and again, interrupted at its n-th signal point met while a descriptor on ``folder``
    is open (n = 1, 2, ... until a run meets fewer); the points after which one stayed open (the function
    entered, or the C call's caller)."""
    held = _under(folder)
    left: list[str] = []
    for n in itertools.count(1):
        seen: list[str] = []

        def nth(frame: FrameType, event: str, _arg: Any, n: int = n, seen: list[str] = seen) -> bool:
            if not (_signal_point(frame, event) and descriptors_on(held)):
                return False
            seen.append(f"{event} {frame.f_code.co_name}")
            return len(seen) == n

        try:
            with interrupt_at(nth):
                action()
        except pytest.fail.Exception:  # no n-th point in this run: every point was met
            assert n > 1, "no point with a descriptor open"
            return left
        if descriptors_on(held):
            left.append(seen[-1])
            for name in descriptors_on(held):  # not to leak into the next run
                os.close(int(name))
    raise AssertionError("unreachable")


def test_ctrl_c_in_a_sqlite_files_creation_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 5712a9c: left at ``call close_opened``, ``call close_held`` (the folder's and the file's)."""
    def create() -> None:
        path = tmp_path / "cmbagent.db"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        database._create_private(path)

    assert _leaks(create, tmp_path) == []
    assert not locked_elsewhere(tmp_path)


def test_ctrl_c_in_a_spill_write_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 5712a9c: left at the entries of ``close_opened`` and ``close_held`` (the ``.tmp``, the folder)."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    spans = plan_run_spans("written")
    assert _leaks(lambda: store.append(spans), tmp_path) == []


def test_ctrl_c_in_a_spill_read_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 5712a9c: left at ``call close_opened`` and ``call close_held`` (a FIFO refused after its open)."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    [written] = store.append(plan_run_spans("read"))
    fifo = written.with_name("fifo")
    os.mkfifo(fifo)

    def read() -> None:
        spill.read_spill(written)
        with contextlib.suppress(OSError):
            spill._open_regular(fifo)

    assert _leaks(read, tmp_path) == []


def test_ctrl_c_in_a_recover_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 5712a9c: left at the entries of ``close_opened`` and ``close_held`` in ``_abandoned``."""
    store = spill.SpillStore(tmp_path / "spill", target="sqlite:///x.db")
    [written] = store.append(plan_run_spans("recovered"))
    match = spill._NAME.match(written.name)
    assert match is not None, written.name
    dead = 2**22 + 12345  # above pid_max's default: never a live process
    final = written.with_name(written.name.replace(f"-{match.group('pid')}-", f"-{dead}-"))
    tmp = final.with_name(final.name + ".tmp")

    def recover() -> None:
        for path in (written, final):  # a complete .tmp of a dead writer again (recovered into place last time)
            if path.exists():
                os.replace(path, tmp)
        store.recover()

    assert _leaks(recover, tmp_path) == []


def test_ctrl_c_in_a_work_dir_walk_leaks_no_descriptor(tmp_path: Path) -> None:
    """Fails on 5712a9c: left at ``call close_opened`` and ``call close_held`` of each folder walked."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_text("x")

    def walk() -> None:
        cmbagent_integration._walk_files(str(tmp_path), ".", [], [1000])

    assert _leaks(walk, tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_after_a_held_descriptor_closed_leaves_the_number_reused_alone(tmp_path: Path) -> None:
    """The cleanup closes a held descriptor before it forgets it (no unlock first: it is one C call); a child
    forked between the two (another thread's fork while ``os.close`` runs without the GIL) must not close the
    number when another thread has opened something else on it meanwhile. Fails with a child closing by number
    alone: the application's file is closed in the child."""
    opened: list[int] = []
    _forksafe.open_into(opened, tmp_path, os.O_RDONLY)
    _forksafe.hold_fd(opened[0])
    os.close(opened[0])  # the cleanup's close, its forgetting not yet run
    application = os.open(tmp_path / "application.txt", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert application == opened[0], "the number was not reused: nothing to check"
        pid = os.fork()
        if pid == 0:  # the child: whether its copy of the application's file is still open
            os._exit(0 if os.path.exists(f"/proc/self/fd/{application}") else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child closed the application's file"
    finally:
        os.close(application)
        _forksafe._held_fds.pop(opened[0], None)
