"""SQLAlchemy 2 models of cmbagent's tracking schema: the tables the DAG exporter writes and
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

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "CMBAGENT_TABLES",
    "TABLE_ORDER",
    "TRACKING_TABLES",
    "ActiveConnection",
    "ApprovalRequest",
    "Base",
    "Branch",
    "Checkpoint",
    "CostRecord",
    "DAGEdge",
    "DAGNode",
    "ExecutionEvent",
    "File",
    "Message",
    "Project",
    "RacingGroup",
    "Session",
    "SessionState",
    "StateHistory",
    "TaskStage",
    "WorkflowMetric",
    "WorkflowRun",
    "WorkflowStep",
    "metadata",
]




class Base(DeclarativeBase):
    """Declarative base whose metadata holds exactly the tracking tables below."""

    metadata = MetaData()


metadata = Base.metadata


class Session(Base):
    """``sessions``: a user session; runs hang below it."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    last_active_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    resource_limits: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("idx_sessions_status", "status"),
        Index("idx_sessions_user_id", "user_id"),
        Index("idx_sessions_user_status", "user_id", "status"),
    )


class SessionState(Base):
    """``session_states``: needed for a session to be listed by cmbagent's UI."""

    __tablename__ = "session_states"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    mode: Mapped[str] = mapped_column(String(50), nullable=False)
    conversation_history: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    context_variables: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    plan_data: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    current_phase: Mapped[str | None] = mapped_column(String(50))
    current_step: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (
        Index("idx_session_states_session_id", "session_id"),
        Index("idx_session_states_status", "status"),
        Index("idx_session_states_session_status", "session_id", "status"),
        Index("idx_session_states_mode", "mode"),
        Index("idx_session_states_updated_at", "updated_at"),
    )


class WorkflowRun(Base):
    """``workflow_runs``: one run (one trace)."""

    __tablename__ = "workflow_runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    project_id: Mapped[str | None] = mapped_column(String(36))
    mode: Mapped[str] = mapped_column(String(50), nullable=False)
    agent: Mapped[str] = mapped_column(String(100), nullable=False)
    model: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    checkpoint_frequency_minutes: Mapped[int] = mapped_column(Integer, nullable=False)
    task_description: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    branch_parent_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True
    )
    is_branch: Mapped[bool] = mapped_column(Boolean, nullable=False)
    branch_depth: Mapped[int] = mapped_column(Integer, nullable=False)
    parent_run_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True
    )
    stage_number: Mapped[int | None] = mapped_column(Integer)
    stage_name: Mapped[str | None] = mapped_column(String(100))
    __table_args__ = (
        Index("idx_workflow_runs_session_id", "session_id"),
        Index("idx_workflow_runs_mode", "mode"),
        Index("idx_workflow_runs_agent", "agent"),
        Index("idx_workflow_runs_status", "status"),
        Index("idx_workflow_runs_session_status", "session_id", "status"),
        Index("idx_workflow_runs_agent_status", "agent", "status"),
    )


class WorkflowStep(Base):
    """``workflow_steps``: written only for steps that have redo branches."""

    __tablename__ = "workflow_steps"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    step_number: Mapped[int] = mapped_column(Integer, nullable=False)
    goal: Mapped[str] = mapped_column(Text, nullable=False)
    summary: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    progress_percentage: Mapped[int] = mapped_column(Integer, nullable=False)
    inputs: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    outputs: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        CheckConstraint("progress_percentage >= 0 AND progress_percentage <= 100", name="check_progress_range"),
        Index("idx_workflow_steps_run_id", "run_id"),
        Index("idx_workflow_steps_session_id", "session_id"),
        Index("idx_workflow_steps_status", "status"),
        Index("idx_workflow_steps_run_number", "run_id", "step_number"),
        Index("idx_workflow_steps_session_status", "session_id", "status"),
    )


class DAGNode(Base):
    """``dag_nodes``: phases, steps, redo branches, branch points, sub-agent calls, terminator."""

    __tablename__ = "dag_nodes"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    parent_node_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"))
    node_type: Mapped[str] = mapped_column(String(50), nullable=False)
    agent: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    order_index: Mapped[int] = mapped_column(Integer, nullable=False)
    depth: Mapped[int] = mapped_column(Integer, nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("idx_dag_nodes_run_id", "run_id"),
        Index("idx_dag_nodes_session_id", "session_id"),
        Index("idx_dag_nodes_node_type", "node_type"),
        Index("idx_dag_nodes_status", "status"),
        Index("idx_dag_nodes_parent_node_id", "parent_node_id"),
        Index("idx_dag_nodes_run_order", "run_id", "order_index"),
        Index("idx_dag_nodes_type_status", "node_type", "status"),
    )


