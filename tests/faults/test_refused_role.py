"""A PostgreSQL role the database refuses keeps the spans, never drops them.

A role without INSERT/UPDATE on the tables (a read-only role given by mistake, grants
revoked), or whose transactions are read-only (``default_transaction_read_only``, a standby),
is refused on every row whatever the spans. That was taken for spans the database refuses:
every batch was written in halves down to single spans and every span dropped with a log
line each. Now the batch is spilled with one line saying why, and replayed once the role is
granted (by a new exporter: the next run of the application).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cmbagent_otel.dag.database import upgrade

from .conftest import expected_keys, stored_spans
from .test_schema_mismatch import run_spans

pytestmark = pytest.mark.postgres

REFUSALS = {
    "no-write-privilege": "GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}",
    "read-only-transactions": "GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}; "
                              "GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}; "
                              "ALTER ROLE {role} SET default_transaction_read_only = on",
}
GRANT = ("GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}; "
         "GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}; "
         "ALTER ROLE {role} RESET default_transaction_read_only")


@pytest.fixture
def role_url(pg_url: str) -> Iterator[tuple[str, str, str]]:
    """(the schema owner's URL, the same schema as a fresh role with USAGE only, the role's name)."""
    role = f"r_{uuid.uuid4().hex[:12]}"
    admin = create_engine(os.environ["CMBAGENT_OTEL_TEST_PG_URL"])
    with admin.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    try:
        yield pg_url, make_url(pg_url).set(username=role).render_as_string(hide_password=False), role
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def as_owner(url: str, statements: str, role: str) -> None:
    schema = make_url(url).query["options"].split("=", 1)[1]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
        for statement in statements.format(schema=schema, role=role).split("; "):
            conn.execute(text(statement))
    engine.dispose()


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_spans_are_spilled_then_replayed_once_the_role_is_granted(
        tmp_path: Path, capture, caplog: pytest.LogCaptureFixture, role_url: tuple[str, str, str],
        refusal: str) -> None:
    owner_url, url, role = role_url
    spans = run_spans(capture)
    upgrade(owner_url)  # the schema is its owner's
    as_owner(owner_url, REFUSALS[refusal], role)
    exporter = DagSpanExporter(url, timeout=0.5, spill_dir=tmp_path / "spill")
    try:
        exporter.export(spans)  # SUCCESS or not: kept in the spill store either way
        stats = exporter.stats()
        assert stats["dropped"] == 0 and stats["spilled"] == len(spans), stats
        assert "dropping span" not in caplog.text
        assert ("permission denied" in caplog.text) == (refusal == "no-write-privilege")
    finally:
        exporter.shutdown()
    assert stored_spans(owner_url) == {}
    as_owner(owner_url, GRANT, role)
    exporter = DagSpanExporter(url, timeout=5, spill_dir=tmp_path / "spill")
    try:
        assert exporter.replay() == (len(spans), 0)
    finally:
        exporter.shutdown()
    assert stored_spans(owner_url) == expected_keys(spans)


def test_a_role_that_cannot_create_the_schema_is_told_why(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         capture, role_url: tuple[str, str, str]) -> None:
    """The migration is refused (``permission denied for schema``) on every attempt, but the last
    attempt, left with what remains of the deadline, ends in a statement timeout: the log line
    named only that. It now names the first attempt's error too."""
    owner_url, url, role = role_url
    spans = run_spans(capture)
    as_owner(owner_url, "SELECT 1", role)  # USAGE on the empty schema, no CREATE
    exporter = DagSpanExporter(url, timeout=1, spill_dir=tmp_path / "spill")
    try:
        exporter.export(spans)
        assert exporter.stats()["spilled"] == len(spans)
    finally:
        exporter.shutdown()
    line = next(r.getMessage() for r in caplog.records if "spans kept in the spill store" in r.getMessage())
    assert "permission denied for schema" in line, line
