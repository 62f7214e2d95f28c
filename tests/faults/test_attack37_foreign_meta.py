"""Another writer's run or node row whose ``meta`` is JSON of another shape (37th attack campaign).

The writer reads a run's stored ``meta`` (which writer made it, which span) and, for the derived
rows, every node's, with ``.get``. The 35th campaign made JSON nested past the parser's depth read
as none; a ``meta`` that is valid JSON but no object (``5``, ``[1, 2]``, ``"text"``, ``true``: cmbagent
or any program sharing the database may write one) raised ``AttributeError``, and an object whose
``otel_source`` is a list or whose ``span_id`` is a number raised ``TypeError``, in every later batch
of that run: each of its spans was dropped by the exporter (and rejected by the ingest, after writing
the chunk in halves down to single spans). Now such a meta reads as an empty object, such a source
as another writer's and such a span id as none.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cmbagent_otel.dag.writer import DagWriter

from .conftest import expected_keys, plan_run_spans, stored_spans

SHAPES = ["5", "[1, 2]", '"text"', "true", '{"otel_source": [1]}', '{"otel_source": "workflow", "span_id": 7}']


@pytest.mark.parametrize("table", ["workflow_runs", "dag_nodes"])
@pytest.mark.parametrize("meta", SHAPES)
def test_a_run_whose_stored_meta_another_writer_reshaped_is_written(tmp_path: Path, table: str, meta: str) -> None:
    url = f"sqlite:///{tmp_path / 'cmbagent.db'}"
    spans = plan_run_spans("reshaped")
    first, rest = spans[: len(spans) // 2], spans[len(spans) // 2:]
    writer = DagWriter(url)
    try:
        writer.write(first)
        writer.write([span for span in rest if span.parent is None])  # the run's own span, if not in first
        conn = sqlite3.connect(tmp_path / "cmbagent.db")
        with conn:  # another writer's rows
            conn.execute(f"UPDATE {table} SET meta = ?", (meta,))
        conn.close()
        # AttributeError / TypeError before, for every later batch of the run: the rest, then the
        # whole run again (batches sent twice: compared with the stored rows)
        writer.write(rest)
        writer.write(spans)
    finally:
        writer.close()
    stored = stored_spans(url)
    # the run row is another writer's now (an unknown source): never replaced by ours, as cmbagent's
    assert all(stored[key] for key in expected_keys([span for span in rest if span.parent is not None]))
