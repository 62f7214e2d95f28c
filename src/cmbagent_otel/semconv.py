"""Span names and attribute keys emitted by cmbagent-otel.

This module is the contract between the instrumentation (which writes spans) and the
exporters (which read them). GenAI keys follow the OpenTelemetry GenAI semantic
conventions; everything cmbagent-specific lives under ``cmbagent.*``.

Every span created by cmbagent-otel carries:

* ``cmbagent.span.kind``: one of the ``SpanKind*`` values below;
* ``cmbagent.execution_order``: a per-run, strictly increasing integer assigned when the
  span starts (thread-safe), so events order exactly even when timestamps tie;
* ``cmbagent.session.id``: the session of the run (``default_session`` when none given);
* ``cmbagent.dag.node``: the short id of the DAG node the span belongs to (``planning``,
  ``step_2``, ...); absent for spans that are not inside any DAG node;
* ``gen_ai.conversation.id``: on every span inside a conversation, not only its root.

The run a span belongs to is its trace: the DAG exporter derives ``workflow_runs.id``
from the trace id (``str(uuid.UUID(int=trace_id))``), so every span of a trace can be
mapped to its run without waiting for the root span.
"""

from __future__ import annotations

from typing import Final

INSTRUMENTATION_NAME: Final = "cmbagent_otel"
# Instrumentation scopes: spans of AG2 operations (agents, model calls, tools, code, speaker
# selection, human input, conversations) come from the AG2 instrumentor; the run structure
# (workflow, phase, step, redo, failed-attempt events), whoever derives it, from the workflow
# scope. Nothing downstream (DAG mapping, ingest) depends on the scope name.
SCOPE_AG2: Final = "cmbagent_otel.ag2"
# the semantic-conventions version our tracers, meters and loggers declare: the newest release whose GenAI
# names are current (1.41 added invoke_workflow / gen_ai.workflow.name, the newest core names we emit; 1.42
# moved every gen_ai.* name to the semantic-conventions-genai repository). docs/spans.md lists each name by release.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.41.1"
SCOPE_WORKFLOW: Final = "cmbagent_otel.workflow"

# --- GenAI semantic conventions -------------------------------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"  # deprecated alias of provider.name, still read by backends
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_AGENT_DESCRIPTION: Final = "gen_ai.agent.description"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K: Final = "gen_ai.request.top_k"
GEN_AI_REQUEST_FREQUENCY_PENALTY: Final = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_PRESENCE_PENALTY: Final = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_SEED: Final = "gen_ai.request.seed"
GEN_AI_REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
GEN_AI_REQUEST_STOP_SEQUENCES: Final = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE: Final = "gen_ai.tool.type"
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
GEN_AI_WORKFLOW_NAME: Final = "gen_ai.workflow.name"
GEN_AI_TOOL_CALL_ARGUMENTS: Final = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT: Final = "gen_ai.tool.call.result"
ERROR_TYPE: Final = "error.type"
#: ``error.type`` of a run stopped from outside rather than failing: Ctrl-C, a cancelled asyncio task, MARS's
#: pause/cancel check (``PhaseExecutionManager.raise_if_cancelled``: the user cancelled it in cmbagent's UI)
STOPPED_ERROR_TYPES: Final = frozenset({"KeyboardInterrupt", "CancelledError", "WorkflowCancelledException"})
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
# the general session attribute, beside cmbagent.session.id (same value), for UIs grouping by session
GENERIC_SESSION_ID: Final = "session.id"

# Content attributes whose value is JSON text following the GenAI conventions' schemas
# (messages: role + parts; system instructions: parts; tool arguments/result: any JSON value)
JSON_CONTENT_ATTRIBUTES: Final = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments", "gen_ai.tool.call.result",
})
# The GenAI conventions' content event (a log record), emitted with EVENT_ONLY / SPAN_AND_EVENT
EVENT_INFERENCE_DETAILS: Final = "gen_ai.client.inference.operation.details"

OP_INVOKE_AGENT: Final = "invoke_agent"
OP_CHAT: Final = "chat"
OP_EXECUTE_TOOL: Final = "execute_tool"
OP_PLAN: Final = "plan"
OP_INVOKE_WORKFLOW: Final = "invoke_workflow"

# --- cmbagent.* -----------------------------------------------------------------------
SPAN_KIND: Final = "cmbagent.span.kind"
EXECUTION_ORDER: Final = "cmbagent.execution_order"
SESSION_ID: Final = "cmbagent.session.id"
DAG_NODE: Final = "cmbagent.dag.node"
# Only on spans that *are* DAG nodes (phase, step, redo branch, sub-agent call):
DAG_NODE_TYPE: Final = "cmbagent.dag.node_type"
DAG_PARENT_NODE: Final = "cmbagent.dag.parent_node"
DAG_DEPTH: Final = "cmbagent.dag.depth"
DAG_ORDER_INDEX: Final = "cmbagent.dag.order_index"
# Only on spans that are execution events: 0 directly under a DAG node (or the run), +1 per
# enclosing event span.
EVENT_DEPTH: Final = "cmbagent.event.depth"

