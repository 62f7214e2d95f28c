"""A file lock of ours held when another thread of the application forks (thirty-sixth fault campaign).

``flock`` belongs to the open file description, which a forked child shares: the lock stays held
until the parent and the child have both closed it. The SQLite writer's ``creation_lock`` (an
exclusive ``flock`` on the database's folder, taken while it removes a deleted file's ``-wal`` and
``-shm`` or creates the file) was not given up by a child forked meanwhile (a ``multiprocessing``
worker started by another thread, with the ``fork`` start method): it stayed held for the child's
whole life, and every writer of that folder, in any process, waited for it with no bound the next
time its file was missing: the forking writer itself at once, creating the file again after its
clean-up, so the export hung for as long as the worker lived (main d1ab575). The spill store's ``.tmp`` locks
were already closed in the child; the child now closes every lock of ours it was forked with.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from cmbagent_otel.dag.writer import DagWriter

from .conftest import locked_elsewhere, plan_run_spans
from .test_faults34_interleavings import audit_actions, once_at  # noqa: F401 (a fixture)

HANG_S = 60  # a hang guard: the write takes milliseconds unless it waits for the worker



def _wait(conn: multiprocessing.connection.Connection) -> None:
    conn.recv()  # a long-lived worker: lives until the parent tells it to end


@pytest.mark.usefixtures("audit_actions")
def test_a_child_forked_while_the_writer_holds_its_folder_lock_does_not_keep_it(tmp_path: Path) -> None:
    db = tmp_path / "cmbagent.db"
    writer = DagWriter(f"sqlite:///{db}")
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    children: list[multiprocessing.process.BaseProcess] = []

    def fork_a_worker() -> None:  # what another thread of the application does at that moment
        child = context.Process(target=_wait, args=(child_end,), daemon=True)
        child.start()
        children.append(child)

    try:
        writer.write(plan_run_spans("before"))
        db.unlink()  # the user removes the database: the writer's clean-up runs under the folder lock
        fired: list[list[int]] = []

        def write_again() -> None:  # the export thread, which meets the deleted file
            fired.append(once_at("os.remove", lambda args: str(args[0]).endswith("-wal"), fork_a_worker))
            writer.write(plan_run_spans("after"))

        write = threading.Thread(target=write_again, daemon=True)
        write.start()
        write.join(HANG_S)
        if write.is_alive():  # d1ab575: creating the file again waits for the lock the worker keeps
            parent_end.send(None)
            write.join(HANG_S)
            pytest.fail("the write waited for the folder lock a forked worker kept")
        assert fired[0] and children[0].is_alive()
        assert not locked_elsewhere(tmp_path)  # nor any other writer of the folder
    finally:
        writer.close()
        if children and children[0].is_alive():
            parent_end.send(None)
        for child in children:
            child.join(60)
