"""Ctrl-C as a ``DagReader`` is entered (47th fault campaign: the CLI's ``reading`` and the reader under it).

``DagReader.__enter__`` opens its connection and a read transaction, then inspects the tables; it closed them on a
database error only. A ``KeyboardInterrupt`` as one of its calls returned (``inspect``'s, the ``BEGIN``'s) left the
connection open, its read transaction with it, for as long as the interrupt's traceback was kept (it holds the
reader): on SQLite a snapshot every checkpoint stops at (the WAL grows without bound under a writer), on
PostgreSQL a ``REPEATABLE READ`` snapshot and the shared locks of the tables read (a migration waits on them). The
entry now closes on any exception.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.dag.query import DagReader

from .conftest import FDS, called_from, descriptors_on, each_interrupt

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")


def test_ctrl_c_as_a_reader_is_entered_leaves_no_connection_open(tmp_path: Path) -> None:
    """Fails on main 96d5dc3: the database file left open (its read transaction too) after each of the 5 calls
    after the connection's opening (``BEGIN``, ``inspect``, the tables' and columns' look-ups)."""
    db = tmp_path / "runs.db"
    upgrade(f"sqlite:///{db}")

    def read() -> None:
        with DagReader(f"sqlite:///{db}") as reader:
            reader.runs()

    left: list[str] = []
    points = 0
    # the entry of each function the reader's entry calls once its connection is open (a signal point each; the
    # points inside SQLAlchemy's connect, which holds the new connection in its own frames, are not ours)
    for point, raised in each_interrupt(read, lambda frame, event: event == "call"
                                        and called_from(frame, DagReader.__enter__.__code__)
                                        and bool(descriptors_on(db))):
        points += 1
        if descriptors_on(db):
            left.append(point)
            raised.clear()  # the reader, and its connection, go with the traceback
    assert points >= 3
    assert left == []
    assert not descriptors_on(db)
