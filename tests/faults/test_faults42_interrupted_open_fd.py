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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import cmbagent_otel
from cmbagent_otel.dag.database import creation_lock, make_engine
from cmbagent_otel.integrations.cmbagent import work_dir_files
from cmbagent_otel.spill import SpillStore, read_spill

from .conftest import Hit, interrupt_at, plan_run_spans

_FDS = Path("/proc/self/fd")
_OURS = str(Path(cmbagent_otel.__file__).parent)
pytestmark = pytest.mark.skipif(not _FDS.is_dir(), reason="needs /proc/self/fd")


def _open_on(target: Path | Callable[[str], bool], among: Iterable[str] | None = None) -> set[str]:
    """This process's descriptors (of ``among``, default all) on ``target`` (a path, or a test of the path)."""
    match = target if callable(target) else str(target).__eq__
    found = set()
    for name in os.listdir(_FDS) if among is None else among:
        try:
            if match(os.readlink(_FDS / name)):
                found.add(name)
        except OSError:
            continue  # the listing's own descriptor, closed since
    return found


def _opened(target: Path | Callable[[str], bool]) -> Hit:
    """The first return of a C call (os.open's, or what holds its descriptor) to our code (where a signal handler
    runs) after a descriptor on ``target`` was opened: looked for in our code's calls only, among the
    descriptors opened since, for speed."""
    before = _open_on(lambda path: True)  # not the listing's own descriptor: the file's may take its number
    return lambda frame, event, arg: event == "c_return" and frame.f_code.co_filename.startswith(_OURS) \
        and bool(_open_on(target, set(os.listdir(_FDS)) - before))


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
    with interrupt_at(_opened(tmp_path)), creation_lock(tmp_path / "cmbagent.db"):
        pytest.fail("the block was entered")
    assert _open_on(tmp_path) == set()
    assert _unlocked(tmp_path)


def test_new_database_file(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the new file's descriptor stays open (``_create_private``)."""
    db = tmp_path / "cmbagent.db"
    with interrupt_at(_opened(db)):
        make_engine(f"sqlite:///{db}").dispose()
    assert _open_on(db) == set()
    assert _unlocked(tmp_path)
    make_engine(f"sqlite:///{db}").dispose()  # and the next one goes on


def test_spill_write(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the ``.tmp``'s descriptor stays open and the ``.tmp`` is left."""
    folder = tmp_path / "spill"
    store = SpillStore(folder)
    spans = plan_run_spans("faults42", steps=1)
    folder.mkdir(mode=0o700)
    in_folder = str(folder).__add__("/")
    with interrupt_at(_opened(lambda path: path.startswith(in_folder) and path.endswith(".tmp"))):
        store.append(spans)
    assert list(folder.iterdir()) == []
    assert _open_on(lambda path: path.startswith(str(folder))) == set()
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
    with interrupt_at(_opened(target)):
        act()
    assert _open_on(target) == set()


def test_mars_work_dir_walk(tmp_path: Path) -> None:
    """Fails on 4a0d79e: the output folder's descriptor stays open (``_walk_files``)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "result.txt").write_text("x")
    with interrupt_at(_opened(data)):
        work_dir_files(str(tmp_path))
    assert _open_on(data) == set()
    assert work_dir_files(str(tmp_path))[0].startswith("data/result.txt\t")