WORKFLOW_NAME: Final = "cmbagent.workflow.name"
WORKFLOW_MODE: Final = "cmbagent.workflow.mode"
WORKFLOW_TASK: Final = "cmbagent.workflow.task"
WORKFLOW_AGENT: Final = "cmbagent.workflow.agent"
WORKFLOW_MODEL: Final = "cmbagent.workflow.model"
WORKFLOW_WORK_DIR: Final = "cmbagent.workflow.work_dir"
WORKFLOW_TASK_ID: Final = "cmbagent.workflow.task_id"
# The files in cmbagent's output folders of the work dir when the run ended, one
# "<path relative to the work dir>\t<size in bytes>\t<modification time, ns since the epoch>"
# per file (paths only, redacted; never contents): the DAG exporter's ``files`` rows.
WORKFLOW_FILES: Final = "cmbagent.workflow.files"

PHASE: Final = "cmbagent.phase"
PHASE_INDEX: Final = "cmbagent.phase.index"
# a one_shot solve's own work dir, relative to the run's, when it is a folder below it (each document's
# solve of summarize_documents): the phase node's meta.work_dir, whose files are that node's
PHASE_WORK_DIR: Final = "cmbagent.phase.work_dir"
STEP_NUMBER: Final = "cmbagent.step.number"
STEP_GOAL: Final = "cmbagent.step.goal"
STEP_AGENT: Final = "cmbagent.step.agent"
STEP_SUMMARY: Final = "cmbagent.step.summary"
# cmbagent's retries inside a step: failed attempts it counted (its n_attempts), its limit
# (max_n_attempts), the failed attempt's 1-based number (on attempt events), and the last
# status record_status reported for the step
STEP_ATTEMPTS: Final = "cmbagent.step.attempts"
STEP_MAX_ATTEMPTS: Final = "cmbagent.step.max_attempts"
STEP_ATTEMPT: Final = "cmbagent.step.attempt"
STEP_STATUS: Final = "cmbagent.step.status"
# cmbagent.step.status of a zero-length step span standing for a plan step that never started
# (the plan stopped before it): its DAG node is pending, as cmbagent's DAG leaves a planned step
STEP_NOT_STARTED: Final = "not started"
# "not started" (STEP_NOT_STARTED) on a zero-length phase span standing for a phase cmbagent's DAG has
# but that never ran: a one-shot-style run that failed before its first solve keeps cmbagent's pending
# fixed-pipeline ``execute`` node
PHASE_STATUS: Final = "cmbagent.phase.status"
BRANCH_NAME: Final = "cmbagent.branch.name"
BRANCH_ATTEMPT: Final = "cmbagent.branch.attempt"
BRANCH_HYPOTHESIS: Final = "cmbagent.branch.hypothesis"

CONVERSATION_INITIATOR: Final = "cmbagent.conversation.initiator"
CONVERSATION_RECIPIENT: Final = "cmbagent.conversation.recipient"
CONVERSATION_MAX_TURNS: Final = "cmbagent.conversation.max_turns"
CONVERSATION_CHAT_COUNT: Final = "cmbagent.conversation.chat_count"
CONVERSATION_SUMMARY: Final = "cmbagent.conversation.summary"
AGENT_SENDER: Final = "cmbagent.agent.sender"

# messages left out of gen_ai.input.messages to keep it within the attribute bound (oldest first)
CONTENT_DROPPED_MESSAGES: Final = "cmbagent.content.dropped_messages"

LLM_COST_USD: Final = "cmbagent.llm.cost_usd"
LLM_CACHE_HIT: Final = "cmbagent.llm.cache_hit"

CODE_LANGUAGE: Final = "cmbagent.code.language"
CODE_EXIT_CODE: Final = "cmbagent.code.exit_code"
CODE_OUTPUT: Final = "cmbagent.code.output"
CODE_BLOCK_COUNT: Final = "cmbagent.code.block_count"
CODE_EXECUTOR: Final = "cmbagent.code.executor"
CODE_SOURCE: Final = "cmbagent.code.source"

HANDOFF_FROM: Final = "cmbagent.handoff.from"
HANDOFF_TO: Final = "cmbagent.handoff.to"
HANDOFF_CANDIDATES: Final = "cmbagent.handoff.candidates"
HANDOFF_REASON: Final = "cmbagent.handoff.reason"
HANDOFF_ENDS_CHAT: Final = "cmbagent.handoff.ends_chat"  # no eligible next speaker: the chat ends normally

HUMAN_INPUT_PROMPT: Final = "cmbagent.human_input.prompt"
HUMAN_INPUT_RESPONSE: Final = "cmbagent.human_input.response"

# Values of cmbagent.span.kind
KIND_WORKFLOW: Final = "workflow"
KIND_PHASE: Final = "phase"
KIND_STEP: Final = "step"
KIND_BRANCH: Final = "branch"
KIND_CONVERSATION: Final = "conversation"
KIND_MULTI_CONVERSATION: Final = "multi_conversation"
KIND_AGENT: Final = "agent"
KIND_LLM: Final = "llm"
KIND_TOOL: Final = "tool"
KIND_CODE: Final = "code_execution"
KIND_SPEAKER_SELECTION: Final = "speaker_selection"
KIND_HUMAN_INPUT: Final = "human_input"
KIND_ATTEMPT: Final = "attempt"  # a failed attempt inside a plan step (zero-length, ERROR status)

# Values of cmbagent.dag.node_type (cmbagent's dag_nodes.node_type vocabulary)
NODE_PLANNING: Final = "planning"
NODE_CONTROL: Final = "control"
NODE_AGENT: Final = "agent"
NODE_SUB_AGENT: Final = "sub_agent"
NODE_REDO: Final = "redo"
NODE_BRANCH_POINT: Final = "branch_point"

DEFAULT_SESSION_ID: Final = "default_session"
