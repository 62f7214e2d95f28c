"""Pure span -> row mapping for cmbagent's tracking tables (no database access here).

:func:`map_spans` turns a batch of finished spans into row dicts per table, with the
placeholders needed to satisfy foreign keys; :func:`derive_run_rows` computes the rows
that depend on a run's whole node set (edges, terminator, branch points, branch runs).
Every id is deterministic, so writing the same spans twice or in any order converges to
the same rows. See ``docs/dag.md`` for the mapping tables.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import hashlib
import itertools
import json
import math
import operator
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, Status, StatusCode

from .. import redaction
from .. import semconv as sc
from .._jsontext import loads
from ..processor import StartedSpan
from ..redaction import REDACTED, is_secret_key, learn_secrets_in, safe_text, scrub, truncate
from . import _stamps

_EPOCH = _stamps.EPOCH
DEFAULT_SESSION_NAME = "Default Session"
CHECKPOINT_FREQUENCY_MINUTES = 10

# Run-row precedence: a finished workflow span beats a started one (the live DAG) beats a
# plain root span beats a placeholder. Stored by name (meta.otel_source), never by number.
RANK_PLACEHOLDER = 0
RANK_ROOT = 1
RANK_STARTED = 2
RANK_WORKFLOW = 3
RANK_NAMES = {RANK_PLACEHOLDER: "placeholder", RANK_ROOT: "root", RANK_STARTED: "workflow_started",
              RANK_WORKFLOW: "workflow"}
RUNNING = "running"  # status of a node whose span has started and not ended yet
RANK_BY_NAME = {v: k for k, v in RANK_NAMES.items()}

EVENT_TYPES: dict[str, tuple[str, str]] = {
    sc.KIND_LLM: ("agent_call", "llm"),
    sc.KIND_AGENT: ("agent_call", "invoke"),
    sc.KIND_CONVERSATION: ("agent_call", "conversation"),
    sc.KIND_MULTI_CONVERSATION: ("agent_call", "conversation"),
    sc.KIND_TOOL: ("tool_call", "execute"),
    sc.KIND_SPEAKER_SELECTION: ("handoff", "transfer"),
    sc.KIND_HUMAN_INPUT: ("agent_call", "human_input"),
}
FOREIGN_TYPE = ("info", "otel")
LLM_TYPE = EVENT_TYPES[sc.KIND_LLM]
PLACEHOLDER_SUBTYPE = "pending_span"
NODE_TERMINATOR = "terminator"
NODE_INIT = "init"
ONE_SHOT_EXECUTE = "execute"  # short id of the one_shot phase node (cmbagent's fixed-pipeline layout)
ONE_SHOT_MODE = "one-shot"
_REPEATED_EXECUTE = re.compile(r"execute_[0-9]+")  # a later one_shot solve of the same run
# the execute node's label in cmbagent's fixed-pipeline modes ({agent}: the run's); MARS dag_tracker's
# MODE_TO_TEMPLATE overrides it for enhance-input (preprocess_task)
_EXECUTE_LABELS = {ONE_SHOT_MODE: "Execute ({agent})", "enhance-input": "Enhance Input"}
# token and cost keys of node meta: totals over the node's whole subtree
USAGE_KEYS = ("tokens", "prompt_tokens", "completion_tokens", "cost_usd")
ZERO_USAGE: dict[str, Any] = {"tokens": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
_STEP_RE = re.compile(r"^step_\d+$")


# --- small helpers ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def run_id_of(trace_id: int) -> str:
    """``workflow_runs.id`` of a trace."""
    return str(uuid.UUID(int=trace_id))


@functools.lru_cache(maxsize=8192)
def node_db_id(run_id: str, short_id: str) -> str:
    """cmbagent's node id scheme: first 32 hex chars of ``md5("<run>:<short>")``."""
    return hashlib.md5(f"{run_id}:{short_id}".encode()).hexdigest()[:32]


_ID128 = (1 << 128) - 1
_ID64 = (1 << 64) - 1


def event_db_id(trace_id: int, span_id: int) -> str:
    """Deterministic 32-char event id: base64url (no padding) of the whole 128-bit trace id
    followed by the whole 64-bit span id, so distinct spans never share a row."""
    return _event_id((trace_id & _ID128).to_bytes(16, "big"), span_id)


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _event_id(trace_bytes: bytes, span_id: int) -> str:
    """:func:`event_db_id` from the trace id's 16 bytes (computed once per trace in a batch)."""
    raw = trace_bytes + (span_id & _ID64).to_bytes(8, "big")
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).decode("ascii")


