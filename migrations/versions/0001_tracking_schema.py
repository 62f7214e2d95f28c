"""Create the tracking tables the DAG exporter writes (skips tables that already exist).

Written out here as explicit DDL (the shapes of ``dag/schema.py`` when this revision was
frozen), not taken from the live models: a later change to the models goes into a new
revision and never changes what this one creates.

Revision ID: 0001_tracking_schema
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001_tracking_schema"
down_revision = None
branch_labels = None
depends_on = None

TABLE_ORDER = (
    "sessions", "session_states", "workflow_runs", "workflow_steps", "dag_nodes", "dag_edges",
    "execution_events", "messages", "cost_records", "branches",
)


def _sessions() -> None:
    op.create_table("sessions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_active_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("resource_limits", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_sessions_status", "sessions", ["status"])
    op.create_index("idx_sessions_user_id", "sessions", ["user_id"])
    op.create_index("idx_sessions_user_status", "sessions", ["user_id", "status"])


def _session_states() -> None:
    op.create_table("session_states",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("mode", sa.String(length=50), nullable=False),
        sa.Column("conversation_history", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("context_variables", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("plan_data", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("current_phase", sa.String(length=50), nullable=True),
        sa.Column("current_step", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_session_states_mode", "session_states", ["mode"])
    op.create_index("idx_session_states_session_id", "session_states", ["session_id"])
    op.create_index("idx_session_states_session_status", "session_states", ["session_id", "status"])
    op.create_index("idx_session_states_status", "session_states", ["status"])
    op.create_index("idx_session_states_updated_at", "session_states", ["updated_at"])


def _workflow_runs() -> None:
    op.create_table("workflow_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=36), nullable=True),
        sa.Column("mode", sa.String(length=50), nullable=False),
        sa.Column("agent", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("checkpoint_frequency_minutes", sa.Integer(), nullable=False),
        sa.Column("task_description", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("branch_parent_id", sa.String(length=36), nullable=True),
        sa.Column("is_branch", sa.Boolean(), nullable=False),
        sa.Column("branch_depth", sa.Integer(), nullable=False),
        sa.Column("parent_run_id", sa.String(length=36), nullable=True),
        sa.Column("stage_number", sa.Integer(), nullable=True),
        sa.Column("stage_name", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(["branch_parent_id"], ["workflow_runs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["parent_run_id"], ["workflow_runs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_workflow_runs_agent", "workflow_runs", ["agent"])
    op.create_index("idx_workflow_runs_agent_status", "workflow_runs", ["agent", "status"])
    op.create_index("idx_workflow_runs_mode", "workflow_runs", ["mode"])
    op.create_index("idx_workflow_runs_session_id", "workflow_runs", ["session_id"])
    op.create_index("idx_workflow_runs_session_status", "workflow_runs", ["session_id", "status"])
    op.create_index("idx_workflow_runs_status", "workflow_runs", ["status"])
    op.create_index(op.f("ix_workflow_runs_branch_parent_id"), "workflow_runs", ["branch_parent_id"])
    op.create_index(op.f("ix_workflow_runs_parent_run_id"), "workflow_runs", ["parent_run_id"])


def _dag_nodes() -> None:
    op.create_table("dag_nodes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("parent_node_id", sa.String(length=36), nullable=True),
        sa.Column("node_type", sa.String(length=50), nullable=False),
        sa.Column("agent", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("order_index", sa.Integer(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["parent_node_id"], ["dag_nodes.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_dag_nodes_node_type", "dag_nodes", ["node_type"])
    op.create_index("idx_dag_nodes_parent_node_id", "dag_nodes", ["parent_node_id"])
    op.create_index("idx_dag_nodes_run_id", "dag_nodes", ["run_id"])
    op.create_index("idx_dag_nodes_run_order", "dag_nodes", ["run_id", "order_index"])
    op.create_index("idx_dag_nodes_session_id", "dag_nodes", ["session_id"])
    op.create_index("idx_dag_nodes_status", "dag_nodes", ["status"])
    op.create_index("idx_dag_nodes_type_status", "dag_nodes", ["node_type", "status"])


def _workflow_steps() -> None:
    op.create_table("workflow_steps",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("goal", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("progress_percentage", sa.Integer(), nullable=False),
        sa.Column("inputs", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("outputs", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.CheckConstraint("progress_percentage >= 0 AND progress_percentage <= 100", name="check_progress_range"),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_workflow_steps_run_id", "workflow_steps", ["run_id"])
    op.create_index("idx_workflow_steps_run_number", "workflow_steps", ["run_id", "step_number"])
    op.create_index("idx_workflow_steps_session_id", "workflow_steps", ["session_id"])
    op.create_index("idx_workflow_steps_session_status", "workflow_steps", ["session_id", "status"])
    op.create_index("idx_workflow_steps_status", "workflow_steps", ["status"])


def _branches() -> None:
    op.create_table("branches",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("parent_run_id", sa.String(length=36), nullable=False),
        sa.Column("parent_step_id", sa.String(length=36), nullable=False),
        sa.Column("child_run_id", sa.String(length=36), nullable=False),
        sa.Column("branch_name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("hypothesis", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("racing_group_id", sa.String(length=36), nullable=True),
        sa.Column("racing_priority", sa.Integer(), nullable=True),
        sa.Column("racing_status", sa.String(length=20), nullable=True),
        sa.ForeignKeyConstraint(["child_run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_step_id"], ["workflow_steps.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_branches_child_run_id", "branches", ["child_run_id"])
    op.create_index("idx_branches_parent_run_id", "branches", ["parent_run_id"])
    op.create_index("idx_branches_parent_step_id", "branches", ["parent_step_id"])


def _cost_records() -> None:
    op.create_table("cost_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=36), nullable=True),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("agent_name", sa.String(length=200), nullable=True),
        sa.Column("parent_run_id", sa.String(length=36), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=10, scale=6), nullable=False),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["parent_run_id"], ["workflow_runs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["step_id"], ["workflow_steps.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_cost_records_agent_name", "cost_records", ["agent_name"])
    op.create_index("idx_cost_records_model", "cost_records", ["model"])
    op.create_index("idx_cost_records_parent_run_id", "cost_records", ["parent_run_id"])
    op.create_index("idx_cost_records_run_id", "cost_records", ["run_id"])
    op.create_index("idx_cost_records_run_timestamp", "cost_records", ["run_id", "timestamp"])
    op.create_index("idx_cost_records_session_id", "cost_records", ["session_id"])
    op.create_index("idx_cost_records_session_timestamp", "cost_records", ["session_id", "timestamp"])
    op.create_index("idx_cost_records_step_id", "cost_records", ["step_id"])


def _dag_edges() -> None:
    op.create_table("dag_edges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("from_node_id", sa.String(length=36), nullable=False),
        sa.Column("to_node_id", sa.String(length=36), nullable=False),
        sa.Column("dependency_type", sa.String(length=50), nullable=False),
        sa.Column("condition", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["from_node_id"], ["dag_nodes.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["to_node_id"], ["dag_nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_dag_edges_from", "dag_edges", ["from_node_id"])
    op.create_index("idx_dag_edges_from_to", "dag_edges", ["from_node_id", "to_node_id"])
    op.create_index("idx_dag_edges_to", "dag_edges", ["to_node_id"])


def _execution_events() -> None:
    op.create_table("execution_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=True),
        sa.Column("step_id", sa.String(length=36), nullable=True),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("parent_event_id", sa.String(length=36), nullable=True),
        sa.Column("event_type", sa.String(length=50), nullable=False),
        sa.Column("event_subtype", sa.String(length=50), nullable=True),
        sa.Column("agent_name", sa.String(length=100), nullable=True),
        sa.Column("agent_role", sa.String(length=50), nullable=True),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("inputs", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("outputs", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("execution_order", sa.Integer(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["dag_nodes.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_event_id"], ["execution_events.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["step_id"], ["workflow_steps.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_events_agent_name", "execution_events", ["agent_name"])
    op.create_index("idx_events_event_type", "execution_events", ["event_type"])
    op.create_index("idx_events_node_id", "execution_events", ["node_id"])
    op.create_index("idx_events_node_order", "execution_events", ["node_id", "execution_order"])
    op.create_index("idx_events_parent_event_id", "execution_events", ["parent_event_id"])
    op.create_index("idx_events_run_id", "execution_events", ["run_id"])
    op.create_index("idx_events_run_order", "execution_events", ["run_id", "execution_order"])
    op.create_index("idx_events_session_id", "execution_events", ["session_id"])
    op.create_index("idx_events_session_timestamp", "execution_events", ["session_id", "timestamp"])
    op.create_index("idx_events_step_id", "execution_events", ["step_id"])
    op.create_index("idx_events_timestamp", "execution_events", ["timestamp"])
    op.create_index("idx_events_type_subtype", "execution_events", ["event_type", "event_subtype"])


def _messages() -> None:
    op.create_table("messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=36), nullable=True),
        sa.Column("event_id", sa.String(length=36), nullable=True),
        sa.Column("node_id", sa.String(length=36), nullable=True),
        sa.Column("sender", sa.String(length=100), nullable=False),
        sa.Column("recipient", sa.String(length=100), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["execution_events.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["node_id"], ["dag_nodes.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["step_id"], ["workflow_steps.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("idx_messages_event_id", "messages", ["event_id"])
    op.create_index("idx_messages_node_id", "messages", ["node_id"])
    op.create_index("idx_messages_recipient", "messages", ["recipient"])
    op.create_index("idx_messages_run_id", "messages", ["run_id"])
    op.create_index("idx_messages_run_timestamp", "messages", ["run_id", "timestamp"])
    op.create_index("idx_messages_sender", "messages", ["sender"])
    op.create_index("idx_messages_sender_recipient", "messages", ["sender", "recipient"])
    op.create_index("idx_messages_step_id", "messages", ["step_id"])


# parents before children (foreign keys)
CREATE: tuple[tuple[str, Callable[[], None]], ...] = (
    ("sessions", _sessions), ("session_states", _session_states), ("workflow_runs", _workflow_runs),
    ("dag_nodes", _dag_nodes), ("workflow_steps", _workflow_steps), ("branches", _branches),
    ("cost_records", _cost_records), ("dag_edges", _dag_edges), ("execution_events", _execution_events),
    ("messages", _messages),
)


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    # A database cmbagent already created keeps its tables; 0002 adds missing columns.
    for name, create in CREATE:
        if name not in existing:
            create()


def downgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    # Only empty tables are dropped: they may belong to cmbagent, whose data we never destroy.
    for name in reversed(TABLE_ORDER):
        if name not in existing:
            continue
        if bind.dialect.name == "postgresql":
            # locked before it is read: a row committed between the check and the drop went with the table
            bind.execute(sa.text(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE'))
        if bind.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is None:
            op.drop_table(name)
