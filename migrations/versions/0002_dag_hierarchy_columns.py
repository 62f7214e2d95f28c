"""Add dag_nodes.parent_node_id/depth and cost_records.agent_name to older cmbagent databases.

cmbagent's own Alembic chain never adds these columns (its runtime ALTERs add only
agent_name), so databases it built lack them. No-op where they already exist.

Revision ID: 0002_dag_hierarchy_columns
Revises: 0001_tracking_schema
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_dag_hierarchy_columns"
down_revision = "0001_tracking_schema"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def _indexes(table: str) -> set[str]:
    return {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(table) if i.get("name")}


def upgrade() -> None:
    cols = _columns("dag_nodes")
    if "parent_node_id" not in cols or "depth" not in cols:
        with op.batch_alter_table("dag_nodes") as batch:
            if "parent_node_id" not in cols:
                batch.add_column(sa.Column("parent_node_id", sa.String(36), nullable=True))
                batch.create_foreign_key(
                    "fk_dag_nodes_parent_node_id", "dag_nodes", ["parent_node_id"], ["id"], ondelete="CASCADE"
                )
            if "depth" not in cols:
                batch.add_column(sa.Column("depth", sa.Integer(), nullable=False, server_default="0"))
    if "idx_dag_nodes_parent_node_id" not in _indexes("dag_nodes"):
        op.create_index("idx_dag_nodes_parent_node_id", "dag_nodes", ["parent_node_id"])
    if "agent_name" not in _columns("cost_records"):
        with op.batch_alter_table("cost_records") as batch:
            batch.add_column(sa.Column("agent_name", sa.String(200), nullable=True))
    if "idx_cost_records_agent_name" not in _indexes("cost_records"):
        op.create_index("idx_cost_records_agent_name", "cost_records", ["agent_name"])


def downgrade() -> None:
    if "idx_cost_records_agent_name" in _indexes("cost_records"):
        op.drop_index("idx_cost_records_agent_name", table_name="cost_records")
    if "agent_name" in _columns("cost_records"):
        with op.batch_alter_table("cost_records") as batch:
            batch.drop_column("agent_name")
    if "idx_dag_nodes_parent_node_id" in _indexes("dag_nodes"):
        op.drop_index("idx_dag_nodes_parent_node_id", table_name="dag_nodes")
    cols = _columns("dag_nodes")
    fks = {fk.get("name") for fk in sa.inspect(op.get_bind()).get_foreign_keys("dag_nodes")}
    with op.batch_alter_table("dag_nodes") as batch:
        if "fk_dag_nodes_parent_node_id" in fks:
            batch.drop_constraint("fk_dag_nodes_parent_node_id", type_="foreignkey")
        if "parent_node_id" in cols:
            batch.drop_column("parent_node_id")
        if "depth" in cols:
            batch.drop_column("depth")
