"""``set_attribute`` of a workflow block carrying a secret or a huge value.

The blocks' arguments and their ``attributes=`` are redacted and bounded, but the handle API's
``set_attribute(key, value)`` (the attribute an application adds inside the block) put the value
on the span as given: a value under a secret-named key, a key quoted in text and a megabyte string
went whole to every exporter (the DAG exporter scrubs again, the OTLP payload and the console
did not). It now goes through the same treatment as ``attributes=``.
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any

from cmbagent_otel import phase, redo, step, workflow
from cmbagent_otel.redaction import REDACTED


def test_set_attribute_is_redacted_and_bounded_on_every_block(provider: Any, tmp_path: Any) -> None:
    key = "sk-proj-" + secrets.token_hex(20)
    password = "pw" + secrets.token_hex(8)
    with workflow("w", max_redos=1) as run, phase("control") as control, step(1, "fit") as fit:
        for block in (run, control, fit):
            block.set_attribute("api_key", key)
            block.set_attribute("db_password", password)
            block.set_attribute("note", f"called with {key} at last")
            block.set_attribute("big", "x" * 1_000_000)
            block.set_attribute("rounds", 3)
        with redo(1, 1) as again:
            again.set_attribute("note", f"token {key}")
            again.set_attribute("rounds", 4)
    spans = {s.name: s for s in provider.memory.get_finished_spans()}
    for name in ("workflow w", "phase control", "step 1"):
        attrs = spans[name].attributes
        assert attrs["api_key"] == REDACTED and attrs["db_password"] == REDACTED
        assert key not in attrs["note"] and attrs["note"].startswith("called with ")
        assert len(attrs["big"]) < 5000
        assert attrs["rounds"] == 3
    redone = spans["redo step 1 attempt 1"].attributes
    assert key not in redone["note"] and redone["rounds"] == 4
    for span in spans.values():
        assert key not in repr(dict(span.attributes)) and password not in repr(dict(span.attributes))
    url = f"sqlite:///{tmp_path}/dag.db"
    provider.store(url)
    with sqlite3.connect(f"{tmp_path}/dag.db") as conn:
        dumped = "\n".join(str(row) for table, in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                           for row in conn.execute(f'SELECT * FROM "{table}"'))
    assert key not in dumped and password not in dumped
