"""Create cmbagent's other tables (files, checkpoints, projects, ...) where they do not exist.

cmbagent's backend queries them (files, execution-summary, resumable-nodes, play-from-node,
branching, sessions), so a database written only by the exporter must have them or those
endpoints fail with "no such table". Shapes are cmbagent's ``create_all`` schema (column
names, types, NOT NULL; defaults are Python-side in cmbagent). Written out here rather than
taken from the live models, so this revision never changes. A table that already exists
(cmbagent created it) is left as it is.

Revision ID: 0003_cmbagent_tables
Revises: 0002_dag_hierarchy_columns
Create Date: 2026-11-30
"""
from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0003_cmbagent_tables"
down_revision = "0002_dag_hierarchy_columns"
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column("id", sa.String(36), primary_key=True)


def _fk(name: str, target: str, ondelete: str, *, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.String(36), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def _json(name: str, *, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.JSON(), nullable=nullable)


def _projects() -> None:
    op.create_table(
        "projects", _id(),
        _fk("session_id", "sessions.id", "CASCADE", nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _json("meta"),
    )
    op.create_index("ix_projects_session_id", "projects", ["session_id"])


def _racing_groups() -> None:
    op.create_table(
        "racing_groups", _id(),
        _fk("parent_run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("parent_step_id", "workflow_steps.id", "CASCADE", nullable=False),
        sa.Column("strategy", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _fk("winner_branch_id", "branches.id", "SET NULL"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("resolved_at", sa.DateTime()),
        _json("meta"),
    )
    op.create_index("ix_racing_groups_parent_run_id", "racing_groups", ["parent_run_id"])
    op.create_index("ix_racing_groups_parent_step_id", "racing_groups", ["parent_step_id"])


def _checkpoints() -> None:
    op.create_table(
        "checkpoints", _id(),
        _fk("run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("step_id", "workflow_steps.id", "CASCADE"),
        sa.Column("checkpoint_type", sa.String(50), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _json("context_snapshot"),
        sa.Column("pickle_file_path", sa.String(500)),
        _json("meta"),
    )
    op.create_index("ix_checkpoints_run_id", "checkpoints", ["run_id"])
    op.create_index("ix_checkpoints_step_id", "checkpoints", ["step_id"])
    op.create_index("idx_checkpoints_run_created", "checkpoints", ["run_id", "created_at"])
    op.create_index("idx_checkpoints_type", "checkpoints", ["checkpoint_type"])


def _files() -> None:
    op.create_table(
        "files", _id(),
        _fk("run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("session_id", "sessions.id", "CASCADE"),
        _fk("step_id", "workflow_steps.id", "CASCADE"),
        _fk("event_id", "execution_events.id", "SET NULL"),
        _fk("node_id", "dag_nodes.id", "CASCADE"),
        sa.Column("file_path", sa.String(1000), nullable=False),
        sa.Column("file_type", sa.String(50), nullable=False),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("workflow_phase", sa.String(50)),
        sa.Column("is_final_output", sa.Boolean(), nullable=False),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("generating_agent", sa.String(100)),
        sa.Column("generating_code_hash", sa.String(64)),
        sa.Column("priority", sa.String(20)),
        _json("meta"),
    )
    for name, cols in (
        ("ix_files_run_id", ["run_id"]), ("ix_files_step_id", ["step_id"]), ("ix_files_file_type", ["file_type"]),
        ("ix_files_workflow_phase", ["workflow_phase"]), ("idx_files_run_type", ["run_id", "file_type"]),
        ("idx_files_created", ["created_at"]), ("idx_files_event", ["event_id"]), ("idx_files_node", ["node_id"]),
        ("idx_files_phase", ["run_id", "workflow_phase"]), ("idx_files_final_output", ["run_id", "is_final_output"]),
        ("idx_files_session", ["session_id"]),
    ):
        op.create_index(name, "files", cols)


def _state_history() -> None:
    op.create_table(
        "state_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("entity_type", sa.String(50), nullable=False),
        sa.Column("entity_id", sa.String(36), nullable=False),
        _fk("session_id", "sessions.id", "CASCADE", nullable=False),
        sa.Column("from_state", sa.String(50)),
        sa.Column("to_state", sa.String(50), nullable=False),
        sa.Column("transition_reason", sa.Text()),
        sa.Column("transitioned_by", sa.String(100)),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _json("meta"),
    )
    for name, cols in (
        ("ix_state_history_entity_type", ["entity_type"]), ("ix_state_history_entity_id", ["entity_id"]),
        ("ix_state_history_to_state", ["to_state"]), ("idx_state_history_entity", ["entity_type", "entity_id"]),
        ("idx_state_history_session", ["session_id"]), ("idx_state_history_created", ["created_at"]),
    ):
        op.create_index(name, "state_history", cols)


def _task_stages() -> None:
    op.create_table(
        "task_stages", _id(),
        _fk("parent_run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("child_run_id", "workflow_runs.id", "SET NULL"),
        sa.Column("stage_number", sa.Integer(), nullable=False),
        sa.Column("stage_name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
        _json("input_data"), _json("output_data"), _json("output_files"),
        sa.Column("error_message", sa.Text()),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("completed_at", sa.DateTime()),
        _json("meta"),
    )
    for name, cols in (
        ("ix_task_stages_child_run_id", ["child_run_id"]), ("idx_task_stages_parent_run", ["parent_run_id"]),
        ("idx_task_stages_status", ["status"]), ("idx_task_stages_parent_stage", ["parent_run_id", "stage_number"]),
    ):
        op.create_index(name, "task_stages", cols)


def _approval_requests() -> None:
    op.create_table(
        "approval_requests", _id(),
        _fk("run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("session_id", "sessions.id", "SET NULL"),
        _fk("step_id", "workflow_steps.id", "CASCADE"),
        sa.Column("approval_type", sa.String(50), nullable=False),
        _json("context", nullable=False),
        sa.Column("status", sa.String(20)),
        sa.Column("resolution", sa.String(20)),
        _json("result"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.Column("requested_at", sa.DateTime()),
        _json("context_snapshot"),
        sa.Column("user_feedback", sa.Text()),
    )
    for name, cols in (
        ("ix_approval_requests_run_id", ["run_id"]), ("ix_approval_requests_step_id", ["step_id"]),
        ("idx_approval_run_status", ["run_id", "status"]), ("idx_approval_expires", ["expires_at"]),
        ("idx_approval_session", ["session_id"]), ("idx_approval_status", ["status"]),
    ):
        op.create_index(name, "approval_requests", cols)


def _workflow_metrics() -> None:
    op.create_table(
        "workflow_metrics",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _fk("run_id", "workflow_runs.id", "CASCADE", nullable=False),
        _fk("step_id", "workflow_steps.id", "CASCADE"),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.Column("metric_name", sa.String(100), nullable=False),
        sa.Column("metric_value", sa.Numeric(), nullable=False),
        _json("meta"),
    )
    for name, cols in (
        ("ix_workflow_metrics_run_id", ["run_id"]), ("ix_workflow_metrics_step_id", ["step_id"]),
        ("ix_workflow_metrics_metric_name", ["metric_name"]), ("idx_workflow_metrics_run_name", ["run_id", "metric_name"]),
        ("idx_workflow_metrics_timestamp", ["timestamp"]),
    ):
        op.create_index(name, "workflow_metrics", cols)


def _active_connections() -> None:
    op.create_table(
        "active_connections", _id(),
        sa.Column("task_id", sa.String(100), nullable=False, unique=True),
        _fk("session_id", "sessions.id", "SET NULL"),
        sa.Column("server_instance", sa.String(100)),
        sa.Column("connected_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_index("idx_connection_heartbeat", "active_connections", ["last_heartbeat"])
    op.create_index("idx_connection_session", "active_connections", ["session_id"])


# parents first (racing_groups -> branches, files -> execution_events, ...)
TABLES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("projects", _projects), ("racing_groups", _racing_groups), ("checkpoints", _checkpoints), ("files", _files),
    ("state_history", _state_history), ("task_stages", _task_stages), ("approval_requests", _approval_requests),
    ("workflow_metrics", _workflow_metrics), ("active_connections", _active_connections),
)


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES:
        if name not in existing:
            create()


def downgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    ours = {name for name, _ in TABLES}
    # A table another one still points at (cmbagent's workflow_runs.project_id -> projects,
    # branches.racing_group_id -> racing_groups) stays, and so does one holding rows: both
    # may be cmbagent's, whose data and schema we never destroy.
    referenced = {fk["referred_table"] for table in existing - ours for fk in inspector.get_foreign_keys(table)}
    for name, _ in reversed(TABLES):
        if name not in existing or name in referenced:
            continue
        if bind.dialect.name == "postgresql":
            # locked before it is read: a row committed between the check and the drop went with the table
            bind.execute(sa.text(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE'))
        if bind.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is None:
            op.drop_table(name)