class DAGEdge(Base):
    """``dag_edges``: no run_id and no unique key; edges belong to the run of their from-node."""

    __tablename__ = "dag_edges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    from_node_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=False
    )
    to_node_id: Mapped[str] = mapped_column(String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"), nullable=False)
    dependency_type: Mapped[str] = mapped_column(String(50), nullable=False)
    condition: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        Index("idx_dag_edges_from", "from_node_id"),
        Index("idx_dag_edges_to", "to_node_id"),
        Index("idx_dag_edges_from_to", "from_node_id", "to_node_id"),
    )


class ExecutionEvent(Base):
    """``execution_events``: every span that is not a DAG node or the run itself."""

    __tablename__ = "execution_events"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    node_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"))
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="SET NULL"))
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    parent_event_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("execution_events.id", ondelete="SET NULL")
    )
    event_type: Mapped[str] = mapped_column(String(50), nullable=False)
    event_subtype: Mapped[str | None] = mapped_column(String(50))
    agent_name: Mapped[str | None] = mapped_column(String(100))
    agent_role: Mapped[str | None] = mapped_column(String(50))
    timestamp: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    inputs: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    outputs: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    execution_order: Mapped[int] = mapped_column(Integer, nullable=False)
    depth: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    __table_args__ = (
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


class Message(Base):
    """``messages``: only written when GenAI content capture put messages on a span."""

    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    event_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("execution_events.id", ondelete="SET NULL"))
    node_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"))
    sender: Mapped[str] = mapped_column(String(100), nullable=False)
    recipient: Mapped[str] = mapped_column(String(100), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    timestamp: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    tokens: Mapped[int | None] = mapped_column(Integer)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("idx_messages_run_id", "run_id"),
        Index("idx_messages_step_id", "step_id"),
        Index("idx_messages_event_id", "event_id"),
        Index("idx_messages_node_id", "node_id"),
        Index("idx_messages_sender", "sender"),
        Index("idx_messages_recipient", "recipient"),
        Index("idx_messages_run_timestamp", "run_id", "timestamp"),
        Index("idx_messages_sender_recipient", "sender", "recipient"),
    )


class CostRecord(Base):
    """``cost_records``: one row per LLM call that reported usage."""

    __tablename__ = "cost_records"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    model: Mapped[str] = mapped_column(String(100), nullable=False)
    agent_name: Mapped[str | None] = mapped_column(String(200))
    parent_run_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"))
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    total_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(10, 6), nullable=False)
    timestamp: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    __table_args__ = (
        Index("idx_cost_records_run_id", "run_id"),
        Index("idx_cost_records_step_id", "step_id"),
        Index("idx_cost_records_session_id", "session_id"),
        Index("idx_cost_records_model", "model"),
        Index("idx_cost_records_agent_name", "agent_name"),
        Index("idx_cost_records_parent_run_id", "parent_run_id"),
        Index("idx_cost_records_run_timestamp", "run_id", "timestamp"),
        Index("idx_cost_records_session_timestamp", "session_id", "timestamp"),
    )


class Branch(Base):
    """``branches``: links a parent run's step to a child (branch) run."""

    __tablename__ = "branches"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    parent_run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
    )
    parent_step_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=False
    )
    child_run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
    )
    branch_name: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    hypothesis: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    racing_group_id: Mapped[str | None] = mapped_column(String(36))
    racing_priority: Mapped[int | None] = mapped_column(Integer)
    racing_status: Mapped[str | None] = mapped_column(String(20))
    __table_args__ = (
        Index("idx_branches_parent_run_id", "parent_run_id"),
        Index("idx_branches_child_run_id", "child_run_id"),
        Index("idx_branches_parent_step_id", "parent_step_id"),
    )


class Project(Base):
    """``projects``: cmbagent's run grouping (never written by the exporter)."""

    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (Index("ix_projects_session_id", "session_id"),)


class RacingGroup(Base):
    """``racing_groups``: cmbagent's competing branches (schema only; nothing reads or writes it)."""

    __tablename__ = "racing_groups"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    parent_run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
    )
    parent_step_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"), nullable=False
    )
    strategy: Mapped[str] = mapped_column(String(50), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    winner_branch_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("branches.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_racing_groups_parent_run_id", "parent_run_id"),
        Index("ix_racing_groups_parent_step_id", "parent_step_id"),
    )


