"""An export that passed the shut-down check before ``shutdown()`` ran opens no writer after it.

``DagSpanExporter.export`` checked whether the exporter was shut down before taking its lock.
An export that passed that check while ``shutdown()`` was running waited for the lock, then
opened a new database writer that nothing would ever close (a connection, and on PostgreSQL a
server backend, left for the process's life) and wrote its batch after the shutdown had
logged its final counts (tenth fault campaign, left open there). The check is repeated under
the lock: such a batch is spilled, as any batch after ``shutdown()`` is.

The interleaving is forced, not waited for: the exporter's own lock is wrapped so that the
export thread stops right before taking it until ``shutdown()`` has returned.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel import phase, step, workflow


class _HeldAtEntry:
    """A lock whose first entry announces itself and waits for ``go`` before taking the lock."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.arrived = threading.Event()
        self.go = threading.Event()
        self._first = True

    def __enter__(self) -> Any:
        if self._first:
            self._first = False
            self.arrived.set()
            assert self.go.wait(60)
        return self.lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.lock.__exit__(*exc)


def test_an_export_waiting_for_the_lock_during_shutdown_opens_no_writer(tmp_path: Path, provider: Any) -> None:
    with workflow("race"), phase("control"), step(1, "fit", agent="engineer"):
        pass
    spans = list(provider.memory.get_finished_spans())
    assert spans

    exporter = DagSpanExporter(f"sqlite:///{tmp_path / 'dag.db'}", spill_dir=tmp_path / "spill")
    held = _HeldAtEntry(exporter._lock)
    exporter._lock = held  # type: ignore[assignment]
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(exporter.export(spans)))
    thread.start()
    assert held.arrived.wait(60)  # past the shut-down check, about to take the lock
    exporter.shutdown()
    held.go.set()
    thread.join(60)
    assert not thread.is_alive()
    stats = exporter.stats()
    assert exporter._writer is None, "a writer was opened after shutdown() and never closed"
    assert stats["exported"] == 0, stats  # nothing written after the shutdown's final counts
    assert stats["spilled"] == len(spans), stats  # kept for a later process, as after shutdown()

