"""Create the tracking tables the DAG exporter writes (skips tables that already exist).

Revision ID: 0001_tracking_schema
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cmbagent_otel.dag.schema import metadata

revision = "0001_tracking_schema"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here: later revisions add tables to the models, not to this revision.
TABLE_ORDER = (
    "sessions", "session_states", "workflow_runs", "workflow_steps", "dag_nodes", "dag_edges",
    "execution_events", "messages", "cost_records", "branches",
)


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    # A database cmbagent already created keeps its tables; 0002 adds missing columns.
    tables = [metadata.tables[name] for name in TABLE_ORDER if name not in existing]
    metadata.create_all(bind, tables=tables, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    # Only empty tables are dropped: they may belong to cmbagent, whose data we never destroy.
    for name in reversed(TABLE_ORDER):
        if name not in existing:
            continue
        if bind.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is None:
            op.drop_table(name)
