"""Ctrl-C as our descriptor-holding blocks are entered or left (46th fault campaign; session 44's Left).

``database.creation_lock`` (the SQLite folder's ``flock``, taken to create the file) and ``spill._abandoned`` (a
``.tmp``'s ``flock``, taken by ``recover()``) were ``contextlib`` context managers, left out of
test_faults44_cleanup_entry's sweep: a ``KeyboardInterrupt`` as the generator yielded to ``__enter__`` (``next()``'s
return) or as ``__exit__`` was entered kept the descriptor, and its lock, until the suspended generator was
collected, i.e. for as long as the interrupt's traceback was kept (an interactive session keeps the last one):
the next creation in this process (or any other) waited out its bound, the ``.tmp`` looked written by a live
writer to every ``recover()``. Both are now ``_varblock.CExit`` blocks, whose exit is C code
(``_forksafe.closer``).

As test_faults44_cleanup_entry, each operation runs again and again, interrupted at its n-th signal point while
one of its descriptors is open, but every point (``contextlib``'s included) and with the interrupt kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

import pytest

from cmbagent_otel import spill
from cmbagent_otel.dag import database

from .conftest import FDS, descriptors_on, each_interrupt, locked_elsewhere, runs_under
from .test_faults41_held_descriptors import _abandoned_tmp

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")


def _held_after(action: Callable[[], Any], folder: Path, skip: CodeType | None = None) -> tuple[list[str], int]:
    """The points after which a descriptor on ``folder`` stayed open with the interrupt kept, and how many points
    there were: every point while one is open, none inside ``skip`` (a block's body: its exit decides)."""
    def held(target: str) -> bool:
        return target == str(folder) or target.startswith(f"{folder}/")

    left: list[str] = []
    points = 0
    # not inside logging's own functions: an interrupt between its module lock's acquire and its try (CPython's
    # hazard, any application's) left that lock held by this thread, and a later test's thread waited on it for ever
    for point, raised in each_interrupt(action, lambda frame, event: event in ("call", "c_return")
                                        and frame.f_globals.get("__name__") != logging.__name__
                                        and not runs_under(frame, skip) and bool(descriptors_on(held))):
        points += 1
        if descriptors_on(held):
            left.append(point)
            raised.clear()  # main: the suspended generator closes its descriptor now
            for name in descriptors_on(held):  # not to leak into the next run
                os.close(int(name))
    return left, points


def test_ctrl_c_as_the_sqlite_folder_lock_is_taken_or_let_go_leaves_it_free(tmp_path: Path) -> None:
    """Fails on main 75098e5: held after ``c_return __enter__`` (``next()``) and ``call __exit__``."""
    path = tmp_path / "cmbagent.db"

    def create() -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        database._create_private(path)

    left, points = _held_after(create, tmp_path)
    assert points >= 5
    assert left == []
    assert not locked_elsewhere(tmp_path)


def test_ctrl_c_as_a_recover_takes_or_lets_go_a_tmp_leaves_it_free(tmp_path: Path) -> None:
    """Fails on main 75098e5: the ``.tmp`` held after ``c_return __enter__`` (``next()``) and ``call __exit__``."""
    store, tmp = _abandoned_tmp(tmp_path)

    def recover() -> None:
        for path in store.directory.iterdir():  # a dead writer's complete .tmp again (recovered last time)
            os.replace(path, tmp)
        store.recover()

    left, points = _held_after(recover, tmp_path, skip=spill.read_spill.__code__)
    assert points >= 5
    assert left == []
    assert not any(locked_elsewhere(path) for path in store.directory.iterdir())