def span_event_db_id(trace_id: int, span_id: int, index: int) -> str:
    """Deterministic 36-char id of the execution event a span *event* stands for (a handoff recorded
    as ``cmbagent.handoff`` on the span it happened in): base64url of the trace id, the span id and
    the event's index in the span's events (3 bytes). Never equal to a span's 32-char id."""
    raw = (trace_id & _ID128).to_bytes(16, "big") + (span_id & _ID64).to_bytes(8, "big") + \
        (index & 0xFFFFFF).to_bytes(3, "big")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def derived_uuid(*parts: str) -> str:
    """A uuid-shaped id derived from ``parts``."""
    # str(uuid.UUID(hex=digest)), without UUID's Python-level parsing: the digest is 32 lowercase hex digits
    h = hashlib.md5(":".join(parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# a span time as a datetime, its text remembered (_stamps: SQLite's text and node meta's reuse it)
_at = _stamps.at
_bare = _stamps.bare
_iso = _stamps.iso


def ts(ns: int | None) -> datetime | None:
    """Nanoseconds since the epoch -> naive UTC datetime (cmbagent's storage convention)."""
    if ns is None:
        return None
    return _at(ns)


def iso(value: datetime | None) -> str | None:
    return _iso(value) if value is not None else None


_INT32 = 2**31 - 1


def _int(value: Any, default: int = 0) -> int:
    """An INTEGER column's value: ``default`` when not a number, clamped to 32 bits (PostgreSQL)."""
    if type(value) is int and -_INT32 <= value <= _INT32:
        return value
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return max(-_INT32, min(_INT32, number))


def _float(value: Any, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _text(value: Any) -> str | None:
    """A text column's value from an attribute of any type (sequences joined by newlines)."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, (tuple, list)):
        return "\n".join(str(v) for v in value)
    return str(value)


def _str(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text[:limit]


_DB_REJECTS = re.compile("[\x00\ud800-\udfff]")


def _rejected(text: str) -> bool:
    if text.isascii():
        return "\x00" in text
    return _DB_REJECTS.search(text) is not None


def db_text(text: str) -> str:
    """``text`` as every database accepts it: lone surrogates and NUL become U+FFFD."""
    return _DB_REJECTS.sub("\ufffd", text) if _rejected(text) else text


def _clean_value(value: Any) -> Any:
    if type(value) is str:
        return db_text(value)
    if isinstance(value, (tuple, list)):
        return tuple(db_text(v) if type(v) is str else v for v in value)
    return value


# Attribute keys already checked storable (keys repeat across every span): a set's issuperset
# checks them all in C, so only the values are looped over. Bounded like the key memos.
_storable_keys: set[str] = set()
_SEQUENCE_TYPES = frozenset({tuple, list})


def _attrs_rejected(attrs: Mapping[str, Any]) -> bool:
    for value in attrs.values():
        if type(value) is str:
            if (not value.isascii() or "\x00" in value) and _rejected(value):
                return True
        elif type(value) in _SEQUENCE_TYPES:
            for item in value:
                if type(item) is str and _rejected(item):
                    return True
    if _storable_keys.issuperset(attrs):
        return False
    for key in attrs:
        if ((not key.isascii() or "\x00" in key) and _rejected(key)) or len(key) > _MAX_KEY:
            return True
    if len(_storable_keys) >= 4096:
        _storable_keys.clear()
    _storable_keys.update(key for key in attrs if len(key) <= 256)
    return False


def plain_attributes(span: ReadableSpan) -> dict[str, Any]:
    """A plain-dict copy of the span's attributes (lookups on the SDK's mapping go through Python ABCs)."""
    return _plain_mapping(span.attributes)


def _plain_mapping(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    if attrs is None:
        return {}
    if type(attrs) is dict:
        return attrs.copy()
    if type(attrs) is BoundedAttributes:
        # its copy() is a Python-level method returning this dict's copy
        inner = getattr(attrs, "_dict", None)
        if type(inner) is dict:
            return inner.copy()
    # the SDK's read-only view forwards copy() to BoundedAttributes.copy(), a C-level dict
    # copy; building the dict key by key through the view costs ~25x more (and asking the
    # view whether it is empty first is a Python-level __len__)
    copy = getattr(attrs, "copy", None)
    if copy is not None:
        try:
            copied = copy()
        except Exception:
            copied = None
        if type(copied) is dict:
            return copied
    return dict(attrs) if attrs else {}


def _unstorable(name: str, description: Any, attrs: Mapping[str, Any], start: int | None, end: int | None) -> bool:
    """Whether a span's name, status description, attributes or times hold something no row can
    (see :func:`sanitized`)."""
    return (((not name.isascii() or "\x00" in name) and _rejected(name)) or len(name) > redaction.max_length()
            or (type(description) is str and _rejected(description)) or _attrs_rejected(attrs)
            or (start is not None and not 0 <= start <= _MAX_NS) or (end is not None and not 0 <= end <= _MAX_NS))


def sanitized(span: ReadableSpan, attrs: dict[str, Any]) -> tuple[ReadableSpan, dict[str, Any]]:
    """``span`` and its attributes ``attrs`` (a plain-dict copy), or copies whose name, status and
    attributes hold no text a database rejects.

    Lone surrogates (UTF-8 cannot encode them) and NUL (PostgreSQL text cannot hold it) come
    from instrumented apps that pass odd strings through; they must not fail a whole batch.
    """
    description = span.status.description
    start, end = span.start_time, span.end_time
    if not _unstorable(span.name, description, attrs, start, end):
        return span, attrs
    clean = {_bounded(db_text(k), _MAX_KEY): _clean_value(v) for k, v in attrs.items()}
    copy = ReadableSpan(
        name=_bounded(db_text(span.name), redaction.max_length()), context=span.context, parent=span.parent,
        resource=span.resource,
        attributes=clean, events=span.events, links=span.links, kind=span.kind,
        instrumentation_scope=span.instrumentation_scope,
        status=Status(span.status.status_code, db_text(description) if type(description) is str else None),
        start_time=_storable_ns(start), end_time=_storable_ns(end),
    )
    return copy, clean


# The latest time a datetime (and so a row) can hold; an app passing seconds or microseconds
# where the SDK wants nanoseconds gives times past it, which failed the batch (OverflowError).
# Before the epoch: no OTLP time can be (its times are unsigned).
_MAX_NS = _stamps.MAX_NS


# Another instrumentation's span names and attribute keys are cut like values: the SDK bounds
# neither, and a span named after a 2 MB statement put 4 MB into its event row (name and meta).
_MAX_KEY = 256


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, a hash of the whole keeping cut texts apart (two
    keys differing past the cut stay two keys)."""
    if len(text) <= limit:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{text[:max(limit - 16, 0)]}...{digest}"


def _storable_ns(ns: int | None) -> int | None:
    """``ns`` clamped to the times a row can hold (the epoch to the end of year 9999)."""
    return None if ns is None else max(0, min(_MAX_NS, ns))


class _SpanView(NamedTuple):
    """The fields of a span mapping reads, read once (each of ReadableSpan's properties is a
    Python call; the mapping read about twenty per span). Quacks like the span for them, but
    ``attributes`` and ``events`` are as stored (any mapping, any sequence; never copied)."""

    name: str
    context: Any
    parent: Any
    status: Status
    start_time: int | None
    end_time: int | None
    events: Sequence[Any]
    attributes: Any


_VIEW_FIELDS = ("_name", "_context", "_parent", "_status", "_start_time", "_end_time", "_events", "_attributes")
_view_fields = operator.itemgetter(*_VIEW_FIELDS)


def _slow_view(span: ReadableSpan) -> _SpanView:
    return _SpanView(span.name, span.context, span.parent, span.status, span.start_time, span.end_time,
                     span.events, span.attributes)


def _probe_fields() -> frozenset[type]:
    """The span types whose instance dict holds the fields under the SDK's names (checked on a
    probe span, so an SDK that renames them falls back to the properties)."""
    attributes = {"k": "v"}
    events = (Event("e", {}, 3),)
    probe = StartedSpan(name="probe", context=None, parent=None, attributes=attributes, events=events,
                        status=Status(StatusCode.OK), start_time=1, end_time=2)
    try:
        direct = tuple.__new__(_SpanView, _view_fields(vars(probe)))
    except Exception:
        return frozenset()
    if direct[:6] == _slow_view(probe)[:6] and direct.attributes is attributes and tuple(direct.events) == events:
        return frozenset({ReadableSpan, StartedSpan})
    return frozenset()


def _view(span: ReadableSpan) -> _SpanView:
    """``span``'s fields (``attributes`` as stored, ``events`` as stored: a sequence)."""
    if type(span) in _DIRECT_TYPES:
        try:
            return tuple.__new__(_SpanView, _view_fields(span.__dict__))  # type: ignore[type-var]
        except KeyError:
            pass
    return _slow_view(span)


_DIRECT_TYPES = _probe_fields()


def _probe_context() -> type | None:
    """SpanContext when it is the tuple ``(trace id, span id, is remote, ...)`` its properties read
    (each property a Python call; the mapping read about five per span), else None."""
    try:
        ctx = SpanContext(trace_id=0x1234, span_id=0x56, is_remote=True)
        if (isinstance(ctx, tuple) and (ctx[0], ctx[1], ctx[2]) == (ctx.trace_id, ctx.span_id, ctx.is_remote)
                == (0x1234, 0x56, True)):
            return SpanContext
    except Exception:
        pass
    return None


def _probe_status() -> type | None:
    """Status when its code and description are the instance's ``_status_code`` and ``_description``."""
    try:
        status = Status(StatusCode.ERROR, "probe")
        if (vars(status).get("_status_code") is status.status_code is StatusCode.ERROR
                and vars(status).get("_description") == status.description == "probe"):
            return Status
    except Exception:
        pass
    return None


def _probe_events() -> type | None:
    """BoundedList when its items are the deque ``_dq`` its ``__len__`` (a Python call) measures."""
    try:
        probe = BoundedList(2)
        probe.append("probe")
        queue = vars(probe).get("_dq")
        if type(queue) is collections.deque and len(queue) == len(probe) == 1 and not vars(BoundedList(2))["_dq"]:
            return BoundedList
    except Exception:
        pass
    return None


_CONTEXT_TYPE = _probe_context()
_STATUS_TYPE = _probe_status()
_EVENTS_TYPE = _probe_events()


def status_of(span: ReadableSpan) -> str:
    return "failed" if span.status.status_code is StatusCode.ERROR else "completed"


# error.type of a run stopped from outside rather than failing: Ctrl-C, a cancelled asyncio task. Its run row
# is `cancelled` (a status of cmbagent's WorkflowState); dag_nodes and execution_events have no such status
# in the contract, so its nodes and events stay `failed`, with the reason.
#: a run ended by one of these (its workflow span's ``error.type``) was stopped, not failed: Ctrl-C, a cancelled
#: task, MARS's pause/cancel check (``PhaseExecutionManager.raise_if_cancelled``: the user cancelled it in the UI)
INTERRUPTED = sc.STOPPED_ERROR_TYPES


def _run_status(failed: bool, attrs: Mapping[str, Any]) -> str:
    if not failed:
        return "completed"
    return "cancelled" if attrs.get(sc.ERROR_TYPE) in INTERRUPTED else "failed"


# the OpenTelemetry SDK's status message of an exception without a message (``f"{type}: {exc}"``, e.g.
# ``KeyboardInterrupt: ``), from a span another instrumentation or process ended: stored as the type alone
_TYPE_WITHOUT_MESSAGE = re.compile(r"([A-Za-z_][\w.]*): ")


def _error_of(span: ReadableSpan) -> str | None:
    if span.status.status_code is not StatusCode.ERROR:
        return None
    description = span.status.description or (span.attributes or {}).get(sc.ERROR_TYPE) or "error"
    if type(description) is str and description.endswith(": "):
        bare = _TYPE_WITHOUT_MESSAGE.fullmatch(description)
        description = bare.group(1) if bare is not None else description
    return truncate(_values.redact(str(description)))


def _ms_between(start_ns: int | None, end_ns: int | None) -> int | None:
    if start_ns is None or end_ns is None:
        return None
    return min(_INT32, max(0, (end_ns - start_ns) // 1_000_000))  # duration_ms is INTEGER: ~24.8 days


# --- batch container ----------------------------------------------------------------------

@dataclass
class RunCandidate:
    """The best ``workflow_runs`` row a batch knows for a run, with its precedence rank."""

    rank: int
    row: dict[str, Any]


@dataclass
class MappedBatch:
    """Rows for one batch of spans, keyed by primary key where the table has a natural one."""

    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, RunCandidate] = field(default_factory=dict)
    node_placeholders: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # node rows of spans that have started, not ended (the live DAG): never replace a finished row
    started_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_placeholders: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # foreign event id -> (event id its parent span would have, run id)
    foreign_parents: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    # runs whose nodes or run row changed: derived rows must be recomputed
    dag_runs: set[str] = field(default_factory=set)
    # runs with events the derived roll-ups read (LLM usage; code runs without an agent name)
    rollup_runs: set[str] = field(default_factory=set)


def _touch_session(batch: MappedBatch, session_id: str, start: datetime | None, end: datetime | None) -> None:
    start = start or end or _EPOCH
    end = end or start
    row = batch.sessions.get(session_id)
    if row is None:
        batch.sessions[session_id] = session_row(session_id, start, end)
    else:
        if start < row["created_at"]:
            row["created_at"] = start
        if end > row["last_active_at"]:
            row["last_active_at"] = end


def session_row(session_id: str, start: Any, end: Any, *, status: str = "active",
                meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A full ``sessions`` row (cmbagent's shape: every NOT NULL column set)."""
    return {
        "id": session_id,
        "user_id": None,
        "name": DEFAULT_SESSION_NAME if session_id == sc.DEFAULT_SESSION_ID else session_id[:255],
        "created_at": start,
        "last_active_at": end,
        "status": status,
        "meta": meta or {"source": "cmbagent-otel"},
        "resource_limits": None,
    }


def run_row(run_id: str, session_id: str, **values: Any) -> dict[str, Any]:
    """A full ``workflow_runs`` row with every NOT NULL column set."""
    row: dict[str, Any] = {
        "id": run_id, "session_id": session_id, "project_id": None, "mode": "unknown", "agent": "unknown",
        "model": "unknown", "status": "executing", "started_at": None, "completed_at": None,
        "last_heartbeat_at": None, "checkpoint_frequency_minutes": CHECKPOINT_FREQUENCY_MINUTES,
        "task_description": None, "meta": {"otel_source": "placeholder"}, "branch_parent_id": None,
        "is_branch": False, "branch_depth": 0, "parent_run_id": None, "stage_number": None, "stage_name": None,
    }
    row.update(values)
    return row


def _offer_run(batch: MappedBatch, run_id: str, rank: int, row: dict[str, Any]) -> None:
    current = batch.runs.get(run_id)
    if current is None or better_run(rank, row, current.rank, current.row):
        batch.runs[run_id] = RunCandidate(rank, row)


def better_run(rank: int, row: Mapping[str, Any], other_rank: int, other: Mapping[str, Any]) -> bool:
    """Whether ``row`` should replace ``other`` (higher rank; then earlier start; then span id)."""
    if rank != other_rank:
        return rank > other_rank
    if rank == RANK_PLACEHOLDER:
        return False
    key = (row.get("started_at") or _EPOCH, (row.get("meta") or {}).get("span_id", ""))
    other_key = (other.get("started_at") or _EPOCH, (other.get("meta") or {}).get("span_id", ""))
    return key < other_key


def node_placeholder(run_id: str, session_id: str, short_id: str) -> dict[str, Any]:
    """A node row standing in for a node span that has not arrived yet."""
    return {
        "id": node_db_id(run_id, short_id), "run_id": run_id, "session_id": session_id, "parent_node_id": None,
        "node_type": sc.NODE_AGENT, "agent": "unknown", "status": "running", "order_index": 0, "depth": 0,
        "meta": {"id": short_id, "label": short_id, "type": sc.NODE_AGENT, "agent": "unknown", "status": "running",
                 "step_number": 0, "description": "", "placeholder": True, **ZERO_USAGE},
    }


# --- nodes --------------------------------------------------------------------------------

# The only values of a node row's meta (``_node_row``, ``node_placeholder``) taken from an
# attribute as it is (any type an attribute holds); every other one is text, a number, a bool
# or None, keyed by text. Whoever adds a raw value to the meta must name its key here.
RAW_NODE_META = ("attempt", "span_kind")


def _node_row(span: ReadableSpan, attrs: Mapping[str, Any], run_id: str, session_id: str,
              started: datetime | None, completed: datetime | None, *, running: bool = False,
              span_id: int | None = None, failed: bool | None = None) -> dict[str, Any]:
    """``span``'s ``dag_nodes`` row (``span_id`` and ``failed``: the span's, when the caller read them)."""
    get = attrs.get
    short = str(attrs[sc.DAG_NODE])
    node_type = str(get(sc.DAG_NODE_TYPE) or sc.NODE_AGENT)
    kind = get(sc.SPAN_KIND)
    parent_short = get(sc.DAG_PARENT_NODE)
    order_index = get(sc.DAG_ORDER_INDEX)
    if type(order_index) is not int or not -_INT32 <= order_index <= _INT32:
        order_index = _int(order_index, 0)
    if failed is None:
        failed = span.status.status_code is StatusCode.ERROR
    failed = not running and failed
    status = RUNNING if running else "failed" if failed else "completed"
    error = _error_of(span) if failed else None
    # _text of each, the common case (absent or text) inline
    goal = get(sc.STEP_GOAL)
    if goal is not None and type(goal) is not str:
        goal = _text(goal)
    summary = get(sc.STEP_SUMMARY)
    if summary is not None and type(summary) is not str:
        summary = _text(summary)
    phase_name = get(sc.PHASE)
    if phase_name is not None and type(phase_name) is not str:
        phase_name = _text(phase_name)
    agent = get(sc.STEP_AGENT) or get(sc.GEN_AI_AGENT_NAME)
    step_number: int = order_index
    if kind == sc.KIND_PHASE:
        agent = agent or ("planner" if node_type == sc.NODE_PLANNING else phase_name)
        label = str(phase_name or short)
        description = f"{phase_name} phase"
    elif kind == sc.KIND_STEP:
        step_number = _int(get(sc.STEP_NUMBER), order_index)
        label = f"Step {step_number}: {str(goal or '')[:80]}"
        description = str(goal or "")
    elif node_type == sc.NODE_REDO:
        step_number = _int(get(sc.STEP_NUMBER), order_index)
        label = f"Redo {get(sc.BRANCH_ATTEMPT, '?')} of step {step_number}"
        description = str(get(sc.BRANCH_HYPOTHESIS) or label)
    elif kind == sc.KIND_CONVERSATION:
        initiator = _text(get(sc.CONVERSATION_INITIATOR))
        recipient = _text(get(sc.CONVERSATION_RECIPIENT)) or _text(agent)
        agent = agent or recipient or initiator
        label = f"{initiator or '?'} -> {recipient or '?'}"
        description = _text(get(sc.CONVERSATION_SUMMARY)) or span.name
    else:
        label = str(agent or span.name)
        description = span.name
    agent = _str(agent or "unknown", 100)
    meta: dict[str, Any] = {
        "id": short, "label": label, "type": node_type, "agent": agent, "status": status,
        "step_number": step_number, "description": description, **ZERO_USAGE,
    }
    if goal is not None:
        meta["goal"] = goal
        meta["task"] = goal
    if summary is not None:
        meta["summary"] = summary
    if error is not None:
        meta["error"] = error
    if phase_name is not None:
        meta["phase"] = phase_name
        if kind == sc.KIND_PHASE:
            own_dir = get(sc.PHASE_WORK_DIR)
            if isinstance(own_dir, str) and own_dir:
                meta["work_dir"] = own_dir  # relative to the run's: its files are this node's
    if node_type == sc.NODE_REDO:
        meta["branch_name"] = _text(get(sc.BRANCH_NAME))
        meta["attempt"] = get(sc.BRANCH_ATTEMPT)
        meta["hypothesis"] = _text(get(sc.BRANCH_HYPOTHESIS))
    meta["span_kind"] = kind
    meta["span_name"] = span.name
    meta["span_id"] = f"{span.context.span_id if span_id is None else span_id:016x}"
    order = get(sc.EXECUTION_ORDER)
    meta["execution_order"] = order if type(order) is int and -_INT32 <= order <= _INT32 else _int(order, 0)
    meta["started_at"] = _iso(started) if started is not None else None
    meta["completed_at"] = _iso(completed) if completed is not None else None
    start_ns, end_ns = span.start_time, span.end_time
    meta["duration_ms"] = (None if start_ns is None or end_ns is None
                           else min(_INT32, max(0, (end_ns - start_ns) // 1_000_000)))  # _ms_between
    depth = get(sc.DAG_DEPTH)
    row = {
        "id": node_db_id(run_id, short), "run_id": run_id, "session_id": session_id,
        "parent_node_id": node_db_id(run_id, str(parent_short)) if parent_short else None,
        "node_type": node_type[:50], "agent": agent, "status": status, "order_index": order_index,
        "depth": depth if type(depth) is int and -_INT32 <= depth <= _INT32 else _int(depth, 0), "meta": meta,
    }
    if not failed and get(sc.STEP_STATUS if kind == sc.KIND_STEP else sc.PHASE_STATUS) == sc.STEP_NOT_STARTED:
        _as_not_started(row)
    return row


def _as_not_started(row: dict[str, Any]) -> None:
    """A cmbagent plan step that never ran (the plan stopped before it), or the fixed pipeline's
    ``execute`` of a run that failed before its first solve: pending, never started, as cmbagent's DAG
    leaves a node it created and did not reach."""
    row["status"] = "pending"
    row["meta"].update(status="pending", started_at=None, completed_at=None, duration_ms=None)


# --- events -------------------------------------------------------------------------------

def _event_io(kind: Any, attrs: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    g = attrs.get
    if kind == sc.KIND_LLM:
        return ({"model": g(sc.GEN_AI_REQUEST_MODEL)},
                {"model": g(sc.GEN_AI_RESPONSE_MODEL), "finish_reasons": _plain(g(sc.GEN_AI_RESPONSE_FINISH_REASONS))})
    if kind == sc.KIND_TOOL:
        return ({"tool": g(sc.GEN_AI_TOOL_NAME), "args": g(sc.GEN_AI_TOOL_CALL_ARGUMENTS)},
                {"result": _json_string(g(sc.GEN_AI_TOOL_CALL_RESULT))})
    if kind == sc.KIND_CODE:
        return ({"language": g(sc.CODE_LANGUAGE), "code": g(sc.CODE_SOURCE)},
                {"exit_code": g(sc.CODE_EXIT_CODE), "result": g(sc.CODE_OUTPUT)})
    if kind == sc.KIND_SPEAKER_SELECTION:
        return ({"from": g(sc.HANDOFF_FROM), "candidates": _plain(g(sc.HANDOFF_CANDIDATES))},
                {"to": g(sc.HANDOFF_TO), "reason": g(sc.HANDOFF_REASON)})
    if kind == sc.KIND_HUMAN_INPUT:
        return {"prompt": g(sc.HUMAN_INPUT_PROMPT)}, {"response": g(sc.HUMAN_INPUT_RESPONSE)}
    if kind in (sc.KIND_CONVERSATION, sc.KIND_MULTI_CONVERSATION):
        return ({"initiator": g(sc.CONVERSATION_INITIATOR), "recipient": g(sc.CONVERSATION_RECIPIENT)},
                {"summary": g(sc.CONVERSATION_SUMMARY), "chat_count": g(sc.CONVERSATION_CHAT_COUNT)})
    if kind == sc.KIND_AGENT:
        return {"sender": g(sc.AGENT_SENDER)}, None
    return None, None


def _json_string(value: Any) -> Any:
    """A content attribute holding a JSON string literal (a tool's text result) as that text."""
    if isinstance(value, str) and value.startswith('"'):
        try:
            decoded = loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def _parts_text(parts: Any) -> str:
    """Text of a GenAI-conventions message: its text parts as they are, other parts (tool calls,
    tool responses) as JSON."""
    if not isinstance(parts, list):
        return json.dumps(parts, default=str)
    texts = []
    for part in parts:
        text = part.get("content") if isinstance(part, dict) and part.get("type") == "text" else None
        texts.append(text if isinstance(text, str) else json.dumps(part, default=str))
    return "\n".join(texts)


def _agent_of(kind: Any, attrs: Mapping[str, Any]) -> Any:
    """The agent an event belongs to: the acting agent, not the one it talks to.

    A handoff is named after the agent handing off (its target is in ``outputs``; AG2's
    first selection has no previous speaker, then the chosen one names it); a
    conversation after its initiator (its recipient, ``gen_ai.agent.name``, is often a
    group chat manager), else its recipient. Code executions without an agent get the
    agent of their DAG node in the writer's derived pass.
    """
    g = attrs.get
    if kind == sc.KIND_SPEAKER_SELECTION:
        source = g(sc.HANDOFF_FROM)
        if source is None or source == "none":
            return g(sc.HANDOFF_TO) or g(sc.GEN_AI_AGENT_NAME)
        return source
    if kind in (sc.KIND_CONVERSATION, sc.KIND_MULTI_CONVERSATION):
        return g(sc.CONVERSATION_INITIATOR) or g(sc.GEN_AI_AGENT_NAME)
    return g(sc.GEN_AI_AGENT_NAME)


# kinds whose acting agent is not gen_ai.agent.name (see _agent_of)
_ACTING_KINDS = frozenset({sc.KIND_SPEAKER_SELECTION, sc.KIND_CONVERSATION, sc.KIND_MULTI_CONVERSATION})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _event_type(kind: Any, span: ReadableSpan, attrs: Mapping[str, Any]) -> tuple[str, str]:
    if kind is None:
        return FOREIGN_TYPE
    if kind == sc.KIND_CODE:
        exit_code = attrs.get(sc.CODE_EXIT_CODE)
        failed = span.status.status_code is StatusCode.ERROR or (exit_code is not None and _int(exit_code, 1) != 0)
        return ("code_exec", "error" if failed else "complete")
    return EVENT_TYPES.get(kind, ("info", str(kind)[:50]))


# Attribute keys and short values repeat across spans; caching their scrubbed form is what
# makes the writer fast. The value cache starts afresh whenever a new secret is registered.
_values = redaction.RedactionCache(max_len=256, max_chars=4_000_000)


def _redact_text(value: str) -> str:
    # a value past the memo's length may be far past the attribute bound (another
    # instrumentation's: the SDK sets no length limit): cut like ours, reading a bounded prefix
    return _values.redact(value) if len(value) <= _values.max_len else (safe_text(value) or "")


# Attributes whose text fills row columns and the node and run facts (names, ids, agents, models, a run's
# task, a step's goal), read as they are: our instrumentation redacts them when it records them. The
# rest is redacted by the mapping for every span (meta, span names, errors, message contents).
_COLUMN_KEYS = frozenset({
    sc.SESSION_ID, sc.DAG_NODE, sc.DAG_NODE_TYPE, sc.DAG_PARENT_NODE, sc.WORKFLOW_NAME, sc.WORKFLOW_MODE,
    sc.WORKFLOW_TASK, sc.WORKFLOW_AGENT, sc.WORKFLOW_MODEL, sc.WORKFLOW_WORK_DIR, sc.WORKFLOW_TASK_ID,
    sc.WORKFLOW_FILES, sc.PHASE, sc.PHASE_STATUS, sc.PHASE_WORK_DIR, sc.STEP_GOAL, sc.STEP_AGENT,
    sc.STEP_SUMMARY, sc.STEP_STATUS, sc.BRANCH_NAME, sc.BRANCH_HYPOTHESIS, sc.CONVERSATION_INITIATOR,
    sc.CONVERSATION_RECIPIENT, sc.CONVERSATION_SUMMARY, sc.AGENT_SENDER, sc.HANDOFF_FROM, sc.HANDOFF_TO,
    sc.HANDOFF_REASON, sc.HANDOFF_CANDIDATES, sc.GEN_AI_AGENT_NAME, sc.GEN_AI_REQUEST_MODEL,
    sc.GEN_AI_RESPONSE_MODEL, sc.GEN_AI_TOOL_NAME, sc.CODE_LANGUAGE, sc.SPAN_KIND, sc.ERROR_TYPE,
    sc.GEN_AI_RESPONSE_FINISH_REASONS, sc.HUMAN_INPUT_PROMPT, sc.HUMAN_INPUT_RESPONSE,
})


def _redact_column(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return _values.redact(value) if len(value) <= _values.max_len else redaction.redact(value)
    if kind is tuple:
        try:
            # every item a memo hit that is the item itself (finish reasons, candidates seen before),
            # read in C from the current memo, as _values.redact reads it first for each
            if tuple(map(_values.entries().get, value)) == value:
                return value
        except TypeError:  # an unhashable item: redacted one by one below
            pass
        return tuple(_redact_column(item) for item in value)
    if value is None or kind in _PLAIN_TYPES:
        return value
    # any other shape (a key/value list decodes to a dict): its texts and keys, as the meta has them;
    # the columns show its text, which held the key as sent before
    return _scrub_value(value)


def _with_clean_columns(attrs: Mapping[str, Any] | None, cache: dict[str, str]) -> dict[str, Any] | None:
    """A copy of ``attrs`` whose column attributes are redacted, or None when nothing changes
    (``cache``: the memo of redacted short texts, read in C first)."""
    keys = _COLUMN_KEYS.intersection(attrs) if attrs else None
    if not keys:
        return None
    changed = None
    for key in keys:
        value = attrs[key]
        clean = cache.get(value) if type(value) is str else None
        if clean is None:
            clean = _redact_column(value)
        if clean is not value and clean != value:
            if changed is None:
                changed = dict(attrs)
            changed[key] = clean
    return changed


def redact_columns(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """``spans`` from outside the process (an ingest client's), with the attributes that fill row
    columns redacted, in the span and in its events (a speaker selection's), as our instrumentation
    redacts them when it records them; a span with nothing to redact is kept as it is.

    The mapping redacts meta, names, errors and message contents of every span, but reads those
    attributes as they are: an ingest client's workflow name, task, task id, session id, node ids,
    agents and models went into ``workflow_runs``, ``dag_nodes``, ``sessions`` and
    ``session_states`` with the keys they held."""
    cache = _values.entries()  # computed with the secrets known now
    out: list[ReadableSpan] = []
    for span in spans:
        attrs = _with_clean_columns(span.attributes, cache)
        events = span.events  # a new tuple at every read: the span's own are told apart by `cleaned`
        cleaned = [_with_clean_columns(e.attributes, cache) for e in events] if events else None
        if cleaned is not None and cleaned.count(None) < len(cleaned):
            events = tuple(e if c is None else Event(e.name, c, e.timestamp)
                           for e, c in zip(events, cleaned, strict=True))
        elif attrs is None:
            out.append(span)
            continue
        out.append(ReadableSpan(
            name=span.name, context=span.context, parent=span.parent, resource=span.resource,
            attributes=span.attributes if attrs is None else attrs, events=events, links=span.links,
            kind=span.kind, instrumentation_scope=span.instrumentation_scope, status=span.status,
            start_time=span.start_time, end_time=span.end_time,
        ))
    return out


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return _redact_text(value) if type(value) is not redaction.SentBytes else scrub(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return [_scrub_value(v) for v in value]
    return scrub(value)


def _attributes_meta(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes as an event's ``meta.attributes``: secret keys' values replaced (and learned),
    every text redacted."""
    if _keys_version != redaction.secrets_version:
        _forget_keys()
    known, secret = _key_sets  # one read: another thread may replace both sets together
    if not known.issuperset(attrs) or not secret.isdisjoint(attrs):
        return _attributes_meta_keyed(attrs)
    # every key known and none a secret's: the key checks done in C, numbers kept by the copy
    out = attrs.copy() if type(attrs) is dict else dict(attrs)
    cache: dict[str, str] = _values.entries()  # computed with the secrets known now
    for key, value in attrs.items():
        kind = type(value)
        if kind is str:  # _meta_value's text case inline: most values, on every event span
            hit = cache.get(value)
            out[key] = hit if hit is not None else _redact_text(value)
        elif value is None or kind in _PLAIN_TYPES:
            continue
        else:
            out[key] = _meta_value(value, cache)
    return out


def _meta_value(value: Any, cache: dict[str, str]) -> Any:
    """:func:`_scrub_value` of one attribute value, its texts read from ``cache`` (the memo's
    entries) first (a tuple's items too: speaker candidates, finish reasons)."""
    kind = type(value)
    if kind is str:
        hit = cache.get(value)
        return hit if hit is not None else _redact_text(value)
    if value is None or kind in _PLAIN_TYPES:
        return value
    if kind is tuple:
        return [hit if type(item) is str and (hit := cache.get(item)) is not None else _scrub_value(item)
                for item in value]
    return _scrub_value(value)


def _meta_if_storable(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`_attributes_meta` of ``attrs`` if none of their keys and texts is one a database
    rejects (what _attrs_rejected checks), else None; also None (the general path) for a key not
    classified yet or a secret's, and for values other than text, numbers, None and tuples.

    One pass checks each value and reads its scrubbed form from the memo; the texts the memo
    lacks are redacted after the pass, in key order, so redaction (which may learn secrets)
    runs on exactly the texts, in exactly the order, _attributes_meta would have, and never on
    attributes that turn out to be unstorable.
    """
    if _keys_version != redaction.secrets_version:
        _forget_keys()
    known, secret = _key_sets
    if not known.issuperset(attrs) or not secret.isdisjoint(attrs) or not _storable_keys.issuperset(attrs):
        return None
    out = attrs.copy()
    cache: dict[str, str] = _values.entries()  # computed with the secrets known now
    clean = _clean_texts(cache)
    missed: list[str] | None = None
    for key, value in attrs.items():
        kind = type(value)
        if kind is str:
            hit = clean.get(value)  # a text checked storable before, scrubbed by this memo: both in one lookup
            if hit is None:
                if (not value.isascii() or "\x00" in value) and _rejected(value):
                    return None
                hit = cache.get(value)
                if hit is None:
                    if missed is None:
                        missed = [key]
                    else:
                        missed.append(key)
                    continue
                clean[value] = hit
            if hit is not value:  # out holds the value already (most texts redact to themselves)
                out[key] = hit
        elif value is None or kind in _PLAIN_TYPES:
            continue
        elif kind is tuple:
            scrubbed = []
            for item in value:
                if type(item) is str:
                    if _rejected(item):
                        return None
                    if (hit := cache.get(item)) is not None:
                        scrubbed.append(hit)
                        continue
                elif item is None or type(item) in _PLAIN_TYPES:
                    scrubbed.append(item)
                    continue
                scrubbed = None  # an item to redact: the whole value after the pass
                break
            if scrubbed is not None:
                out[key] = scrubbed
            elif any(type(item) is str and _rejected(item) for item in value):
                return None
            elif missed is None:
                missed = [key]
            else:
                missed.append(key)
        else:
            return None
    if missed is not None:
        for key in missed:
            out[key] = _meta_value(attrs[key], cache)
    return out


# Texts _meta_if_storable found storable (no NUL, no lone surrogate), with their scrubbed form
# from one redaction memo's entries: a pair replaced (never emptied in place) when that memo is.
_clean: tuple[dict[str, str], dict[str, str]] = ({}, {})


def _clean_texts(cache: dict[str, str]) -> dict[str, str]:
    """The storable texts scrubbed by ``cache`` (the redaction memo's entries), bounded like it."""
    global _clean
    entries, clean = _clean  # one read: another thread may replace the pair
    if entries is not cache or len(clean) >= 4096:
        clean = {}
        _clean = (cache, clean)
    return clean


def _attributes_meta_keyed(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_attributes_meta` checking each key (a key not seen yet, or a secret's)."""
    out: dict[str, Any] = {}
    cache: dict[str, str] = _values.entries()  # computed with the secrets known now
    known, secrets = _key_sets
    for key, value in attrs.items():
        secret = key in secrets if key in known else _secret_key(key)
        if secret:
            if not is_secret_key(key):  # a key that quotes a secret (a header named by a token)
                out[_redact_text(key)] = _meta_value(value, cache)
                continue
            learn_secrets_in({key: value})
            cache = {}  # a secret learned: nothing cached before it may be used
            out[key] = REDACTED
            continue
        out[key] = _meta_value(value, cache)
    return out


def _learn_split_items(attrs: Mapping[str, Any]) -> None:
    """Another instrumentation's string arrays (message lists, streamed chunks) are redacted item
    by item: learn first the pieces of a secret cut across two or more items."""
    for value in attrs.values():
        if type(value) is tuple and len(value) > 1:
            redaction.learn_split_secrets(value)


_PLAIN_TYPES = frozenset({bool, int, float})
# Attribute keys classified by is_secret_key (a fixed pattern: keys repeat across every span), and
# the secret ones among them (or that quote a secret: such a key is stored redacted). A key goes into
# the second set before the first, and a full pair is replaced by a new one (never emptied in place),
# so a reader holding a pair never sees a secret key as classified and not secret. Forgotten when
# the known secrets change (a key classified before may quote one learned since).
_key_sets: tuple[set[str], set[str]] = (set(), set())
_keys_version = -1


def _forget_keys() -> None:
    global _key_sets, _keys_version
    _keys_version = redaction.secrets_version
    _key_sets = (set(), set())


def _secret_key(key: str) -> bool:
    """Whether attribute key ``key`` names or quotes a secret, remembered in :data:`_key_sets`."""
    global _key_sets
    secret = is_secret_key(key) or _redact_text(key) != key
    known, secrets = _key_sets
    if len(known) >= 4096:
        known, secrets = _key_sets = (set(), set())
    if len(key) <= 256:
        if secret:
            secrets.add(key)
        known.add(key)
    return secret


def _event_row(span: ReadableSpan, attrs: Mapping[str, Any], run_id: str, session_id: str,
               trace_id: int, started: datetime | None, completed: datetime | None,
               trace_hex: str | None = None, trace_bytes: bytes | None = None, *, span_id: int | None = None,
               failed: bool | None = None, parent_span_id: int | None = None,
               clean: dict[str, Any] | None = None) -> dict[str, Any]:
    """``span``'s ``execution_events`` row (``span_id``, ``failed``, ``parent_span_id``: the span's,
    when the caller read them; ``clean``: its attributes' meta, when the caller made it)."""
    get = attrs.get
    kind = get(sc.SPAN_KIND)
    if type(kind) is not str and kind is not None:
        # an ingest client's kvlist is a dict (unhashable: the lookups below raised and failed its
        # whole request); shown as its text, like any kind we do not know
        kind = str(kind)
    if trace_bytes is None:
        trace_bytes = (trace_id & _ID128).to_bytes(16, "big")
    if failed is None:
        failed = span.status.status_code is StatusCode.ERROR
    if kind is None:
        event_type, subtype = FOREIGN_TYPE
    elif kind == sc.KIND_CODE:
        event_type, subtype = _event_type(kind, span, attrs)
    else:
        found = EVENT_TYPES.get(kind)
        event_type, subtype = found if found is not None else ("info", str(kind)[:50])
    if clean is None:
        if kind is None:
            _learn_split_items(attrs)
        clean = _attributes_meta(attrs)
    inputs, outputs = _event_io(kind, clean)
    parent = span.parent
    if span_id is None:
        span_id = span.context.span_id
        parent_span_id = parent.span_id if parent is not None else None
    name = span.name
    meta: dict[str, Any] = {
        "span_name": name,
        "trace_id": trace_hex or f"{trace_id:032x}",
        "span_id": f"{span_id:016x}",
        "parent_span_id": f"{parent_span_id:016x}" if parent is not None else None,
    }
    if kind is None:
        meta["name"] = name
    phase = get(sc.PHASE)
    if phase is not None:
        meta["workflow_phase"] = phase
    if kind == sc.KIND_LLM:
        # cmbagent's node execution summary adds meta["tokens"] to an int: the total goes
        # there, the split under its own keys
        prompt = _int(get(sc.GEN_AI_USAGE_INPUT_TOKENS), 0)
        completion = _int(get(sc.GEN_AI_USAGE_OUTPUT_TOKENS), 0)
        meta["tokens"] = _int(prompt + completion)
        meta["prompt_tokens"] = prompt
        meta["completion_tokens"] = completion
        meta["cost_usd"] = _float(get(sc.LLM_COST_USD))
        meta["model"] = _text(get(sc.GEN_AI_RESPONSE_MODEL) or get(sc.GEN_AI_REQUEST_MODEL))
    meta["attributes"] = clean
    short = get(sc.DAG_NODE)
    depth, order = _depth_and_order(get)
    agent = get(sc.GEN_AI_AGENT_NAME) if kind not in _ACTING_KINDS else _agent_of(kind, attrs)
    if agent is not None and (type(agent) is not str or len(agent) > 100):
        agent = str(agent)[:100]
    start_ns, end_ns = span.start_time, span.end_time
    return {
        "id": _event_id(trace_bytes, span_id), "run_id": run_id,
        "node_id": node_db_id(run_id, str(short)) if short else None, "step_id": None, "session_id": session_id,
        "parent_event_id": (_event_id(trace_bytes, parent_span_id)
                            if depth > 0 and parent is not None and kind is not None else None),
        "event_type": event_type, "event_subtype": subtype,
        "agent_name": agent, "agent_role": None,
        "timestamp": started or completed or _EPOCH, "started_at": started, "completed_at": completed,
        "duration_ms": (None if start_ns is None or end_ns is None
                        else min(_INT32, max(0, (end_ns - start_ns) // 1_000_000))),  # _ms_between
        "inputs": inputs or None, "outputs": outputs or None,
        "error_message": _error_of(span) if failed else None, "meta": meta,
        "execution_order": order, "depth": depth,
        "status": "failed" if failed else "completed",
    }


def _depth_and_order(get: Callable[[str], Any]) -> tuple[int, int]:
    """An event's depth and execution order as int32 (0 when missing or not a number): one call
    for both, the common case (an int in range) checked inline."""
    depth = get(sc.EVENT_DEPTH)
    if type(depth) is not int or not -_INT32 <= depth <= _INT32:
        depth = _int(depth, 0)
    order = get(sc.EXECUTION_ORDER)
    if type(order) is not int or not -_INT32 <= order <= _INT32:
        order = _int(order, 0)
    return depth, order


_HANDOFF_TYPE, _HANDOFF_SUBTYPE = EVENT_TYPES[sc.KIND_SPEAKER_SELECTION]


def _handoff_rows(span: ReadableSpan, attrs: Mapping[str, Any], run_id: str, session_id: str, trace_id: int,
                  trace_hex: str | None = None, trace_bytes: bytes | None = None, *,
                  span_id: int | None = None, at: Callable[[int], datetime] = _at) -> list[dict[str, Any]]:
    """The ``handoff`` execution events recorded as span events on ``span`` (speaker selections that
    did not ask the model): the same row a ``select_speaker`` span maps to, at the event's time,
    under the node and event it happened in, with an id from the span id and the event's index."""
    rows: list[dict[str, Any]] = []
    if span_id is None:
        span_id = span.context.span_id
    short = attrs.get(sc.DAG_NODE)
    node_id = node_db_id(run_id, str(short)) if short else None
    trace_hex = trace_hex or f"{trace_id:032x}"
    if trace_bytes is None:
        trace_bytes = (trace_id & _ID128).to_bytes(16, "big")
    span_bytes = trace_bytes + (span_id & _ID64).to_bytes(8, "big")
    span_hex = f"{span_id:016x}"
    span_event_id: str | None = None
    for index, event in enumerate(span.events):
        # read from a plain copy: the SDK's BoundedAttributes answers get() through Python-level Mapping methods
        ev = _plain_mapping(event.attributes)
        if ev.get(sc.SPAN_KIND) != sc.KIND_SPEAKER_SELECTION:
            continue
        clean = _meta_if_storable(ev)  # checked and scrubbed in one pass (nothing redacted in between)
        if clean is None:
            if _attrs_rejected(ev):
                ev = {k: _clean_value(v) for k, v in ev.items()}
            clean = _attributes_meta(ev)
        stamp = event.timestamp
        when = None if stamp is None else at(stamp)  # ts()
        g = clean.get  # _event_io of a speaker selection
        inputs = {"from": g(sc.HANDOFF_FROM), "candidates": _plain(g(sc.HANDOFF_CANDIDATES))}
        outputs = {"to": g(sc.HANDOFF_TO), "reason": g(sc.HANDOFF_REASON)}
        get = ev.get
        depth, order = _depth_and_order(get)
        error = get(sc.ERROR_TYPE)
        if depth > 0 and span_event_id is None:
            span_event_id = _event_id(trace_bytes, span_id)
        source = get(sc.HANDOFF_FROM)
        # _agent_of a speaker selection, written out
        agent = (get(sc.HANDOFF_TO) or get(sc.GEN_AI_AGENT_NAME)) if source is None or source == "none" else source
        rows.append({
            "id": binascii.b2a_base64(span_bytes + (index & 0xFFFFFF).to_bytes(3, "big"),
                                      newline=False).translate(_URLSAFE).decode("ascii"),
            "run_id": run_id,
            "node_id": node_id, "step_id": None, "session_id": session_id,
            "parent_event_id": span_event_id if depth > 0 else None,
            "event_type": _HANDOFF_TYPE, "event_subtype": _HANDOFF_SUBTYPE,
            "agent_name": None if agent is None else str(agent)[:100], "agent_role": None,
            "timestamp": when or _EPOCH, "started_at": when, "completed_at": when, "duration_ms": 0,
            "inputs": inputs or None, "outputs": outputs or None,
            "error_message": (truncate(_values.redact(str(get("exception.message") or error)))
                              if error is not None else None),
            "meta": {"span_name": f"select_speaker {source}" if type(source) is str
                     else db_text(f"select_speaker {source}"),
                     "trace_id": trace_hex, "span_id": None, "parent_span_id": span_hex,
                     "event_index": index, "attributes": clean},
            "execution_order": order, "depth": depth,
            "status": "failed" if error is not None else "completed",
        })
    return rows


def event_placeholder(child: Mapping[str, Any], parent_id: str) -> dict[str, Any]:
    """An event row standing in for a parent span that has not arrived yet."""
    return {
        "id": parent_id, "run_id": child["run_id"], "node_id": child["node_id"], "step_id": None,
        "session_id": child["session_id"], "parent_event_id": None, "event_type": "info",
        "event_subtype": PLACEHOLDER_SUBTYPE, "agent_name": None, "agent_role": None,
        "timestamp": child["timestamp"], "started_at": None, "completed_at": None, "duration_ms": None,
        "inputs": None, "outputs": None, "error_message": None, "meta": {"placeholder": True},
        "execution_order": child["execution_order"], "depth": max(0, child["depth"] - 1), "status": "running",
    }


def _messages(span: ReadableSpan, attrs: Mapping[str, Any], event: Mapping[str, Any]) -> list[dict[str, Any]]:
    agent = str(attrs.get(sc.GEN_AI_AGENT_NAME) or attrs.get(sc.CONVERSATION_RECIPIENT) or "assistant")[:100]
    other = str(attrs.get(sc.AGENT_SENDER) or attrs.get(sc.CONVERSATION_INITIATOR) or "user")[:100]
    rows: list[dict[str, Any]] = []
    for key, inbound, when in ((sc.GEN_AI_INPUT_MESSAGES, True, event["started_at"]),
                               (sc.GEN_AI_OUTPUT_MESSAGES, False, event["completed_at"])):
        raw = attrs.get(key)
        if raw is None:
            continue
        for index, (sender, content) in enumerate(_split_messages(raw)):
            rows.append({
                "run_id": event["run_id"], "step_id": None, "event_id": event["id"], "node_id": event["node_id"],
                "sender": (sender or other)[:100] if inbound else agent,
                "recipient": agent if inbound else other,
                "content": scrub(content), "timestamp": when or event["timestamp"], "tokens": None,
                "meta": {"direction": "input" if inbound else "output", "index": index},
            })
    return rows


def _split_messages(raw: Any) -> list[tuple[str | None, str]]:
    value = raw
    if isinstance(raw, str):
        try:
            value = loads(raw)  # an ingest client's text nested too deep is text, not a failed batch
        except ValueError:
            return [(None, raw)]
    if isinstance(value, (list, tuple)):
        out: list[tuple[str | None, str]] = []
        for item in value:
            if isinstance(item, dict):
                sender = item.get("name") or item.get("role")
                content = _parts_text(item["parts"]) if "parts" in item else item.get("content")
                out.append((str(sender) if sender else None,
                            content if isinstance(content, str) else json.dumps(content, default=str)))
            else:
                out.append((None, str(item)))
        return out
    if isinstance(value, dict):
        return _split_messages([value])
    return [(None, str(raw))]


# --- the batch ----------------------------------------------------------------------------

def _node_placeholder(wanted: dict[str, tuple[str, str, str]], run_id: str, session_id: str, short: Any) -> None:
    """Note that the node ``short`` of ``run_id`` needs a row (its placeholder unless its span is in the batch)."""
    short = str(short)
    node_id = node_db_id(run_id, short)
    if node_id not in wanted:
        wanted[node_id] = (run_id, session_id, short)


def map_spans(spans: Iterable[ReadableSpan], *, texts: bool = True) -> MappedBatch:
    """Map spans (any order, duplicates allowed) to rows for every table.

    A :class:`~cmbagent_otel.processor.StartedSpan` is a *started* record (the durable
    processor sends one when a workflow or DAG-node span starts: the live DAG): it gives a
    run row of rank ``workflow_started`` (status ``executing``) or a ``running`` node row
    that the writer never lets replace a finished one; started records of other spans are
    ignored. Any other span is a finished one, even without an end time (an OTLP span with
    ``end_time_unix_nano`` 0): its rows have no completion time and no duration.

    ``texts``: the rows' times will be written as text (SQLite), so each is made with its text
    (see ``_stamps``); False (PostgreSQL takes datetimes) makes the text of node spans' times
    only (their meta holds it). The rows are the same either way.
    """
    batch = MappedBatch()
    traces: dict[int, tuple[str, str, bytes]] = {}  # trace id -> (run id, as hex, as 16 bytes)
    sessions = batch.sessions
    # Placeholders are built at the end, for the nodes and parent events the batch did not bring
    # (spans arrive in end order: most parents come after their children, in the same batch).
    # Node id -> (run id, session id, short id); parent event id -> the first child event row.
    wanted_nodes: dict[str, tuple[str, str, str]] = {}
    _max_name = redaction.max_length()
    wanted_events: dict[str, dict[str, Any]] = {}
    for span in spans:
        view = _view(span)
        ctx = view.context
        if ctx is None:
            continue
        running = isinstance(span, StartedSpan)
        attrs = _plain_mapping(view.attributes)
        name = view.name
        start_ns, end_ns = view.start_time, view.end_time
        status = view.status
        events = view.events  # only tested for emptiness here: the deque, not its Python-level __len__
        if type(events) is _EVENTS_TYPE:
            events = events._dq  # type: ignore[union-attr]
        if type(status) is _STATUS_TYPE:  # its fields, without the properties' Python calls
            failed = status._status_code is StatusCode.ERROR  # type: ignore[union-attr]
            description = status._description  # type: ignore[union-attr]
        else:
            failed = status.status_code is StatusCode.ERROR
            description = status.description
        # _unstorable, written out; an event span's attribute values are checked in the same pass
        # that scrubs them for its meta (_meta_if_storable), when nothing is redacted between
        # that pass and its event row (no handoff events, no error text, a span of ours)
        clean = None
        if (((not name.isascii() or "\x00" in name) and _rejected(name)) or len(name) > _max_name
                or (start_ns is not None and not 0 <= start_ns <= _MAX_NS)
                or (end_ns is not None and not 0 <= end_ns <= _MAX_NS)
                or (type(description) is str and _rejected(description))):
            unstorable = True
        else:
            if (not running and not failed and not events and (raw_kind := attrs.get(sc.SPAN_KIND)) is not None
                    and raw_kind != sc.KIND_WORKFLOW and not (sc.DAG_NODE_TYPE in attrs and sc.DAG_NODE in attrs)):
                clean = _meta_if_storable(attrs)
            unstorable = clean is None and _attrs_rejected(attrs)
        if unstorable:
            span, attrs = sanitized(span, attrs)
            view = _view(span)
            start_ns, end_ns = view.start_time, view.end_time
        if type(view.name) is str and _values.redact(view.name) != view.name:  # (memoised) a name quoting a key
            view = view._replace(name=_values.redact(view.name))
        span = view  # type: ignore[assignment]
        if type(ctx) is _CONTEXT_TYPE:
            trace_id, span_id = ctx[0], ctx[1]
        else:
            trace_id, span_id = ctx.trace_id, ctx.span_id
        parent = view.parent
        if parent is None:
            parent_span_id, parent_remote = None, False
        elif type(parent) is _CONTEXT_TYPE:
            parent_span_id, parent_remote = parent[1], parent[2]
        else:
            parent_span_id, parent_remote = parent.span_id, parent.is_remote
        found = traces.get(trace_id)
        if found is None:
            found = traces[trace_id] = (run_id_of(trace_id), f"{trace_id:032x}",
                                        (trace_id & _ID128).to_bytes(16, "big"))
        run_id, trace_hex, trace_bytes = found
        session_id = attrs.get(sc.SESSION_ID) or sc.DEFAULT_SESSION_ID
        if type(session_id) is not str or len(session_id) > 36:
            session_id = str(session_id)[:36]
        is_node = sc.DAG_NODE_TYPE in attrs and sc.DAG_NODE in attrs
        at = _at if texts or is_node else _bare
        started = None if start_ns is None else at(start_ns)  # ts()
        if end_ns is None:
            completed = None
        else:  # the wall clock stepped back while the span ran: its rows end when they start, never before
            completed = at(end_ns if start_ns is None or end_ns >= start_ns else start_ns)
        kind = attrs.get(sc.SPAN_KIND)
        if running and kind != sc.KIND_WORKFLOW and not is_node:
            continue
        session = sessions.get(session_id)
        if session is None or started is None or completed is None:
            _touch_session(batch, session_id, started, completed)
        else:  # _touch_session's range update, written out: spans arrive in end order, so nearly every one
            if started < session["created_at"]:
                session["created_at"] = started
            if completed > session["last_active_at"]:
                session["last_active_at"] = completed
        if run_id not in batch.runs:
            batch.runs[run_id] = RunCandidate(RANK_PLACEHOLDER, run_row(run_id, session_id))
        if events:
            handoffs = _handoff_rows(span, attrs, run_id, session_id, trace_id, trace_hex, trace_bytes,
                                     span_id=span_id, at=_at if texts else _bare)
            if handoffs and handoffs[0]["node_id"] is not None:  # all under the span's node
                _node_placeholder(wanted_nodes, run_id, session_id, attrs[sc.DAG_NODE])
            for handoff in handoffs:
                batch.events[handoff["id"]] = handoff
                parent_event = handoff["parent_event_id"]
                if parent_event is not None and parent_event not in wanted_events:
                    wanted_events[parent_event] = handoff
        if kind == sc.KIND_WORKFLOW:
            pairs = (("name", attrs.get(sc.WORKFLOW_NAME)), ("task_id", attrs.get(sc.WORKFLOW_TASK_ID)),
                     ("work_dir", attrs.get(sc.WORKFLOW_WORK_DIR)))
            meta = {k: v for k, v in pairs if v is not None}
            files = attrs.get(sc.WORKFLOW_FILES)
            if files is not None:
                meta["files"] = work_dir_files(files)
            meta.update({"otel_source": RANK_NAMES[RANK_STARTED if running else RANK_WORKFLOW],
                         "trace_id": trace_hex, "span_id": f"{span_id:016x}",
                         "error": None if running or not failed else _error_of(span)})
            _offer_run(batch, run_id, RANK_STARTED if running else RANK_WORKFLOW, run_row(
                run_id, session_id, mode=_str(attrs.get(sc.WORKFLOW_MODE) or "one-shot", 50),
                agent=_str(attrs.get(sc.WORKFLOW_AGENT) or "unknown", 100),
                model=_str(attrs.get(sc.WORKFLOW_MODEL) or "unknown", 100),
                status="executing" if running else _run_status(failed, attrs),
                started_at=started, completed_at=completed, task_description=_text(attrs.get(sc.WORKFLOW_TASK)),
                meta=meta,
            ))
            batch.dag_runs.add(run_id)
            continue
        if not running and (parent is None or parent_remote):
            _offer_run(batch, run_id, RANK_ROOT, run_row(
                run_id, session_id, mode=("ag2-chat" if kind is not None else span.name)[:50],
                agent=_str(attrs.get(sc.GEN_AI_AGENT_NAME) or "unknown", 100),
                model=_str(attrs.get(sc.GEN_AI_RESPONSE_MODEL) or attrs.get(sc.GEN_AI_REQUEST_MODEL) or "unknown", 100),
                status=_run_status(failed, attrs), started_at=started, completed_at=completed,
                task_description=span.name,
                meta={"otel_source": "root", "name": span.name, "trace_id": f"{trace_id:032x}",
                      "span_id": f"{span_id:016x}", "error": _error_of(span) if failed else None},
            ))
            batch.dag_runs.add(run_id)
        if is_node:
            node = _node_row(span, attrs, run_id, session_id, started, completed, running=running,
                             span_id=span_id, failed=failed)
            (batch.started_nodes if running else batch.nodes)[node["id"]] = node
            parent_short = attrs.get(sc.DAG_PARENT_NODE)
            if parent_short:
                _node_placeholder(wanted_nodes, run_id, session_id, parent_short)
            batch.dag_runs.add(run_id)
            continue
        event = _event_row(span, attrs, run_id, session_id, trace_id, started, completed, trace_hex, trace_bytes,
                           span_id=span_id, failed=failed, parent_span_id=parent_span_id, clean=clean)
        batch.events[event["id"]] = event
        if event["node_id"] is not None and event["node_id"] not in wanted_nodes:  # its node's id
            _node_placeholder(wanted_nodes, run_id, session_id, attrs[sc.DAG_NODE])
        if kind is None:
            parent_id = _event_id(trace_bytes, parent_span_id) if parent is not None and not parent_remote else None
            batch.foreign_parents[event["id"]] = (parent_id, run_id)
        elif (parent_event := event["parent_event_id"]) is not None and parent_event not in wanted_events:
            wanted_events[parent_event] = event
        if kind == sc.KIND_LLM or (kind == sc.KIND_CODE and event["agent_name"] is None):
            batch.rollup_runs.add(run_id)
        if sc.GEN_AI_INPUT_MESSAGES in attrs or sc.GEN_AI_OUTPUT_MESSAGES in attrs:
            batch.messages.extend(_messages(span, attrs, event))
    nodes = batch.nodes
    for node_id, (run_id, session_id, short) in wanted_nodes.items():
        if node_id not in nodes:
            batch.node_placeholders[node_id] = node_placeholder(run_id, session_id, short)
    for node_id in nodes:
        batch.started_nodes.pop(node_id, None)  # the span ended within the batch
    events = batch.events
    for event_id, child in wanted_events.items():
        if event_id not in events:
            batch.event_placeholders[event_id] = event_placeholder(child, event_id)
    return batch


# --- rows derived from a run's node set ---------------------------------------------------

MAX_FILES = 1000
_FILE_PATH_LIMIT = 1000  # files.file_path VARCHAR(1000)


def work_dir_files(value: Any) -> list[list[Any]]:
    """The workflow span's :data:`semconv.WORKFLOW_FILES` as the run's ``meta.files``: ``[path relative to
    the work dir, size in bytes, modification time in ns]`` per well-formed entry (redacted, at most
    :data:`MAX_FILES`); anything else (another producer's attribute) is left out."""
    out: list[list[Any]] = []
    if not isinstance(value, (tuple, list)):
        return out
    for item in value[:MAX_FILES]:
        if type(item) is not str:
            continue
        parts = item.rsplit("\t", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        size, mtime = int(parts[1]), int(parts[2])
        if size < 2**63 and mtime < 2**63:
            out.append([db_text(_redact_text(parts[0]))[:_FILE_PATH_LIMIT], size, mtime])
    return out


class LlmUsage(NamedTuple):
    """One LLM event's usage as stored (``meta.prompt_tokens``/``completion_tokens``/``cost_usd``)."""

    node_id: str | None
    agent_name: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    at: datetime | None


@dataclass
class DerivedRows:
    """Rows computed from a run's whole node set and LLM usage; the writer upserts/diffs them.

    ``nodes`` are derived nodes (terminator, ``init``, branch points); ``node_updates`` are
    stored real nodes whose usage totals changed (their id and updated meta); ``edges`` hold
    at most one edge per (from, to) pair.
    """

    nodes: list[dict[str, Any]] = field(default_factory=list)
    node_updates: list[dict[str, Any]] = field(default_factory=list)
    edges: set[tuple[str, str, str, str | None]] = field(default_factory=set)
    steps: list[dict[str, Any]] = field(default_factory=list)
    child_runs: list[dict[str, Any]] = field(default_factory=list)
    branches: list[dict[str, Any]] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)
    session_state: dict[str, Any] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)


def _parse_ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _meta(node: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = node.get("meta")
    return meta if type(meta) is dict or isinstance(meta, Mapping) else {}


def _order_key(node: Mapping[str, Any]) -> tuple[int, int, str]:
    meta = node.get("meta")
    if type(meta) is not dict:
        meta = _meta(node)
    # _int and str of each, the common case (an int in range, text) inline
    order = meta.get("execution_order")
    if type(order) is not int or not -_INT32 <= order <= _INT32:
        order = _int(order, 0)
    short = meta.get("id", "")
    return (node["order_index"], order, short if type(short) is str else str(short))


def _derived_node(run_id: str, session_id: str, short: str, node_type: str, status: str, order: int, *,
                  agent: str, label: str, description: str, parent: str | None = None, depth: int = 0,
                  **extra: Any) -> dict[str, Any]:
    return {
        "id": node_db_id(run_id, short), "run_id": run_id, "session_id": session_id, "parent_node_id": parent,
        "node_type": node_type, "agent": agent, "status": status, "order_index": order, "depth": depth,
        "meta": {"id": short, "label": label, "type": node_type, "agent": agent, "status": status,
                 "step_number": order, "description": description, **ZERO_USAGE, "derived": True, **extra},
    }


def _starts_past_planning(top: Sequence[Mapping[str, Any]]) -> bool:
    """A run none of whose top-level nodes has order_index 0 (cmbagent's ``control`` with a plan
    file, ``human_in_the_loop``'s chat): cmbagent reads a run from its order-0 node (the DAG's
    first node, the resumable nodes' start), so it gets the derived ``init`` node."""
    return bool(top) and min(n["order_index"] for n in top) > 0


def _is_step(node: Mapping[str, Any]) -> bool:
    return node["node_type"] == sc.NODE_AGENT and _meta(node).get("span_kind") == sc.KIND_STEP


def derive_run_rows(run: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]],
                    usage: Sequence[LlmUsage] = ()) -> DerivedRows:
    """Derived nodes, edges, branch rows, node usage totals, cost records and session state of one run.

    ``run`` is the run's row, ``nodes`` its ``dag_nodes`` rows (meta decoded), ``usage`` its
    LLM events' usage. Derived nodes in ``nodes`` are ignored and recomputed. Everything
    depends only on these inputs (never on their order), so recomputing after any batch
    converges to the same rows.
    """
    out = DerivedRows()
    run_id = run["id"]
    session_id = run["session_id"]
    source = (run.get("meta") or {}).get("otel_source")
    if source == RANK_NAMES[RANK_STARTED]:
        source = "workflow"  # a live run is laid out like a finished one (its terminator pending)
    real_run = source in ("workflow", "root")
    real: list[Mapping[str, Any]] = []
    # A placeholder stands for a node span that has not arrived (it may never: a damaged
    # span). An event can insert one in a batch that recomputes nothing, so the layout
    # (edges, terminator, init) must not depend on placeholders, only link to them as parents.
    arrived: list[Mapping[str, Any]] = []
    for n in nodes:
        meta = n.get("meta")
        if type(meta) is not dict:
            meta = _meta(n)
        if meta.get("derived"):
            continue
        real.append(n)
        if not meta.get("placeholder"):
            arrived.append(n)
    by_id = {n["id"]: n for n in real}

    planning_type, agent_type = sc.NODE_PLANNING, sc.NODE_AGENT
    planning: list[Mapping[str, Any]] = []
    steps: list[Mapping[str, Any]] = []
    top: list[Mapping[str, Any]] = []  # no parent among the real nodes (nor itself)
    children: dict[str, list[Mapping[str, Any]]] = {}  # parent id -> its arrived children
    for n in arrived:
        node_type = n["node_type"]
        if node_type == planning_type:
            planning.append(n)
        elif node_type == agent_type and _is_step(n):
            steps.append(n)
        parent = n.get("parent_node_id")
        if parent in by_id and parent != n["id"]:
            found = children.get(parent)
            if found is None:
                children[parent] = [n]
            else:
                found.append(n)
        else:
            top.append(n)
    planning.sort(key=_order_key)
    steps.sort(key=_order_key)
    top.sort(key=_order_key)

    # cmbagent's fixed-pipeline layout (one-shot): init (order 0) -> execute -> terminator; a
    # workflow entered past planning starts from the same init node
    if not planning and (run.get("mode") == ONE_SHOT_MODE
                         or any(_meta(n).get("id") == ONE_SHOT_EXECUTE for n in top)
                         or (source == "workflow" and _starts_past_planning(top))):
        task = str(run.get("task_description") or "")
        init = _derived_node(run_id, session_id, NODE_INIT, sc.NODE_PLANNING, "completed", 0, agent="unknown",
                             label="Initialize", description="Initialize agent",
                             task=task[:100] + "..." if len(task) > 100 else task,
                             started_at=iso(run.get("started_at")))
        out.nodes.append(init)
        planning = [init]
        top = [init, *top]

    edges: dict[tuple[str, str], tuple[str, str | None]] = {}

    def link(a: str, b: str, kind: str = "sequential", condition: str | None = None) -> None:
        if a != b:
            edges.setdefault((a, b), (kind, condition))

    # cmbagent's chain: planning -> step_1 -> ... -> step_N -> terminator (without steps,
    # the run's top-level nodes in order)
    chain = planning + steps if steps else top
    for a, b in itertools.pairwise(chain):
        link(a["id"], b["id"])

    if source == "workflow" or (source == "root" and arrived):
        last_order = max((n["order_index"] for n in steps), default=max((n["order_index"] for n in chain), default=0))
        status = {"completed": "completed", "failed": "failed", "cancelled": "failed"}.get(run["status"], "pending")
        # a failed run's end says why, as cmbagent's tracker writes meta.error on every node it fails
        why = (run.get("meta") or {}).get("error") if status == "failed" else None
        # clamped: after a step numbered 2^31 - 1 or more, one more would not fit the INTEGER column
        term = _derived_node(run_id, session_id, NODE_TERMINATOR, NODE_TERMINATOR, status, _int(last_order + 1),
                             agent="system", label="Completion", description="End of workflow",
                             completed_at=iso(run.get("completed_at")),
                             **({"error": why} if isinstance(why, str) else {}))
        out.nodes.append(term)
        if chain:
            link(chain[-1]["id"], term["id"])

    step_rows = _derive_branches(out, run, by_id, real_run, link)

    # Every node reachable: parent -> first child, then consecutive siblings in order_index
    # order (sub-agents, redos, steps of a phase, agent turns of a conversation); the
    # top-level nodes in order. Pairs already linked above keep their first edge.
    for parent, kids in children.items():
        kids.sort(key=_order_key)
        link(parent, kids[0]["id"])
        for a, b in itertools.pairwise(kids):
            link(a["id"], b["id"])
    step_ids = {n["id"] for n in steps}
    for a, b in itertools.pairwise([n for n in top if n["id"] not in step_ids]):
        link(a["id"], b["id"])
    out.edges = {(a, b, kind, condition) for (a, b), (kind, condition) in edges.items()}

    _derive_usage(out, run, real, by_id, usage, step_rows)
    if source == "workflow" and planning and planning[0]["id"] in by_id:
        _first_node_task(out, run, planning[0])
    if source == "workflow" and run.get("mode") in _EXECUTE_LABELS:
        for n in top:  # cmbagent's execute node; a repeated solve's (execute_2, ...) numbered like its id
            short = _meta(n).get("id")
            if short == ONE_SHOT_EXECUTE:
                _execute_label(out, run, n)
            elif isinstance(short, str) and _REPEATED_EXECUTE.fullmatch(short) and n["node_type"] == sc.NODE_AGENT:
                _execute_label(out, run, n, short.rpartition("_")[2])

    if real_run:
        phases = sorted((n for n in real if _meta(n).get("span_kind") == sc.KIND_PHASE
                         or n["node_type"] in (sc.NODE_PLANNING, sc.NODE_CONTROL)),
                        key=lambda n: _int(_meta(n).get("execution_order"), 0))
        updated = run.get("completed_at") or run.get("started_at") or _EPOCH
        last_phase = _meta(phases[-1]) if phases else {}
        out.session_state = {
            "id": node_db_id("session_state", session_id), "session_id": session_id, "mode": run["mode"],
            "conversation_history": [], "context_variables": {"run_id": run_id}, "plan_data": None,
            "current_phase": str(last_phase.get("phase") or last_phase.get("id"))[:50] if phases else None,
            # the last step the run reached: a plan's never-started (pending) steps come after it
            "current_step": next((n["order_index"] for n in reversed(steps) if n["status"] != "pending"), None),
            # cmbagent's backend completes the session of a run that succeeded and suspends the one of a
            # run that failed (task_executor: complete_session / suspend_session), which its UI offers to resume
            "status": "active" if run["status"] == "executing" else "completed" if run["status"] == "completed"
            else "suspended",
            "created_at": (run.get("started_at") or updated).replace(tzinfo=timezone.utc),
            "updated_at": updated.replace(tzinfo=timezone.utc), "expires_at": None, "version": 1,
        }
        files = (run.get("meta") or {}).get("files")
        if files:
            _derive_files(out, run, real, files)
    return out


# cmbagent's DAG tracker's file classification (``_classify_file_type``): names, then folders, then extensions
_FILE_EXTENSIONS = (
    ((".py", ".js", ".ts", ".java", ".cpp", ".c", ".h", ".go", ".rs", ".rb", ".sh"), "code"),
    ((".csv", ".json", ".pkl", ".pickle", ".npz", ".npy", ".parquet", ".yaml", ".yml", ".h5", ".hdf5", ".fits"),
     "data"),
    ((".png", ".jpg", ".jpeg", ".gif", ".pdf", ".svg", ".eps", ".bmp", ".tiff"), "plot"),
    ((".txt", ".md", ".rst", ".html"), "report"),
    ((".log",), "log"),
)


def file_type_of(rel_path: str) -> str:
    """cmbagent's ``file_type`` of a work-dir file: plan/code/data/plot/report/chat/context/log/other."""
    parts = rel_path.lower().replace("\\", "/").split("/")
    name = rel_path.replace("\\", "/").rsplit("/", 1)[-1]
    ext = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name.lstrip(".") else ""
    if name == "final_plan.json" or name.endswith("_plan.json"):
        return "plan"
    if name.startswith(("timing_report", "cost_report")):
        return "report"
    for folder, kind in (("codebase", "code"), ("chats", "chat"), ("context", "context")):
        if folder in parts:
            return kind
    if "time" in parts or "cost" in parts:
        return "report"
    if "planning" in parts and ext == ".json":
        return "plan"
    for extensions, kind in _FILE_EXTENSIONS:
        if ext in extensions:
            return kind
    return "other"


def _derive_files(out: DerivedRows, run: Mapping[str, Any], real: Sequence[Mapping[str, Any]],
                  files: Any) -> None:
    """``files`` rows of the run's work-dir files (``meta.files``), as cmbagent's backend registers them.

    Its tracker scans the work dir when planning and each step complete and gives a file to the
    first node whose scan saw it; here a file goes to the first phase or step (by end time) that had
    not ended before the file's last modification, so the node that wrote it. A file in a phase's own
    folder (cmbagent's ``planning/``, ``control/``) stays with that phase: one written after it ended
    (the plan, cost and timing reports cmbagent writes once the phase's chat is over) is the phase's,
    not the next node's; a file written after every node and outside such a folder belongs to the run
    (no node). Type, phase, final-output flag and priority follow cmbagent's rules."""
    work_dir = (run.get("meta") or {}).get("work_dir")
    if not isinstance(work_dir, str) or not work_dir or not isinstance(files, list):
        return
    ends: list[tuple[datetime, str, Mapping[str, Any]]] = []
    phases: dict[str, Mapping[str, Any]] = {}  # phase name -> its (first) phase node
    own_dirs: dict[str, Mapping[str, Any]] = {}  # a solve's own work dir (relative, lower case) -> its phase node
    for n in real:
        meta = _meta(n)
        if (meta.get("span_kind") in (sc.KIND_PHASE, sc.KIND_STEP) and n["status"] != "pending"
                and not meta.get("placeholder")):
            end = _parse_ts(meta.get("completed_at"))
            if end is not None:
                ends.append((end, n["id"], n))
            if meta.get("span_kind") == sc.KIND_PHASE and isinstance(meta.get("phase"), str):
                phases.setdefault(meta["phase"].lower(), n)
                if isinstance(meta.get("work_dir"), str):
                    own_dirs.setdefault(meta["work_dir"].lower().strip("/") + "/", n)
    ends.sort(key=lambda e: (e[0], e[1]))
    run_id, session_id = run["id"], run["session_id"]
    base = work_dir.rstrip("/\\")
    for entry in files:
        try:
            rel, size, mtime = entry
            at = datetime.fromtimestamp(mtime / 1e9, timezone.utc).replace(tzinfo=None)
        except (TypeError, ValueError, OverflowError, OSError):
            continue
        path = f"{base}/{rel}"[:_FILE_PATH_LIMIT]
        parts = rel.lower().replace("\\", "/").split("/")
        node = next((n for end, _, n in ends if end >= at), None)
        own = phases.get(parts[0]) if len(parts) > 1 else None
        if own is not None and (node is None or _meta(node).get("phase") != _meta(own).get("phase")):
            node = own
        if own_dirs:  # a file in a solve's own folder is that solve's, whenever written (solves may overlap)
            folder = "/".join(parts[:-1]) + "/"
            node = next((n for d, n in own_dirs.items() if folder.startswith(d)), node)
        kind = file_type_of(rel)
        if node is not None and _meta(node).get("phase"):
            phase = str(_meta(node)["phase"])[:50]
        else:
            phase = "planning" if "planning" in parts else "control" if "control" in parts else "execution"
        final = kind in ("plot", "data", "code", "plan") and "context" not in parts and "temp" not in parts
        is_step = node is not None and _meta(node).get("span_kind") == sc.KIND_STEP
        out.files.append({
            "id": derived_uuid(run_id, "file", rel), "run_id": run_id, "session_id": session_id, "step_id": None,
            "event_id": None, "node_id": node["id"] if node is not None else None, "file_path": path,
            "file_type": kind, "size_bytes": size, "created_at": at, "workflow_phase": phase,
            "is_final_output": final, "content_hash": None,
            "generating_agent": _str(node["agent"], 100) if is_step else None, "generating_code_hash": None,
            "priority": "primary" if final or kind in ("plot", "data", "code", "plan")
            else "secondary" if kind in ("report", "chat") else "internal",
            "meta": {"relative_path": rel, "modified_at": iso(at)},
        })


def _derive_branches(out: DerivedRows, run: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]],
                     real_run: bool, link: Any) -> dict[str, str]:
    """Branch points, edges and branch rows of the run's redo nodes; returns step node id -> workflow_steps id."""
    run_id = run["id"]
    session_id = run["session_id"]
    step_rows: dict[str, str] = {}
    branch_points: set[str] = set()
    for redo in sorted((n for n in by_id.values() if n["node_type"] == sc.NODE_REDO), key=_order_key):
        step = by_id.get(redo.get("parent_node_id") or "")
        if step is None:
            continue
        rmeta = _meta(redo)
        smeta = _meta(step)
        step_short = str(smeta.get("id"))
        bp_short = f"branch_at_{step_short}"
        bp_id = node_db_id(run_id, bp_short)
        first_redo = bp_id not in branch_points
        branch_points.add(bp_id)
        # one branch point per step, shaped by its first redo: sibling redos with different
        # (damaged) depths must not make the row depend on which write saw which last
        if first_redo:
            # base(step) * 1000: before the step's children (k >= 1), never a step number, and
            # not cmbagent's -1, which would put it ahead of the run's first node (order 0)
            out.nodes.append(_derived_node(
                run_id, session_id, bp_short, sc.NODE_BRANCH_POINT, "completed",
                _int(_step_base(step) * 1000), agent="system",
                label=f"Branch point at {step_short}", description=f"Redo branches of {step_short}",
                parent=step["id"], depth=redo["depth"]))
        branch_name = str(rmeta.get("branch_name") or rmeta.get("id"))
        link(step["id"], bp_id)
        link(bp_id, redo["id"], "conditional", f"branch_{branch_name}")
        if not real_run:
            continue
        step_row_id = node_db_id(run_id, f"workflow_step:{step_short}")
        if first_redo:
            step_rows[step["id"]] = step_row_id
            out.steps.append({
                "id": step_row_id, "run_id": run_id, "session_id": session_id, "step_number": step["order_index"],
                "goal": str(smeta.get("goal") or f"Branch point at {step_short}"), "summary": smeta.get("summary"),
                "status": step["status"] if step["status"] in ("completed", "failed") else "running",
                "started_at": _parse_ts(smeta.get("started_at")),
                "completed_at": _parse_ts(smeta.get("completed_at")),
                "progress_percentage": 0, "inputs": None, "outputs": None, "error_message": smeta.get("error"),
                "meta": {"created_for_branch": True, "dag_node_id": step["id"], "node_short_id": step_short},
            })
        child_id = derived_uuid(run_id, "branch", str(rmeta.get("id")))
        hypothesis = rmeta.get("hypothesis")
        out.child_runs.append(run_row(
            child_id, session_id, mode=run["mode"], agent=run["agent"], model=run["model"],
            status="executing" if redo["status"] == RUNNING else redo["status"],  # a live redo: its run runs
            started_at=_parse_ts(rmeta.get("started_at")), completed_at=_parse_ts(rmeta.get("completed_at")),
            task_description=hypothesis or run.get("task_description"), is_branch=True, branch_parent_id=run_id,
            branch_depth=_int(run.get("branch_depth"), 0) + 1,
            meta={"otel_source": "branch", "branch_name": str(rmeta.get("id")), "hypothesis": hypothesis,
                  "redo_attempt": rmeta.get("attempt"), "branched_from_node": step_short,
                  "branched_from_step": step["order_index"], "dag_node_id": redo["id"]},
        ))
        out.branches.append({
            "id": derived_uuid(run_id, "branch_row", str(rmeta.get("id"))), "parent_run_id": run_id,
            "parent_step_id": step_row_id, "child_run_id": child_id, "branch_name": str(rmeta.get("id"))[:255],
            "created_at": _parse_ts(rmeta.get("started_at")) or run.get("started_at") or _EPOCH,
            "hypothesis": hypothesis,
            "status": {"completed": "completed", RUNNING: "active"}.get(redo["status"], "abandoned"),
            "meta": {"dag_node_id": redo["id"], "branch_point_node_id": bp_id, "condition": f"branch_{branch_name}"},
            "racing_group_id": None, "racing_priority": None, "racing_status": None,
        })
    return step_rows


def _step_base(node: Mapping[str, Any]) -> int:
    """The contract's base(P) of a node: its step number for a step, else its order_index."""
    if _is_step(node):
        return _int(_meta(node).get("step_number"), node["order_index"])
    return _int(node["order_index"])


def _usage_values(prompt: int, completion: int, costs: list[float]) -> dict[str, Any]:
    return {"tokens": prompt + completion, "prompt_tokens": prompt, "completion_tokens": completion,
            "cost_usd": _cost_total(costs)}


# cost_records.cost_usd is NUMERIC(10, 6) in cmbagent's schema: PostgreSQL refuses anything
# from 10^4 on in magnitude ("numeric field overflow"; SQLite stores it), which failed the batch
_COST_COLUMN_MAX = 9999.999999


def _cost_total(costs: list[float]) -> float:
    """The sum of finite ``costs``, finite itself (fsum raises on an intermediate overflow)."""
    try:
        # fsum is correctly rounded, so the total does not depend on the order events were read in
        return math.fsum(costs)
    except OverflowError:
        return math.copysign(sys.float_info.max, sum(costs))


def _derive_usage(out: DerivedRows, run: Mapping[str, Any], real: Sequence[Mapping[str, Any]],
                  by_id: Mapping[str, Mapping[str, Any]], usage: Sequence[LlmUsage],
                  step_rows: Mapping[str, str]) -> None:
    """Usage totals on every node (its whole subtree) and one cost record per agent, model and scope node.

    The scope of an LLM call is its nearest enclosing node that is not a sub-agent turn:
    a step, a redo attempt, a phase, a conversation. That is what cmbagent's cost
    collector records: one row per agent per CMBAgent instance (per phase or step).
    """
    every = {**by_id, **{n["id"]: n for n in out.nodes}}
    # the calls made in each node, then each such node's sums added once to it and its ancestors
    own: dict[str | None, tuple[list[int], list[float]]] = {}
    groups: dict[tuple[str | None, str | None, str], tuple[list[int], list[float], list[datetime]]] = {}
    scopes: dict[str | None, str | None] = {}
    for node_id, agent, model, prompt, completion, cost, at in usage:
        found = own.get(node_id)
        if found is None:
            found = own[node_id] = ([0, 0], [])
            scopes[node_id] = _cost_scope(node_id, by_id)
        counts, costs = found
        counts[0] += prompt
        counts[1] += completion
        costs.append(cost)
        key = (scopes[node_id], agent, str(model or "unknown")[:100])
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([0, 0], [], [])
        counts, costs, stamps = group
        counts[0] += prompt
        counts[1] += completion
        costs.append(cost)
        if at is not None:
            stamps.append(at)
    # node id -> [prompt, completion, costs] of its subtree's calls, flat: one subscript per sum
    totals: dict[str, list[Any]] = {}
    for start, ((prompt, completion), costs) in own.items():
        node_id = start
        seen: set[str] = set()
        while node_id is not None and node_id in every and node_id not in seen:
            seen.add(node_id)
            found = totals.get(node_id)
            if found is None:
                totals[node_id] = [prompt, completion, [*costs]]
            else:
                found[0] += prompt
                found[1] += completion
                found[2].extend(costs)
            node_id = every[node_id].get("parent_node_id")

    for node in out.nodes:
        found = totals.get(node["id"])
        node["meta"].update(ZERO_USAGE if found is None else _usage_values(*found))
    for node in real:
        node_id = node["id"]
        meta = node.get("meta")
        if type(meta) is not dict:
            meta = _meta(node)
        found = totals.get(node_id)
        if found is None:
            tokens = prompt = completion = 0
            cost = 0.0
        else:
            prompt, completion, costs = found
            tokens, cost = prompt + completion, _cost_total(costs)  # _usage_values
        # stored as wanted: the same type (the sums are ints, the cost a float) and value, each key
        get = meta.get
        if not (type(old := get("tokens")) is int and old == tokens
                and type(old := get("prompt_tokens")) is int and old == prompt
                and type(old := get("completion_tokens")) is int and old == completion
                and type(old := get("cost_usd")) is float and old == cost):
            out.node_updates.append({"id": node_id, "meta": {
                **meta, "tokens": tokens, "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}})

    fallback = run.get("started_at") or _EPOCH
    run_id, session_id = run["id"], run["session_id"]
    for (scope, agent, model), ((prompt, completion), costs, stamps) in groups.items():
        cost = _cost_total(costs)
        if prompt <= 0 and completion <= 0 and cost <= 0:
            continue  # cmbagent records only agents that used something
        step_id = None
        node = by_id.get(scope) if scope is not None else None
        if node is not None:
            step_id = step_rows.get(node["id"] if node["node_type"] != sc.NODE_REDO
                                    else str(node.get("parent_node_id")))
        total = prompt + completion
        # _int of each count (ints: sums of ints), the common case inline; the cost as the column
        # holds it: rounded to 6 places, clamped to its range
        cost = round(cost, 6)
        out.costs.append({
            "run_id": run_id, "step_id": step_id, "session_id": session_id, "model": model,
            "agent_name": _str(agent, 200), "parent_run_id": None,
            "prompt_tokens": prompt if -_INT32 <= prompt <= _INT32 else _int(prompt),
            "completion_tokens": completion if -_INT32 <= completion <= _INT32 else _int(completion),
            "total_tokens": total if -_INT32 <= total <= _INT32 else _int(total),
            "cost_usd": (_COST_COLUMN_MAX if cost > _COST_COLUMN_MAX
                         else -_COST_COLUMN_MAX if cost < -_COST_COLUMN_MAX else cost),
            "timestamp": max(stamps) if stamps else fallback,
        })


# cmbagent's DAG tracker's labels (its templates, MODE_TO_TEMPLATE and create_dag_for_mode's overrides)
_PLANNING_LABELS = {"hitl-interactive": "HITL Planning", "idea-generation": "Idea Planning Phase"}
PLANNING_LABEL = "Planning Phase"
PLANNING_DESCRIPTION = "Analyzing task and creating execution plan"


def _update_meta(out: DerivedRows, node: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Set ``values`` in a stored node's meta: merged into its usage update when it has one."""
    for update in out.node_updates:
        if update["id"] == node["id"]:
            update["meta"].update(values)
            return
    meta = node.get("meta")
    if type(meta) is not dict:
        meta = _meta(node)
    if any(meta.get(k) != v for k, v in values.items()):
        out.node_updates.append({"id": node["id"], "meta": {**meta, **values}})


def _first_node_task(out: DerivedRows, run: Mapping[str, Any], node: Mapping[str, Any]) -> None:
    """The run's first node (a planning phase) as cmbagent's DAG tracker writes it: the run's task as
    ``meta.task`` (up to 100 characters, then "..."), as the derived ``init`` has it, and its label and
    description ("Planning Phase", "Analyzing task and creating execution plan"; "HITL Planning" and
    "Idea Planning Phase" in those modes)."""
    values = {"label": _PLANNING_LABELS.get(str(run.get("mode")), PLANNING_LABEL), "description": PLANNING_DESCRIPTION}
    task = str(run.get("task_description") or "")
    if task:
        values["task"] = task[:100] + "..." if len(task) > 100 else task
    _update_meta(out, node, values)


def _execute_label(out: DerivedRows, run: Mapping[str, Any], node: Mapping[str, Any], number: str = "") -> None:
    """one_shot's ``execute`` node as cmbagent's tracker labels it: "Execute (<agent>)" ("Enhance Input" in
    enhance-input runs), "Execute task"; a repeated solve's ``execute_<k>`` "Execute <k> (<agent>)" (six
    solves of get_keywords must not all read "one_shot")."""
    label = _EXECUTE_LABELS[str(run.get("mode"))].format(agent=run.get("agent") or "engineer")
    if number:  # "Execute 2 (engineer)", "Enhance Input 2"
        head, sep, tail = label.partition(" (")
        label = f"{head} {number}{sep}{tail}"
    _update_meta(out, node, {"label": label, "description": "Execute task"})


def _cost_scope(node_id: str | None, by_id: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The nearest node at or above ``node_id`` that is not a sub-agent turn (else the outermost one)."""
    scope = None
    seen: set[str] = set()
    while node_id is not None and node_id in by_id and node_id not in seen:
        seen.add(node_id)
        scope = node_id
        node = by_id[node_id]
        if node["node_type"] != sc.NODE_SUB_AGENT:
            break
        node_id = node.get("parent_node_id")
    return scope
