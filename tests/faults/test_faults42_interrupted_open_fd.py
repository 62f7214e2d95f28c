"""Ctrl-C as ``os.open`` returns, the descriptor taken but not yet held by our code (fortieth fault campaign;
session 41's carried-over Left).

A signal handler runs when a call returns to Python code: a ``KeyboardInterrupt`` raised as ``os.open``
returned lost the descriptor with the return value, before the ``try`` that closes it: the SQLite folder's
creation lock (its descriptor and, in every process that forks from then on, nothing to close it),
a new database file's descriptor, a spill ``.tmp`` being written (its descriptor and the file itself),
a spill file read, a recovered ``.tmp``, the spill folder's fsync and the MARS work-dir walk leaked one each,
for the process's life. Each open now puts its descriptor into a list the caller holds, in the same C call
(``_forksafe.open_into``). Forced with ``conftest.interrupt_at`` at the first call return after a descriptor
on the file was opened: on main ``os.open``'s own return, now the first one Python code sees.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from cmbagent_otel import spill
from cmbagent_otel.dag.database import creation_lock, make_engine
from cmbagent_otel.integrations.cmbagent import work_dir_files
from cmbagent_otel.spill import SpillStore, read_spill

from .conftest import FDS, called_from, descriptors_on, interrupt_at, opened_on, plan_run_spans

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")


def _unlocked(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_creation_lock(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the folder's descriptor stays open."""
    with interrupt_at(opened_on(tmp_path)), creation_lock(tmp_path / "cmbagent.db"):
        pytest.fail("the block was entered")
    assert descriptors_on(tmp_path) == set()
    assert _unlocked(tmp_path)


def test_new_database_file(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the new file's descriptor stays open (``_create_private``)."""
    db = tmp_path / "cmbagent.db"
    with interrupt_at(opened_on(db)):
        make_engine(f"sqlite:///{db}").dispose()
    assert descriptors_on(db) == set()
    assert _unlocked(tmp_path)
    make_engine(f"sqlite:///{db}").dispose()  # and the next one goes on


def test_spill_write(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the ``.tmp``'s descriptor stays open and the ``.tmp`` is left."""
    folder = tmp_path / "spill"
    store = SpillStore(folder)
    spans = plan_run_spans("faults42", steps=1)
    folder.mkdir(mode=0o700)
    in_folder = str(folder).__add__("/")
    with interrupt_at(opened_on(lambda path: path.startswith(in_folder) and path.endswith(".tmp"))):
        store.append(spans)
    assert list(folder.iterdir()) == []
    assert descriptors_on(lambda path: path.startswith(str(folder))) == set()
    assert len(store.append(spans)) == 1  # the next spill goes on


@pytest.mark.parametrize("what", ["read", "recover", "fsync"])
def test_spill_reads(tmp_path: Path, what: str) -> None:
    """Fail on 4a0d79e: a spill file read (``_open_regular``), a dead writer's ``.tmp`` recovered (``_abandoned``),
    the folder's fsync after a write (``_fsync_dir``): each descriptor stays open."""
    folder = tmp_path / "spill"
    store = SpillStore(folder)
    [written] = store.append(plan_run_spans("faults42", steps=1))
    target: Path = written
    act: Callable[[], Any] = lambda: read_spill(written)  # noqa: E731
    if what == "recover":
        target = folder / "spill-00000000000000000001-999999999-000001.otlp.tmp"  # pid 999999999: not alive
        os.rename(written, target)
        os.utime(target, (time.time() - 3600, time.time() - 3600))
        act = store.recover
    elif what == "fsync":
        target = folder
        act = lambda: store.append(plan_run_spans("faults42", steps=1))  # noqa: E731
    with interrupt_at(opened_on(target)):
        act()
    assert descriptors_on(target) == set()


def test_mars_work_dir_walk(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the output folder's descriptor stays open (``_walk_files``)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "result.txt").write_text("x")
    with interrupt_at(opened_on(data)):
        work_dir_files(str(tmp_path))
    assert descriptors_on(data) == set()
    assert work_dir_files(str(tmp_path))[0].startswith("data/result.txt\t")


def test_spill_read_interrupted_as_its_file_object_is_made_raises_that_interrupt(tmp_path: Path) -> None:
    """Fails on 4a0d79e: ``SpillFileError`` (EBADF) instead of the ``KeyboardInterrupt``. Interrupted as
    ``os.fdopen`` returned, the file object, lost with the return value, closed the descriptor, and
    ``_open_regular``'s ``except`` closed the number again: ``EBADF`` replaced the application's interrupt
    (and a number another thread had just opened would have been closed under it). The file object is now
    made by ``io.open`` inside one C call that stores it, and closed (once) on the way out."""
    [written] = SpillStore(tmp_path / "spill").append(plan_run_spans("faults42", steps=1))
    opening = spill._open_regular.__code__

    def made(frame: FrameType, event: str, arg: Any) -> bool:  # on main os.fdopen's return; now that C call's
        return (event == "return" and frame.f_code is os.fdopen.__code__ and called_from(frame, opening)) or (
            event == "c_return" and frame.f_code is opening and getattr(arg, "__name__", "") == "extend")

    with interrupt_at(made):
        read_spill(written)
    assert descriptors_on(written) == set()
    assert read_spill(written).spans  # and the next read goes on