class Checkpoint(Base):
    """``checkpoints``: read by cmbagent's resumable-nodes and play-from-node endpoints."""

    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    checkpoint_type: Mapped[str] = mapped_column(String(50), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    context_snapshot: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    pickle_file_path: Mapped[str | None] = mapped_column(String(500))
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_checkpoints_run_id", "run_id"),
        Index("ix_checkpoints_step_id", "step_id"),
        Index("idx_checkpoints_run_created", "run_id", "created_at"),
        Index("idx_checkpoints_type", "checkpoint_type"),
    )


class File(Base):
    """``files``: read by cmbagent's files and execution-summary endpoints."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    session_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"))
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    event_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("execution_events.id", ondelete="SET NULL"))
    node_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("dag_nodes.id", ondelete="CASCADE"))
    file_path: Mapped[str] = mapped_column(String(1000), nullable=False)
    file_type: Mapped[str] = mapped_column(String(50), nullable=False)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    workflow_phase: Mapped[str | None] = mapped_column(String(50))
    is_final_output: Mapped[bool] = mapped_column(Boolean, nullable=False)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    generating_agent: Mapped[str | None] = mapped_column(String(100))
    generating_code_hash: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str | None] = mapped_column(String(20))
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
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


class StateHistory(Base):
    """``state_history``: cmbagent's state-machine audit trail."""

    __tablename__ = "state_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entity_type: Mapped[str] = mapped_column(String(50), nullable=False)
    entity_id: Mapped[str] = mapped_column(String(36), nullable=False)
    session_id: Mapped[str] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False)
    from_state: Mapped[str | None] = mapped_column(String(50))
    to_state: Mapped[str] = mapped_column(String(50), nullable=False)
    transition_reason: Mapped[str | None] = mapped_column(Text)
    transitioned_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_state_history_entity_type", "entity_type"),
        Index("ix_state_history_entity_id", "entity_id"),
        Index("ix_state_history_to_state", "to_state"),
        Index("idx_state_history_entity", "entity_type", "entity_id"),
        Index("idx_state_history_session", "session_id"),
        Index("idx_state_history_created", "created_at"),
    )


class TaskStage(Base):
    """``task_stages``: stages of cmbagent's multi-stage task routers."""

    __tablename__ = "task_stages"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    parent_run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
    )
    child_run_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="SET NULL"))
    stage_number: Mapped[int] = mapped_column(Integer, nullable=False)
    stage_name: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(50), nullable=False)
    input_data: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    output_data: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    output_files: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_task_stages_child_run_id", "child_run_id"),
        Index("idx_task_stages_parent_run", "parent_run_id"),
        Index("idx_task_stages_status", "status"),
        Index("idx_task_stages_parent_stage", "parent_run_id", "stage_number"),
    )


class ApprovalRequest(Base):
    """``approval_requests``: cmbagent's human-in-the-loop approvals."""

    __tablename__ = "approval_requests"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    session_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="SET NULL"))
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    approval_type: Mapped[str] = mapped_column(String(50), nullable=False)
    context: Mapped[Any] = mapped_column(JSON, nullable=False)
    status: Mapped[str | None] = mapped_column(String(20))
    resolution: Mapped[str | None] = mapped_column(String(20))
    result: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    requested_at: Mapped[datetime | None] = mapped_column(DateTime)
    context_snapshot: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    user_feedback: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        Index("ix_approval_requests_run_id", "run_id"),
        Index("ix_approval_requests_step_id", "step_id"),
        Index("idx_approval_run_status", "run_id", "status"),
        Index("idx_approval_expires", "expires_at"),
        Index("idx_approval_session", "session_id"),
        Index("idx_approval_status", "status"),
    )


class WorkflowMetric(Base):
    """``workflow_metrics``: cmbagent's per-run metrics."""

    __tablename__ = "workflow_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False)
    step_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"))
    timestamp: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    metric_name: Mapped[str] = mapped_column(String(100), nullable=False)
    metric_value: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    meta: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    __table_args__ = (
        Index("ix_workflow_metrics_run_id", "run_id"),
        Index("ix_workflow_metrics_step_id", "step_id"),
        Index("ix_workflow_metrics_metric_name", "metric_name"),
        Index("idx_workflow_metrics_run_name", "run_id", "metric_name"),
        Index("idx_workflow_metrics_timestamp", "timestamp"),
    )


class ActiveConnection(Base):
    """``active_connections``: cmbagent's WebSocket connection registry."""

    __tablename__ = "active_connections"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    session_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("sessions.id", ondelete="SET NULL"))
    server_instance: Mapped[str | None] = mapped_column(String(100))
    connected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (
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
