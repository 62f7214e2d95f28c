"""The SQLite database fills up mid-run (thirteenth fault campaign).

The fault campaign's disk-full test capped the database before the first connection; here it
fills while the run is under way: the run's row, its phase and first steps are stored, then
every connection to the file (the pooled ones the exporter already holds, and any it opens)
may not grow it (``PRAGMA max_page_count`` at the file's size: SQLite's "database or disk is
full", as on a full disk). The app runs on, later spans go to the spill store, and once the
space is back the rest of the run, replayed, is stored: the database ends as a run that never
met the fault (nothing lost, nothing stored twice).
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import Engine, event

from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.spill import SpillStore

from .conftest import cli, dump, reference
from .test_campaign import steps, traced

MAX_PAGES = 1073741823  # SQLite's default maximum


def _connections_to(db_path: Path) -> list[sqlite3.Connection]:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed
                if Path(obj.execute("PRAGMA database_list").fetchone()[2]) == db_path:
                    found.append(obj)
    return found


@contextlib.contextmanager
def fills_now(db_path: Path) -> Iterator[list[sqlite3.Connection]]:
    """From now on no connection to ``db_path`` may grow it past its size: the open ones (the
    exporter's pool) and those opened meanwhile. On exit the space comes back on all of them."""
    capped = _connections_to(db_path)
    pages = capped[0].execute("PRAGMA page_count").fetchone()[0] if capped else None
    assert pages, "the exporter holds no connection to the database yet"

    def cap(dbapi_connection: sqlite3.Connection, connection_record: object) -> None:
        if Path(dbapi_connection.execute("PRAGMA database_list").fetchone()[2]) == db_path:
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")
            capped.append(dbapi_connection)

    for conn in capped:
        conn.execute(f"PRAGMA max_page_count = {pages}")
    event.listen(Engine, "connect", cap)
    try:
        yield capped
    finally:
        event.remove(Engine, "connect", cap)
        for conn in capped:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                conn.execute(f"PRAGMA max_page_count = {MAX_PAGES}")


def big_steps(first: int, last: int) -> None:
    """Steps whose model calls carry long text: a batch of them needs new pages."""
    for number in range(first, last + 1):
        with step(number, f"step {number}"):
            for call in range(8):
                with TracedSpan(f"chat m{call}", "llm", {"gen_ai.request.model": "m",
                                                         "gen_ai.completion": "x" * 4000 + str(number)}):
                    pass


def test_database_full_mid_run_spills_then_stores_everything(tmp_path: Path) -> None:
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    spill_dir = tmp_path / "spill"
    exporter = DagSpanExporter(url, timeout=0.3, spill_dir=spill_dir)
    with traced(exporter, max_export_batch_size=32) as (provider, record, _), \
            workflow("fills", mode="planning-control"), phase("control"):
        steps(1, 2)
        assert provider.force_flush()
        stored_before = exporter.stats()["exported"]
        assert stored_before > 0
        with fills_now(db_path):
            big_steps(3, 6)  # the app runs on
            assert provider.force_flush(5000) is False  # spilled, not replayable yet
            full = exporter.stats()
            assert full["spilled"] > 0 and full["dropped"] == 0
        big_steps(7, 8)  # the next exports find space again and replay the spill
    spans = record.get_finished_spans()
    stats = exporter.stats()
    assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"]
    assert stats["exported"] + stats["replayed"] == len(spans)
    assert SpillStore(spill_dir).pending() == []
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")


def test_database_full_to_the_end_of_the_process_is_stored_by_replay(tmp_path: Path) -> None:
    """Still full when the run ends and the provider shuts down: the rest of the run (its end
    included) waits in the spill store, and ``cmbagent-otel replay`` stores it once there is space."""
    db_path = tmp_path / "cmbagent.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    spill_dir = tmp_path / "spill"
    exporter = DagSpanExporter(url, timeout=0.3, spill_dir=spill_dir)
    with contextlib.ExitStack() as space:
        with traced(exporter, max_export_batch_size=32) as (provider, record, _), \
                workflow("fills", mode="planning-control"), phase("control"):
            steps(1, 2)
            assert provider.force_flush()
            space.enter_context(fills_now(db_path))
            big_steps(3, 6)
        stats = exporter.stats()  # the provider has shut down, the database still full
        assert stats["spilled"] > 0 and stats["dropped"] == 0 and stats["replayed"] == 0
        assert SpillStore(spill_dir).pending()
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("SELECT status FROM workflow_runs").fetchall() == [("executing",)]
    spans = record.get_finished_spans()
    assert stats["exported"] + stats["spilled"] == len(spans)
    replay = cli("--db", url, "replay", "--spill-dir", str(spill_dir))
    assert replay.returncode == 0, replay.stderr
    assert SpillStore(spill_dir).pending() == []
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db")
