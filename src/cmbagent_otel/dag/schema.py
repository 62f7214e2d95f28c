"""SQLAlchemy Core tables of cmbagent's tracking schema: the tables the DAG exporter writes and
the other tables cmbagent's backend queries.

Table names, column names, types and NOT NULL flags follow cmbagent's ``models.py`` as
built by ``create_all`` (see ``docs/dag.md``). Defaults are Python-side only in cmbagent,
so the writer fills every NOT NULL column explicitly. Two foreign keys of cmbagent's
models are left out because their tables came later than ours (revision
``0003_cmbagent_tables``) and adding a key to an existing SQLite table means rebuilding
it: ``workflow_runs.project_id`` -> ``projects`` and ``branches.racing_group_id`` ->
``racing_groups``; the columns exist.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    func,
)

__all__ = ["CMBAGENT_TABLES", "TABLE_ORDER", "TRACKING_TABLES", "metadata"]

# Core tables, not ORM classes: nothing maps rows to objects, and declarative classes cost ~0.3 s
# of CPU and ~10,000 objects at every instrument() (the ORM import and each mapper's setup)
metadata = MetaData()
"""Every table of the tracking schema."""

# ``sessions``: a user session; runs hang below it.
Table(
    "sessions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36)),
    Column("name", String(255), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_active_at", DateTime, nullable=False),
    Column("status", String(50), nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Column("resource_limits", JSON(none_as_null=True), nullable=True),
    Index("idx_sessions_status", "status"),
    Index("idx_sessions_user_id", "user_id"),
    Index("idx_sessions_user_status", "user_id", "status"),
)

# ``session_states``: needed for a session to be listed by cmbagent's UI.
Table(
    "session_states",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("mode", String(50), nullable=False),
    Column("conversation_history", JSON(none_as_null=True), nullable=True),
    Column("context_variables", JSON(none_as_null=True), nullable=True),
    Column("plan_data", JSON(none_as_null=True), nullable=True),
    Column("current_phase", String(50)),
    Column("current_step", Integer),
    Column("status", String(20)),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), server_default=func.now()),
    Column("expires_at", DateTime(timezone=True)),
    Column("version", Integer),
    Index("idx_session_states_session_id", "session_id"),
    Index("idx_session_states_status", "status"),
    Index("idx_session_states_session_status", "session_id", "status"),
    Index("idx_session_states_mode", "mode"),
    Index("idx_session_states_updated_at", "updated_at"),
)

# ``workflow_runs``: one run (one trace).
Table(
    "workflow_runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("project_id", String(36)),
    Column("mode", String(50), nullable=False),
    Column("agent", String(100), nullable=False),
    Column("model", String(100), nullable=False),
    Column("status", String(50), nullable=False),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("last_heartbeat_at", DateTime),
    Column("checkpoint_frequency_minutes", Integer, nullable=False),
    Column("task_description", Text),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Column("branch_parent_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True),
    Column("is_branch", Boolean, nullable=False),
    Column("branch_depth", Integer, nullable=False),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True),
    Column("stage_number", Integer),
    Column("stage_name", String(100)),
    Index("idx_workflow_runs_session_id", "session_id"),
    Index("idx_workflow_runs_mode", "mode"),
    Index("idx_workflow_runs_agent", "agent"),
    Index("idx_workflow_runs_status", "status"),
    Index("idx_workflow_runs_session_status", "session_id", "status"),
    Index("idx_workflow_runs_agent_status", "agent", "status"),
)

# ``workflow_steps``: written only for steps that have redo branches.
Table(
    "workflow_steps",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("step_number", Integer, nullable=False),
    Column("goal", Text, nullable=False),
    Column("summary", Text),
    Column("status", String(50), nullable=False),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("progress_percentage", Integer, nullable=False),
    Column("inputs", JSON(none_as_null=True), nullable=True),
    Column("outputs", JSON(none_as_null=True), nullable=True),
    Column("error_message", Text),
    Column("meta", JSON(none_as_null=True), nullable=True),
    CheckConstraint("progress_percentage >= 0 AND progress_percentage <= 100", name="check_progress_range"),
    Index("idx_workflow_steps_run_id", "run_id"),
    Index("idx_workflow_steps_session_id", "session_id"),
    Index("idx_workflow_steps_status", "status"),
    Index("idx_workflow_steps_run_number", "run_id", "step_number"),
    Index("idx_workflow_steps_session_status", "session_id", "status"),
)

# ``dag_nodes``: phases, steps, redo branches, branch points, sub-agent calls, terminator.
Table(
    "dag_nodes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("parent_node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE")),
    Column("node_type", String(50), nullable=False),
    Column("agent", String(100)),
    Column("status", String(50), nullable=False),
    Column("order_index", Integer, nullable=False),
    Column("depth", Integer, nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("idx_dag_nodes_run_id", "run_id"),
    Index("idx_dag_nodes_session_id", "session_id"),
    Index("idx_dag_nodes_node_type", "node_type"),
    Index("idx_dag_nodes_status", "status"),
    Index("idx_dag_nodes_parent_node_id", "parent_node_id"),
    Index("idx_dag_nodes_run_order", "run_id", "order_index"),
    Index("idx_dag_nodes_type_status", "node_type", "status"),
)

# ``dag_edges``: no run_id and no unique key; edges belong to the run of their from-node.
Table(
    "dag_edges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("from_node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("to_node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("dependency_type", String(50), nullable=False),
    Column("condition", Text),
    Index("idx_dag_edges_from", "from_node_id"),
    Index("idx_dag_edges_to", "to_node_id"),
    Index("idx_dag_edges_from_to", "from_node_id", "to_node_id"),
)

# ``execution_events``: every span that is not a DAG node or the run itself.
Table(
    "execution_events",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE")),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="SET NULL")),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("parent_event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL")),
    Column("event_type", String(50), nullable=False),
    Column("event_subtype", String(50)),
    Column("agent_name", String(100)),
    Column("agent_role", String(50)),
    Column("timestamp", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("duration_ms", Integer),
    Column("inputs", JSON(none_as_null=True), nullable=True),
    Column("outputs", JSON(none_as_null=True), nullable=True),
    Column("error_message", Text),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Column("execution_order", Integer, nullable=False),
    Column("depth", Integer, nullable=False),
    Column("status", String(50), nullable=False),
    Index("idx_events_run_id", "run_id"),
    Index("idx_events_node_id", "node_id"),
    Index("idx_events_step_id", "step_id"),
    Index("idx_events_session_id", "session_id"),
    Index("idx_events_event_type", "event_type"),
    Index("idx_events_agent_name", "agent_name"),
    Index("idx_events_timestamp", "timestamp"),
    Index("idx_events_parent_event_id", "parent_event_id"),
    Index("idx_events_run_order", "run_id", "execution_order"),
    Index("idx_events_node_order", "node_id", "execution_order"),
    Index("idx_events_type_subtype", "event_type", "event_subtype"),
    Index("idx_events_session_timestamp", "session_id", "timestamp"),
)

# ``messages``: only written when GenAI content capture put messages on a span.
Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL")),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE")),
    Column("sender", String(100), nullable=False),
    Column("recipient", String(100), nullable=False),
    Column("content", Text, nullable=False),
    Column("timestamp", DateTime, nullable=False),
    Column("tokens", Integer),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("idx_messages_run_id", "run_id"),
    Index("idx_messages_step_id", "step_id"),
    Index("idx_messages_event_id", "event_id"),
    Index("idx_messages_node_id", "node_id"),
    Index("idx_messages_sender", "sender"),
    Index("idx_messages_recipient", "recipient"),
    Index("idx_messages_run_timestamp", "run_id", "timestamp"),
    Index("idx_messages_sender_recipient", "sender", "recipient"),
)

# ``cost_records``: one row per LLM call that reported usage.
Table(
    "cost_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("model", String(100), nullable=False),
    Column("agent_name", String(200)),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL")),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("total_tokens", Integer, nullable=False),
    Column("cost_usd", Numeric(10, 6), nullable=False),
    Column("timestamp", DateTime, nullable=False),
    Index("idx_cost_records_run_id", "run_id"),
    Index("idx_cost_records_step_id", "step_id"),
    Index("idx_cost_records_session_id", "session_id"),
    Index("idx_cost_records_model", "model"),
    Index("idx_cost_records_agent_name", "agent_name"),
    Index("idx_cost_records_parent_run_id", "parent_run_id"),
    Index("idx_cost_records_run_timestamp", "run_id", "timestamp"),
    Index("idx_cost_records_session_timestamp", "session_id", "timestamp"),
)

# ``branches``: links a parent run's step to a child (branch) run.
Table(
    "branches",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("parent_step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=False),
    Column("child_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("branch_name", String(255), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("hypothesis", Text),
    Column("status", String(50), nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Column("racing_group_id", String(36)),
    Column("racing_priority", Integer),
    Column("racing_status", String(20)),
    Index("idx_branches_parent_run_id", "parent_run_id"),
    Index("idx_branches_child_run_id", "child_run_id"),
    Index("idx_branches_parent_step_id", "parent_step_id"),
)

# ``projects``: cmbagent's run grouping (never written by the exporter).
Table(
    "projects",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("description", Text),
    Column("created_at", DateTime, nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_projects_session_id", "session_id"),
)

# ``racing_groups``: cmbagent's competing branches (schema only; nothing reads or writes it).
Table(
    "racing_groups",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("parent_step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=False),
    Column("strategy", String(50), nullable=False),
    Column("status", String(20), nullable=False),
    Column("winner_branch_id", String(36), ForeignKey("branches.id", ondelete="SET NULL")),
    Column("created_at", DateTime, nullable=False),
    Column("resolved_at", DateTime),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_racing_groups_parent_run_id", "parent_run_id"),
    Index("ix_racing_groups_parent_step_id", "parent_step_id"),
)

# ``checkpoints``: read by cmbagent's resumable-nodes and play-from-node endpoints.
Table(
    "checkpoints",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("checkpoint_type", String(50), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("context_snapshot", JSON(none_as_null=True), nullable=True),
    Column("pickle_file_path", String(500)),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_checkpoints_run_id", "run_id"),
    Index("ix_checkpoints_step_id", "step_id"),
    Index("idx_checkpoints_run_created", "run_id", "created_at"),
    Index("idx_checkpoints_type", "checkpoint_type"),
)

# ``files``: read by cmbagent's files and execution-summary endpoints.
Table(
    "files",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE")),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("event_id", String(36), ForeignKey("execution_events.id", ondelete="SET NULL")),
    Column("node_id", String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE")),
    Column("file_path", String(1000), nullable=False),
    Column("file_type", String(50), nullable=False),
    Column("size_bytes", BigInteger),
    Column("created_at", DateTime, nullable=False),
    Column("workflow_phase", String(50)),
    Column("is_final_output", Boolean, nullable=False),
    Column("content_hash", String(64)),
    Column("generating_agent", String(100)),
    Column("generating_code_hash", String(64)),
    Column("priority", String(20)),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_files_run_id", "run_id"),
    Index("ix_files_step_id", "step_id"),
    Index("ix_files_file_type", "file_type"),
    Index("ix_files_workflow_phase", "workflow_phase"),
    Index("idx_files_run_type", "run_id", "file_type"),
    Index("idx_files_created", "created_at"),
    Index("idx_files_event", "event_id"),
    Index("idx_files_node", "node_id"),
    Index("idx_files_phase", "run_id", "workflow_phase"),
    Index("idx_files_final_output", "run_id", "is_final_output"),
    Index("idx_files_session", "session_id"),
)

# ``state_history``: cmbagent's state-machine audit trail.
Table(
    "state_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entity_type", String(50), nullable=False),
    Column("entity_id", String(36), nullable=False),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("from_state", String(50)),
    Column("to_state", String(50), nullable=False),
    Column("transition_reason", Text),
    Column("transitioned_by", String(100)),
    Column("created_at", DateTime, nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_state_history_entity_type", "entity_type"),
    Index("ix_state_history_entity_id", "entity_id"),
    Index("ix_state_history_to_state", "to_state"),
    Index("idx_state_history_entity", "entity_type", "entity_id"),
    Index("idx_state_history_session", "session_id"),
    Index("idx_state_history_created", "created_at"),
)

# ``task_stages``: stages of cmbagent's multi-stage task routers.
Table(
    "task_stages",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("parent_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("child_run_id", String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL")),
    Column("stage_number", Integer, nullable=False),
    Column("stage_name", String(100), nullable=False),
    Column("status", String(50), nullable=False),
    Column("input_data", JSON(none_as_null=True), nullable=True),
    Column("output_data", JSON(none_as_null=True), nullable=True),
    Column("output_files", JSON(none_as_null=True), nullable=True),
    Column("error_message", Text),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_task_stages_child_run_id", "child_run_id"),
    Index("idx_task_stages_parent_run", "parent_run_id"),
    Index("idx_task_stages_status", "status"),
    Index("idx_task_stages_parent_stage", "parent_run_id", "stage_number"),
)

# ``approval_requests``: cmbagent's human-in-the-loop approvals.
Table(
    "approval_requests",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="SET NULL")),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("approval_type", String(50), nullable=False),
    Column("context", JSON, nullable=False),
    Column("status", String(20)),
    Column("resolution", String(20)),
    Column("result", JSON(none_as_null=True), nullable=True),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    Column("requested_at", DateTime),
    Column("context_snapshot", JSON(none_as_null=True), nullable=True),
    Column("user_feedback", Text),
    Index("ix_approval_requests_run_id", "run_id"),
    Index("ix_approval_requests_step_id", "step_id"),
    Index("idx_approval_run_status", "run_id", "status"),
    Index("idx_approval_expires", "expires_at"),
    Index("idx_approval_session", "session_id"),
    Index("idx_approval_status", "status"),
)

# ``workflow_metrics``: cmbagent's per-run metrics.
Table(
    "workflow_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE")),
    Column("timestamp", DateTime, nullable=False),
    Column("metric_name", String(100), nullable=False),
    Column("metric_value", Numeric, nullable=False),
    Column("meta", JSON(none_as_null=True), nullable=True),
    Index("ix_workflow_metrics_run_id", "run_id"),
    Index("ix_workflow_metrics_step_id", "step_id"),
    Index("ix_workflow_metrics_metric_name", "metric_name"),
    Index("idx_workflow_metrics_run_name", "run_id", "metric_name"),
    Index("idx_workflow_metrics_timestamp", "timestamp"),
)

# ``active_connections``: cmbagent's WebSocket connection registry.
Table(
    "active_connections",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("task_id", String(100), nullable=False, unique=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="SET NULL")),
    Column("server_instance", String(100)),
    Column("connected_at", DateTime(timezone=True), server_default=func.now()),
    Column("last_heartbeat", DateTime(timezone=True), server_default=func.now()),
    Index("idx_connection_heartbeat", "last_heartbeat"),
    Index("idx_connection_session", "session_id"),
)

TRACKING_TABLES = (
    "sessions", "session_states", "workflow_runs", "workflow_steps", "dag_nodes", "dag_edges",
    "execution_events", "messages", "cost_records", "branches",
)
"""The tables the exporter writes (created by revision ``0001_tracking_schema``), parents first."""

CMBAGENT_TABLES = (
    "projects", "racing_groups", "checkpoints", "files", "state_history", "task_stages", "approval_requests",
    "workflow_metrics", "active_connections",
)
"""cmbagent's other tables (created by ``0003_cmbagent_tables``), parents first: its backend queries them."""

TABLE_ORDER = TRACKING_TABLES + CMBAGENT_TABLES
"""Every table, in foreign-key order (parents first)."""
