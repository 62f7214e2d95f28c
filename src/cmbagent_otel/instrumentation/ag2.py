"""OpenTelemetry instrumentor for AG2 (``autogen``: ag2 0.9-0.14 and ``cmbagent_autogen``).

Patching is class-level, on methods AG2 looks up at call time, so agents built before
``instrument()`` are covered too (AG2 stores *reply functions* per agent at construction;
those are never patched, only what they call). A class's method gets a plain function
calling our wrapper (cheaper to read and call than a wrapt proxy, see :func:`_plain_patchable`),
which carries ``__wrapped__`` and is removed like a proxy; module functions get wrapt proxies:

==========================================================  ==================================
patched                                                      span
==========================================================  ==================================
``ConversableAgent.initiate_chat`` / ``a_initiate_chat``     ``conversation {recipient}``
``initiate_chats`` / ``a_initiate_chats`` (nested chats;     ``initiate_chats {sender}``
each public name: conversable_agent's, ``autogen``'s,
``autogen.agentchat``'s, ``autogen.agentchat.chat``'s)
``ConversableAgent.generate_reply`` / ``a_generate_reply``   ``invoke_agent {agent}``
``OpenAIWrapper.create``                                     ``chat {model}``
``ConversableAgent.execute_function`` / ``a_...``            ``execute_tool {tool}``
``ConversableAgent.execute_code_blocks`` and every           ``execute_code {language}``
code executor's ``execute_code_blocks`` (AG2's at
instrument(); a custom executor's class when an
agent holding it first replies)
``GroupChat.select_speaker`` / ``a_select_speaker``          a ``cmbagent.handoff`` span event
                                                             on the enclosing span (:mod:`._handoffs`)
``GroupChat._auto_select_speaker`` / ``a_auto_...``          ``select_speaker {last speaker}``
                                                             (a selection that asks the model)
``ConversableAgent.get_human_input`` / ``a_...`` (and a       ``await_human_input {agent}``
subclass's override, patched when an agent of it first
takes a turn)
==========================================================  ==================================

Sampling is decided before anything is built (:class:`~cmbagent_otel._spans.SamplingProbe`):
when the span cannot be recorded (no SDK provider, ``always_off``, an unsampled parent) the
wrapper only keeps what does not depend on spans -- the metrics, the plan-step tracker of a
cmbagent control chat, the trace context handed to executed code -- and calls through.

Inside a plan step (or redo, or one_shot's ``execute`` node, or a top-level conversation
of a plain AG2 program), an agent invocation that is not nested in another agent
invocation is a *sub-agent call*: its span is a DAG node of type ``sub_agent`` under that
node. Group chat managers are transparent for that purpose and AG2's internal tool runner
(``_Group_Tool_Executor``) is never a node. A top-level conversation outside any workflow
is itself a DAG node (``conversation_<k>``), and so is an agent turn the application runs outside
any conversation, workflow and node (``agent_<k>``). A group chat manager running in a control
phase derives the plan's ``step`` spans from cmbagent's ``record_status`` tool calls
(:mod:`._steps`). A chat ending through ``NoEligibleSpeakerError`` (AG2's normal end of a
group chat) leaves its handoff successful, marked ``cmbagent.handoff.ends_chat``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import inspect
import json
import logging
import subprocess
import sys
import threading
import types
import weakref
from collections.abc import Callable, Collection, Iterable
from time import perf_counter
from typing import Any

import wrapt
from opentelemetry import _logs
from opentelemetry import metrics as otel_metrics  # noqa: F401  # read by ModelMetrics.live, written into _llm (_MADE)
from opentelemetry import trace as otel_trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.trace import SpanKind, Tracer

from .. import environment_variables, semconv
from .._context import (
    _SCOPE_KEY,
    _SUPPRESS,
    _SUPPRESS_PLAIN,
    SPAN_KEY,
    Frame,  # noqa: F401  # read by TracedSpan.__exit__, written into _traced_method's copies
    Scope,
    current_scope,
    detach,  # noqa: F401  # as Frame
    get_current,
    scope_in,
)
from .._forksafe import reset_in_child
from .._spans import (
    END_TIME_SPAN,
    NodeSpec,
    SamplingProbe,
    SharedAttributes,
    TracedSpan,
    TracedSpanShell,
    _record_timing,  # noqa: F401  # as Frame
    end_interrupted,
    error_type,
    make_tracer,
    start_of,
    workflow_tracers,
)
from .._specialise import specialise, specialiser
from .._termination import claim_duration  # noqa: F401  # as Frame
from ..metrics import CallAttributes, ModelMetrics, model_metrics
from ..redaction import (
    MAX_NAME,
    RedactionCache,
    bounded_name,
    learn_encoded_in,
    learn_secrets_in,
    redact_id,
    redact_name,
    redact_str_name,
    register_new_environment,
    register_sent_credentials,
    safe_text,
    truncate,
)

# the keys and kinds of every model, tool and agent span, read as module globals (one lookup each, not a
# global and a module attribute)
from ..semconv import (
    GEN_AI_AGENT_NAME,
    GEN_AI_OPERATION_NAME,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_TOOL_CALL_ID,
    GEN_AI_TOOL_NAME,
    GEN_AI_TOOL_TYPE,
    KIND_AGENT,
    KIND_LLM,
    KIND_TOOL,
    LLM_COST_USD,
    OP_EXECUTE_TOOL,
)
from ..version import __version__
from . import _handoffs, _messages, _models, _steps, _subprocess_context
from ._content import (
    ContentMode,
    _register_entry,  # noqa: F401  # read by register_llm_config_secrets, written into _llm (_MADE)
    _walked_entries,  # noqa: F401  # as _register_entry
    agent_name,
    cached_name,
    capture_from_env,
    content_mode,
    register_agent_secrets,
    register_llm_config_secrets,
)
from ._models import (  # the globals usage_attributes reads, written into the model call's recorder (_MADE)
    _NOT_MAPPINGS,  # noqa: F401
    REQUEST_KEYS,
    _count,  # noqa: F401
    _get,  # noqa: F401
    _is_mapping,  # noqa: F401
    get_cache_token,  # noqa: F401
    usage_attributes,
)
from ._patching import PROXY, defining_class, is_link, state_of, unwrap_ours, wrapt_wrapper

logger = logging.getLogger("cmbagent_otel")

_in_code_span: contextvars.ContextVar[bool] = contextvars.ContextVar("cmbagent_otel_in_code", default=False)

CODE_EXECUTOR_CLASSES = (
    ("autogen.coding.local_commandline_code_executor", "LocalCommandLineCodeExecutor"),
    ("autogen.coding.docker_commandline_code_executor", "DockerCommandLineCodeExecutor"),
)
# Importing these prints install hints when jupyter extras are absent: patch them only when
# the application has imported them already.
OPTIONAL_EXECUTOR_CLASSES = (
    ("autogen.coding.jupyter.jupyter_code_executor", "JupyterCodeExecutor"),
    ("autogen.coding.jupyter.embedded_ipython_code_executor", "EmbeddedIPythonCodeExecutor"),
)


class _State:
    """Everything one ``instrument()`` ... ``uninstrument()`` cycle of :class:`AG2Instrumentor` holds.

    Built in ``_instrument`` from the arguments it was given and handed to every wrapper it
    installs; ``uninstrument()`` drops it, so nothing (providers, capture settings, AG2 classes,
    per-agent facts) outlives the cycle.
    """

    __slots__ = ("active", "agents", "call_attributes", "candidates", "capture", "chat_attributes", "content",
                 "descriptions", "event_logger", "human_input",
                 "manager_cls", "metrics", "no_speaker_cls", "probe", "tool_executor_cls", "tracer", "types",
                 "workflow_tracer")

    def __init__(self, tracer: Tracer, workflow_tracer: Tracer, content: ContentMode,
                 event_logger: _logs.Logger | None = None, metrics: ModelMetrics | None = None) -> None:
        # False once uninstrumented: a wrapper of ours that another instrumentation restores later
        # (OpenInference puts back the methods it found, ours among them) only calls through
        self.active = True
        self.tracer = tracer  # AG2 operations (scope cmbagent_otel.ag2)
        self.workflow_tracer = workflow_tracer  # plan steps derived in group chats (scope cmbagent_otel.workflow)
        self.probe = SamplingProbe(tracer)  # decides "not recorded" before anything is built
        self.metrics = metrics  # GenAI client metrics, cost, failed code runs (None: metrics off)
        self.content = content
        self.capture = content.on_spans  # content attributes on spans
        self.event_logger = event_logger  # GenAI content events (EVENT_ONLY / SPAN_AND_EVENT)
        self.manager_cls: type | None = None
        self.tool_executor_cls: type | None = None
        self.no_speaker_cls: type | None = None
        # ConversableAgent's get_human_input and a_get_human_input as patched (see _adopt_overrides)
        self.human_input: tuple[Any, Any] | None = None
        # per agent (by id, held weakly): what does not change between its calls (see _agent_static). An
        # entry is removed when its agent is dropped (_remember), before its id can be reused: the entry
        # found under the id of an agent that is alive is that agent's, no identity check needed
        self.agents: dict[int, _AgentStatic] = {}
        # per agent class: (group chat manager, AG2's tool runner) -- isinstance through AG2's
        # Protocol-derived classes is slow, a class's answer never changes
        self.types: dict[type, tuple[bool, bool]] = {}
        # per agent class: whether its description property only returns _description (_plain_description)
        self.descriptions: dict[type, bool] = {}
        # model-call metric attributes by (config facts, request model, response model)
        self.call_attributes: dict[tuple[Any, ...], CallAttributes] = {}
        # a model call's attributes by (config facts, request model, agent), when the call sets no parameter
        self.chat_attributes: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
        # a group chat's selection method name and candidate names (see _handoffs)
        self.candidates: dict[int, tuple[Any, ...]] = {}


def _content(render: Callable[..., Any], *args: Any) -> Any:
    """Content for an attribute; a value that cannot be rendered leaves the attribute out, never the span."""
    try:
        return render(*args)
    except Exception:
        logger.debug("cmbagent_otel: content left out (%s)", getattr(render, "__name__", render), exc_info=True)
        return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


# a wrapper's decision: not recorded, take the fast path. False, as None (straight through) is: a started span
# (a TracedSpan: no __bool__ or __len__, always true) passes one truth test, `if not traced`, not two identity tests
_FAST: Any = False


def _record(state: _State, traced: TracedSpan, record: Callable[..., None], instance: Any,
            args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    try:
        record(state, traced, instance, args, kwargs, result)
    except Exception:
        logger.debug("cmbagent_otel: result recording failed in %s", record.__name__, exc_info=True)


def _run_traced(state: _State, traced: TracedSpan | None, record: Callable[..., None] | None,
                original: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call in ``traced`` (started by its builder; ``None``: straight through), ended as a ``with`` would."""
    if traced is None:
        return original(instance, *args, **kwargs)
    try:
        result = original(instance, *args, **kwargs)
        if record is not None:
            _record(state, traced, record, instance, args, kwargs, result)
    except BaseException as exc:
        traced.__exit__(type(exc), exc, exc.__traceback__)
        raise
    traced.__exit__(None, None, None)
    return result


async def _run_traced_async(state: _State, traced: TracedSpan | None, record: Callable[..., None] | None,
                            original: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> Any:
    if traced is None:
        return await original(instance, *args, **kwargs)
    try:
        result = await original(instance, *args, **kwargs)
        if record is not None:
            _record(state, traced, record, instance, args, kwargs, result)
    except BaseException as exc:
        traced.__exit__(type(exc), exc, exc.__traceback__)
        raise
    traced.__exit__(None, None, None)
    return result


def _decide(state: _State, probe: SamplingProbe, build: Callable[..., TracedSpan | None],
            unsampled: Any, self: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[Any, TracedSpan | None]:
    """A method wrapper's decision, ``(ctx, traced)``: the context read once, and the span ``build`` started
    (``None``: straight through; ``_FAST``: not recorded, through the wrapper's ``fast``; ``unsampled``: which of
    the two a span that cannot be recorded means, :func:`_unsampled`). Telemetry errors mean "call through".
    One ``return``, at its end: written into the generated wrappers (:func:`_traced_method`)."""
    try:
        ctx = get_current()
        # `in` first: the keys are nearly always absent, and a contains test costs less than .get()
        if (_SUPPRESS in ctx and ctx[_SUPPRESS]) or (_SUPPRESS_PLAIN in ctx and ctx[_SUPPRESS_PLAIN]):  # noqa: RUF019
            traced = None
        elif (probe.follows_parent and (parent := ctx.get(SPAN_KEY)) is not None
              and (parent._end_time is None if type(parent) is END_TIME_SPAN else parent.is_recording())) \
                or not (probe.drops_all or probe.drops(ctx)):
            # no call to drops() under a recording parent and a parent-based sampler, nor for a tracer
            # that drops every span (always_off, a no-op tracer)
            traced = build(state, ctx, self, args, kwargs)
        else:
            traced = unsampled
    except Exception:
        logger.debug("cmbagent_otel: span setup failed in %s", build.__name__, exc_info=True)
        ctx = traced = None
    return ctx, traced


def _traced_method(state: _State, probe: SamplingProbe, build: Callable[..., TracedSpan | None],
                   record: Callable[..., None] | None, fast: Callable[..., Any] | None, unsampled: Any,
                   original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """The body of the method wrappers (:func:`_traced_sync`, and awaiting ``original`` and ``fast``,
    :func:`_traced_async`): made per patched method with everything before ``self`` bound, :func:`_decide` and
    ``TracedSpan.__exit__`` (for the plain span the hot builders start, ``TracedSpanShell``) written in. The
    decision and _run_traced written out: this runs for most spans, one frame less each."""
    if not state.active:
        return original(self, *args, **kwargs)
    ctx, traced = _decide(state, probe, build, unsampled, self, args, kwargs)
    if not traced:  # None or _FAST, never a span
        if traced is None:
            return original(self, *args, **kwargs)
        return fast(state, ctx, original, self, args, kwargs)  # type: ignore[misc]  # not recorded
    # `with traced:` written out (the builder started the span): a with statement calls __exit__
    # from C (a nested interpreter, ~500 instructions per span more); same exception handling
    try:
        result = original(self, *args, **kwargs)
        if record is not None:
            try:
                record(state, traced, self, args, kwargs, result)
            except Exception:
                logger.debug("cmbagent_otel: result recording failed in %s", record.__name__, exc_info=True)
    except BaseException as exc:
        traced.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if type(traced) is TracedSpanShell:  # its own __exit__ is TracedSpan's: written in here when generated
        TracedSpan.__exit__(traced, None, None, None)
    else:  # a span type with an __exit__ of its own (_ChatSpan, _GroupChatSpan, _CodeSpan...)
        traced.__exit__(None, None, None)
    return result


def _unsampled(fast: Callable[..., Any] | None) -> Any:
    """What a wrapper's span that cannot be recorded means, decided once per patched method rather than per call:
    through its ``fast`` path (``_FAST``), or, without one, straight through (``None``)."""
    return _FAST if fast is not None else None


_METHOD_FREE = ("state", "probe", "build", "record", "fast", "unsampled", "original")
# made by the first _traced_sync() / _traced_async() (two instrument()s at once: the same code)
_method_maker: Callable[..., Callable[..., Any]] | None = None
_async_method_maker: Callable[..., Callable[..., Any]] | None = None


def _recorder(state: _State, record: Callable[..., None] | None) -> Callable[..., None] | None:
    """What a wrapper calls to record its result: the generated copy of ``record`` (:data:`_MADE`), none for a
    recorder of message content only with capture off."""
    record = _MADE.get(record, record)  # type: ignore[arg-type]
    return None if record in _CONTENT_ONLY and not state.capture else record


def _traced_sync(state: _State, build: Callable[..., TracedSpan | None],
                 record: Callable[..., None] | None = None, fast: Callable[..., Any] | None = None) -> Any:
    """A wrapt wrapper: the call in a span ``build`` starts (``record`` reads its result), or, when the
    span cannot be recorded (decided before anything is built), through ``fast`` (``None``:
    straight through), called ``fast(state, ctx, original, instance, args, kwargs)``, which calls
    ``original(instance, *args, **kwargs)`` (no bound method made per call). The context is read once;
    telemetry errors mean "call through"."""
    global _method_maker
    if _method_maker is None:
        _method_maker = specialiser(_traced_method, "patched", _METHOD_FREE, inline=(_decide, TracedSpan.__exit__))
    maker = _method_maker
    probe = state.probe
    record = _recorder(state, record)
    build, fast = _MADE.get(build, build), _MADE.get(fast, fast)  # type: ignore[arg-type]  # generated copies
    unsampled = _unsampled(fast)

    def method_for(original: Callable[..., Any]) -> Callable[..., Any]:
        """The plain function patched over ``original`` (a function, called ``original(self, ...)``:
        no trampoline frame and no bound method per call, :func:`_plain_method`); wrapt proxies run
        the same body (:func:`._patching.wrapt_wrapper`)."""
        return maker(state, probe, build, record, fast, unsampled, original)

    return wrapt_wrapper(method_for, state)


def _traced_async(state: _State, build: Callable[..., TracedSpan | None],
                  record: Callable[..., None] | None = None, fast: Callable[..., Any] | None = None) -> Any:
    """:func:`_traced_sync` for coroutine methods: the same body (:func:`_traced_method`), awaiting the call."""
    global _async_method_maker
    if _async_method_maker is None:
        try:
            _async_method_maker = specialiser(_traced_method, "patched", _METHOD_FREE,
                                              inline=(_decide, TracedSpan.__exit__), awaiting=("original", "fast"))
        except Exception:  # its source unreadable (no .py files): the wrapper composed of the same helpers
            logger.debug("cmbagent_otel: the coroutine method wrapper is not generated", exc_info=True)
            _async_method_maker = _composed_async
    maker = _async_method_maker
    probe = state.probe
    record = _recorder(state, record)
    build, fast = _MADE.get(build, build), _MADE.get(fast, fast)  # type: ignore[arg-type]  # as _traced_sync's
    unsampled = _unsampled(fast)

    def method_for(original: Callable[..., Any]) -> Callable[..., Any]:
        """The ``async def`` patched over ``original`` (an ``async def``, called ``original(self, ...)``): no
        trampoline coroutine and no bound method per call, as for :func:`_traced_sync`'s methods."""
        return maker(state, probe, build, record, fast, unsampled, original)

    wrapper = wrapt_wrapper(method_for, state)
    wrapper._method_is_async = True  # type: ignore[attr-defined]  # its plain form patches coroutine methods
    return wrapper


def _composed_async(state: _State, probe: SamplingProbe, build: Callable[..., TracedSpan | None],
                    record: Callable[..., None] | None, fast: Callable[..., Any] | None, unsampled: Any,
                    original: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_traced_method` awaiting the call, as calls of its helpers (when it cannot be generated)."""
    async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.active:
            return await original(self, *args, **kwargs)
        ctx, traced = _decide(state, probe, build, unsampled, self, args, kwargs)
        if traced is _FAST:
            return await fast(state, ctx, original, self, args, kwargs)  # type: ignore[misc]
        return await _run_traced_async(state, traced, record, original, self, args, kwargs)

    return patched


# --- conversation ---------------------------------------------------------------------------
def _conversation(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedSpan:
    recipient = _arg(args, kwargs, 0, "recipient")
    register_agent_secrets(instance)
    register_agent_secrets(recipient)
    # the initiator's human may be asked for the first message (AG2's generate_init_message) before any
    # turn of it: its way of asking is adopted now, not at its first turn
    _type_facts(state, instance)
    _adopt_instance_overrides(state, instance)
    recipient_name = agent_name(recipient)
    attrs: dict[str, Any] = {
        GEN_AI_AGENT_NAME: recipient_name,
        semconv.CONVERSATION_INITIATOR: agent_name(instance),
        semconv.CONVERSATION_RECIPIENT: recipient_name,
    }
    # (recipient, clear_history, silent, cache, max_turns, summary_method, summary_args, message) on
    # ag2 0.14 and cmbagent_autogen alike: an application may pass them positionally
    max_turns = _arg(args, kwargs, 4, "max_turns")
    if isinstance(max_turns, int):
        attrs[semconv.CONVERSATION_MAX_TURNS] = max_turns
    if state.capture:
        message = _arg(args, kwargs, 7, "message")
        if isinstance(message, (str, dict)):
            text = _content(_conversation_input, message, attrs[semconv.CONVERSATION_INITIATOR])
            if text is not None:
                attrs[semconv.GEN_AI_INPUT_MESSAGES] = text
    return TracedSpan(f"conversation {recipient_name}", semconv.KIND_CONVERSATION, attrs, new_conversation=True,
                      node=_top_level_node(ctx), tracer=state.tracer, context=ctx).__enter__()


def _conversation_input(message: Any, initiator: str) -> str:
    first = _messages.message(message)
    if "name" not in first:
        first["name"] = initiator
    return _messages.render([first])[0]


def _top_level_node(ctx: Any = None) -> NodeSpec | None:
    """A conversation outside any workflow and any DAG node is a node of the run (plain AG2 programs)."""
    scope = current_scope(ctx)
    if scope is None or (not scope.in_workflow and scope.dag_node is None):
        return NodeSpec("conversation", semconv.NODE_AGENT, child=True, numbered=True)
    return None


def _record_chat_result(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    history = getattr(result, "chat_history", None)
    if isinstance(history, list):
        traced.set(semconv.CONVERSATION_CHAT_COUNT, len(history))
    cost = getattr(result, "cost", None)
    if isinstance(cost, dict):  # what the models were paid: AG2's cache's answers cost nothing (as their spans)
        total = cost.get("usage_excluding_cached_inference", {})
        if isinstance(total, dict) and isinstance(total.get("total_cost"), (int, float)):
            traced.set(LLM_COST_USD, float(total["total_cost"]))
    if state.capture:
        traced.set(semconv.CONVERSATION_SUMMARY, safe_text(getattr(result, "summary", None)))


def _initiate_chats(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> TracedSpan:
    queue = _arg(args, kwargs, 0, "chat_queue")
    count = len(queue) if isinstance(queue, list) else 0
    sender = "unknown"
    if count and isinstance(queue[0], dict):
        sender = agent_name(queue[0].get("sender"))
    attrs = {semconv.CONVERSATION_INITIATOR: sender, semconv.CONVERSATION_CHAT_COUNT: count}
    return TracedSpan(f"initiate_chats {sender}", semconv.KIND_MULTI_CONVERSATION, attrs, tracer=state.tracer,
                      context=ctx).__enter__()


# --- agent invocation -------------------------------------------------------------------------
# AG2's internal tool runners: GroupToolExecutor (group chats), a plain agent in older swarms
TOOL_EXECUTOR_NAMES = frozenset({"_Group_Tool_Executor", "_Swarm_Tool_Executor"})
SUB_AGENT_PARENTS = frozenset({semconv.NODE_AGENT, semconv.NODE_REDO})


def _type_facts(state: _State, agent: Any) -> tuple[bool, bool]:
    """(is a group chat manager, is AG2's tool runner by class) for ``agent``'s class, computed once."""
    cls = type(agent)
    facts = state.types.get(cls)
    if facts is None:
        manager, runner = state.manager_cls, state.tool_executor_cls
        facts = (manager is not None and issubclass(cls, manager), runner is not None and issubclass(cls, runner))
        state.types[cls] = facts
        human = state.human_input  # a class new to this cycle: does it ask its human its own way?
        if human is not None and (getattr(cls, "get_human_input", None) is not human[0]
                                  or getattr(cls, "a_get_human_input", None) is not human[1]):
            _adopt_overrides(state, cls)
    return facts


_known_executor_types: set[type] = set()
_executor_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_executor_lock")  # a forked child must not find it held


def _adopt_code_executor(state: _State, agent: Any) -> None:
    """Trace the agent's code executor even when its class is not one AG2 ships.

    Custom executors (a ``CodeExecutor`` written from scratch, or a subclass that overrides
    ``execute_code_blocks``) are only discovered at run time; their class is patched the
    first time an agent holding one replies, and restored by ``uninstrument()``.
    """
    try:
        executor = vars(agent).get("_code_executor")
        if executor is None or type(executor) in _known_executor_types:
            return
        with _executor_lock:
            cls = type(executor)
            if cls in _known_executor_types:
                return
            _known_executor_types.add(cls)
            owner = defining_class(cls, "execute_code_blocks")
            if owner is None or owner is object or _ours_in_chain(vars(owner)["execute_code_blocks"]):
                return
            AG2Instrumentor().patch_late(owner, "execute_code_blocks", _traced_sync(state, _code, _record_code,
                                                                                    _code_fast))
    except Exception:
        logger.debug("cmbagent_otel: could not adopt a code executor", exc_info=True)


class _GroupChatSpan(TracedSpan):
    """A group chat manager's span that derives plan steps for the chat it runs."""

    __slots__ = ("_tracker",)

    def __init__(self, name: str, kind: str, attributes: dict[str, Any], tracker: _steps.StepTracker,
                 tracer: Tracer, context: Any = None) -> None:
        super().__init__(name, kind, attributes,
                         scope_changes={"steps": tracker, "cursor": tracker.cursor if tracker.derive else None},
                         tracer=tracer, context=context)
        self._tracker = tracker

    def __enter__(self) -> TracedSpan:
        super().__enter__()
        try:
            if self.scope is not None:
                self._tracker.bind(self.scope, self.span)
        except Exception:
            logger.debug("cmbagent_otel: could not bind the chat's step tracker", exc_info=True)
        except BaseException as exc:  # Ctrl-C before the wrapper's try: see end_interrupted
            end_interrupted(self, exc)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._tracker.finish(exc_info[1])  # steps end before the chat's span
        except Exception:
            logger.debug("cmbagent_otel: could not close the chat's steps", exc_info=True)
        super().__exit__(*exc_info)


class _AgentStatic:
    """What an agent's invoke_agent spans share until what they are read from changes: its llm_config,
    description, model client or a human-input function of its own (see :func:`_facts_current`)."""

    __slots__ = ("a_human", "attributes", "by_sender", "client", "config", "description", "human", "is_manager",
                 "is_tool_executor", "name", "nodes", "plain_description", "ref", "span_name", "system_messages")

    def __init__(self) -> None:
        self.ref: weakref.ref[Any] | None = None  # the agent's, whose callback removes its entry (_remember)
        self.config: Any = None
        self.description: Any = None
        self.name = "unknown"
        self.span_name = "invoke_agent unknown"
        self.attributes: dict[str, Any] = SharedAttributes({})
        self.by_sender: dict[str, dict[str, Any]] = {}  # attributes with cmbagent.agent.sender, per sender
        self.nodes: dict[str, NodeSpec] = {}  # its sub-agent node description, per parent node
        self.system_messages: list[str] = []
        self.is_manager = False
        self.is_tool_executor = False
        # description (what tells a changed one) is the instance's _description, read without calling
        # AG2's description property (a Python call from C on every agent turn): see _plain_description
        self.plain_description = False
        # objects the facts were read from, compared by identity on each turn: the agent's model client (the
        # model, provider and server) and its own human-input functions (wrapped when the facts were
        # computed: one set later is wrapped at its next turn). Not its name: AG2 has no way to rename an agent
        self.client: Any = None
        self.human: Any = None
        self.a_human: Any = None


def _facts_current(static: _AgentStatic | None, agent: Any) -> bool:
    """Whether ``static`` still describes ``agent``: none of what its facts were read from was replaced
    since (an agent changed between turns gets facts computed again; a cache must not make a span lie)."""
    if static is None or static.config is not getattr(agent, "llm_config", None) \
            or static.description is not _description_mark(agent, static.plain_description):
        return False
    own = getattr(agent, "__dict__", None) or {}
    return (static.client is own.get("client") and static.human is own.get("get_human_input")
            and static.a_human is own.get("a_get_human_input"))


def _plain_description(state: _State, agent: Any) -> bool:
    """Whether ``agent.description`` depends on nothing but ``agent.__dict__["_description"]`` (AG2's
    property ``return self._description``): then that value, compared by identity, tells a changed
    description as well as the property's result does. The class's answer is computed once."""
    try:
        cls = type(agent)
        plain = state.descriptions.get(cls)
        if plain is None:
            prop = next((vars(k)["description"] for k in cls.__mro__ if "description" in vars(k)), None)
            code = getattr(getattr(prop, "fget", None), "__code__", None) if type(prop) is property else None
            plain = state.descriptions[cls] = (code is not None and code.co_argcount == 1
                                               and code.co_names == ("_description",) and not code.co_freevars)
        return plain and "_description" in vars(agent)
    except Exception:  # no __dict__, or anything unexpected: the property it is
        return False


def _description_mark(agent: Any, plain: bool) -> Any:
    """What changes when ``agent``'s description does (see :func:`_plain_description`)."""
    return vars(agent).get("_description") if plain else getattr(agent, "description", None)


def _user_description(agent: Any, static: _AgentStatic) -> str | None:
    """The agent's description when the application set one.

    AG2 falls back to the system message when no description is given: that fallback is
    the system prompt, content only recorded with opt-in, so it is never taken for a
    description (the current system message, one seen earlier, or the class default).
    """
    description = getattr(agent, "description", None)
    if not isinstance(description, str) or not description.strip():
        return None
    system = getattr(agent, "system_message", None)
    if description == system or description in static.system_messages:
        return None
    for cls in type(agent).__mro__:
        if description == vars(cls).get("DEFAULT_SYSTEM_MESSAGE"):
            return None
    return truncate(description, 512)


def _agent_static(state: _State, agent: Any) -> _AgentStatic:
    """Name, description, manager-ness, provider, model and server of ``agent`` (its secrets
    registered): computed once per agent, again only when what they were read from is replaced (its
    ``llm_config``, ``description``, model client or own human-input functions: :func:`_facts_current`)."""
    static = state.agents.get(id(agent))
    if _facts_current(static, agent):
        return static  # type: ignore[return-value]
    config = getattr(agent, "llm_config", None)
    # a fresh object, published whole by _remember: another thread calling the same agent reads
    # either the old facts or the new ones, never a mix
    old, static = static, _AgentStatic()
    register_agent_secrets(agent)
    _adopt_code_executor(state, agent)  # its code executor's class, when AG2 does not ship it
    _adopt_instance_overrides(state, agent)  # a way of asking its human set on the agent itself
    seen = old.system_messages if old is not None else []
    system = getattr(agent, "system_message", None)
    static.system_messages = [*seen[-3:], system] if isinstance(system, str) and system not in seen else seen
    static.plain_description = plain = _plain_description(state, agent)
    static.config, static.description = config, _description_mark(agent, plain)
    static.name = agent_name(agent)
    static.span_name = f"invoke_agent {static.name}"
    own = getattr(agent, "__dict__", None) or {}
    static.client = own.get("client")
    static.human, static.a_human = own.get("get_human_input"), own.get("a_get_human_input")  # as adopted
    manager, runner = _type_facts(state, agent)
    static.is_manager = manager
    static.is_tool_executor = runner or getattr(agent, "_name", None) in TOOL_EXECUTOR_NAMES
    attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_AGENT,
                             GEN_AI_AGENT_NAME: static.name}
    user_description = _user_description(agent, static)
    if user_description is not None:
        attrs[semconv.GEN_AI_AGENT_DESCRIPTION] = user_description
    client = getattr(agent, "client", None) if config else None
    first = _models.first_config(client) if client is not None else None
    if first is not None:
        info = _models.config_info(first, client)
        attrs.update(info.attributes)
        if info.model:
            attrs[semconv.GEN_AI_REQUEST_MODEL] = info.model
    static.attributes = SharedAttributes(attrs)
    _remember(state.agents, agent, static)
    return static


def _agent_label(state: _State, agent: Any) -> str:
    """The name of the agent making a model call; its facts (secrets registered) computed when its
    ``llm_config`` is new (its turn, which computed them, may have started before a new one was set)."""
    static = state.agents.get(id(agent))
    if _facts_current(static, agent):
        return static.name  # type: ignore[union-attr]
    return _agent_static(state, agent).name


def _remember(agents: dict[int, _AgentStatic], agent: Any, static: _AgentStatic) -> None:
    """Publish ``agent``'s facts. The entry goes when the agent does: the weak reference's callback runs
    while the agent is being dropped, before its memory (and so its id) can be reused, and a reference
    cleared by the cyclic collector has its callback run before the collector frees anything. So an
    entry never outlives its agent, and lookups by the id of a live agent need no identity check."""
    key = id(agent)
    old = agents.get(key)
    if old is not None:  # the same agent (alive: it is our argument), its facts computed again
        static.ref = old.ref
        agents[key] = static
        return
    try:
        static.ref = weakref.ref(agent, lambda _, key=key: agents.pop(key, None))
    except TypeError:  # not weak-referenceable: computed each time
        return
    agents[key] = static


def _agent_input(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], sender: Any) -> str | None:
    """The messages the agent replies to (opt-in content), newest kept first."""
    messages = _arg(args, kwargs, 0, "messages")
    if messages is None and sender is not None:
        history = getattr(instance, "_oai_messages", None)
        try:
            messages = history.get(sender) if history is not None else None
        except TypeError:
            messages = None
    if not isinstance(messages, (list, tuple)) or not messages:
        return None
    return _messages.render(messages, convert=_messages.message)[0]


# A builder returns its span started. The hot ones make it as a TracedSpanShell (no __init__) and start it
# with _spans.start generated for their span type (start_of: its kind, OTel span kind, no run, conversation or
# scope change fixed and folded away): no dict of keywords, no fields stored only to be read back
_INTERNAL, _CLIENT = SpanKind.INTERNAL, SpanKind.CLIENT
# (self, name, attributes, node, tracer, ctx, known=None); the two others have no node. Generated by the first
# instrument() (_generate_starts), not at import: ~20 ms of CPU once, which a process that never instruments
# (the CLI) does not pay. No builder runs before it.
_start_agent: Callable[..., Any] | None = None
_start_llm: Callable[..., Any] | None = None
_start_tool: Callable[..., Any] | None = None


# recorders generated with their helpers written in (one frame less per call), by the first instrument() too: the
# wrappers take them in the written function's place (_traced_sync). Functions only, no state of a run
_MADE: dict[Callable[..., Any], Callable[..., Any]] = {}


def _generate_starts() -> None:
    global _start_agent, _start_llm, _start_tool
    if _record_llm not in _MADE:  # every model call: its response's facts read in its own frame
        _MADE[_record_llm] = specialise(_record_llm, "_record_llm", {}, inline=(_response_facts, usage_attributes))
    if _llm_fast not in _MADE:  # every model call, recorded or not: whether metrics are live, read in its frame
        _MADE[_llm] = specialise(_llm, "_llm", {}, inline=(register_llm_config_secrets, ModelMetrics.live))
        _MADE[_llm_fast] = specialise(_llm_fast, "_llm_fast", {}, inline=(ModelMetrics.live,))
    if _start_tool is None:  # two first instrument()s at once both generate: the same functions
        _start_agent = start_of(KIND_AGENT, _INTERNAL)
        _start_llm = start_of(KIND_LLM, _CLIENT, node=None)
        _start_tool = start_of(KIND_TOOL, _INTERNAL, node=None)


def _agent(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedSpan:
    # _agent_static's and cached_name's cache hits, _arg and current_scope written out: this runs for
    # every agent turn
    agents = state.agents
    static = agents.get(id(instance))
    own = instance.__dict__  # a ConversableAgent's (its class has no __slots__)
    if static is None or static.config is not getattr(instance, "llm_config", None) \
            or static.description is not (own.get("_description") if static.plain_description
                                          else getattr(instance, "description", None)) \
            or static.client is not own.get("client") \
            or (("get_human_input" in own or "a_get_human_input" in own)  # rare: a contains test first
                and (static.human is not own.get("get_human_input")
                     or static.a_human is not own.get("a_get_human_input"))):  # _facts_current
        static = _agent_static(state, instance)
    sender = kwargs["sender"] if "sender" in kwargs else args[1] if len(args) > 1 else None
    if sender is None:
        attrs = static.attributes  # compose copies it: shared, never changed
    else:
        known_sender = agents.get(id(sender))
        sender_name = known_sender.name if known_sender is not None else agent_name(sender)
        attrs = static.by_sender.get(sender_name)  # the same few senders again and again
        if attrs is None:
            if len(static.by_sender) >= 32:
                static.by_sender.clear()
            attrs = static.by_sender[sender_name] = SharedAttributes({**static.attributes,
                                                                      semconv.AGENT_SENDER: sender_name})
    if state.capture:
        text = _content(_agent_input, instance, args, kwargs, sender)
        if text is not None:
            attrs = {**attrs, semconv.GEN_AI_INPUT_MESSAGES: text}
    span_name = static.span_name
    scope = known = ctx.get(_SCOPE_KEY)  # known: start() need not read it again
    if type(scope) is not Scope:
        scope, known = current_scope(ctx), None  # not ours (None) or a subclass: the general path
        if scope is None and not static.is_tool_executor:
            return _top_level_agent(state, ctx, static, span_name, attrs)
    elif scope.cursor is not None:
        scope = current_scope(ctx)  # an anchor: the work belongs to its open frame
        known = None
    if static.is_manager:
        # transparent for sub-agent nodes; may hold the plan steps of a cmbagent control chat
        tracker = _steps.tracker_for(scope, state.workflow_tracer)
        if tracker is not None:
            return _GroupChatSpan(span_name, KIND_AGENT, attrs, tracker, state.tracer, ctx).__enter__()
        return _start_agent(TracedSpanShell(), span_name, attrs, None, state.tracer, ctx)
    depth = scope.agent_depth if scope is not None else 0
    node = None
    if (
        scope is not None
        and depth == 0
        and scope.dag_node_type in SUB_AGENT_PARENTS
        and not static.is_tool_executor
    ):
        node = static.nodes.get(scope.dag_node)
        if node is None:
            if len(static.nodes) >= 64:
                static.nodes.clear()
            node = static.nodes[scope.dag_node] = NodeSpec(f"{scope.dag_node}_{static.name}",
                                                           semconv.NODE_SUB_AGENT, child=True,
                                                           parent=scope.dag_node)
    traced = _start_agent(TracedSpanShell(), span_name, attrs, node, state.tracer, ctx, known)
    children = traced._scope
    if children is not None:  # a fresh scope, in the context but read by nobody yet: set here rather
        children.agent_depth = depth + 1  # than by start() walking a scope_changes dict
    return traced


_TOP_LEVEL_AGENT = NodeSpec("agent", semconv.NODE_AGENT, child=True, numbered=True)


def _top_level_agent(state: _State, ctx: Any, static: _AgentStatic, span_name: str,
                     attrs: dict[str, Any]) -> TracedSpan:
    """An agent turn the application runs outside any workflow, DAG node and conversation
    (``generate_reply`` called directly): a node of the run (``agent_<k>``, like a top-level
    conversation's ``conversation_<k>``), else the run's DAG has no node at all. A manager stays
    transparent for its agents' turns: they become its sub-agent nodes."""
    traced = _start_agent(TracedSpanShell(), span_name, attrs, _TOP_LEVEL_AGENT, state.tracer, ctx)
    children = traced._scope
    if children is not None and not static.is_manager:
        children.agent_depth = 1  # what it runs (a nested chat's turns) is no sub-agent node of its own
    return traced


def _derives_steps(state: _State, instance: Any, ctx: Any) -> bool:
    """Whether ``instance`` is a group chat manager whose chat may hold cmbagent's plan steps (its
    span then runs even unsampled: the steps' duration metrics and later turns depend on it)."""
    if not _type_facts(state, instance)[0]:
        return False
    scope = current_scope(ctx)
    return scope is not None and scope.in_workflow and scope.steps is None


def _unsampled_agent_span(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> TracedSpan | None:
    """The span an unrecorded agent call still gets: only a manager whose chat derives plan steps."""
    try:
        if _derives_steps(state, instance, ctx):
            return _agent(state, ctx, instance, args, kwargs)
    except Exception:
        logger.debug("cmbagent_otel: span setup failed in _agent", exc_info=True)
    return None


def _agent_fast(state: _State, ctx: Any, original: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    facts = state.types.get(type(instance))  # _type_facts' hit: a class known to be no manager has no span
    if facts is not None and not facts[0]:  # unsampled (nearly every unrecorded turn: no call more)
        return original(instance, *args, **kwargs)
    traced = _unsampled_agent_span(state, ctx, instance, args, kwargs)
    return _run_traced(state, traced, _record_reply, original, instance, args, kwargs)


async def _agent_fast_async(state: _State, ctx: Any, original: Callable[..., Any], instance: Any,
                            args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    facts = state.types.get(type(instance))  # as in _agent_fast
    if facts is not None and not facts[0]:
        return await original(instance, *args, **kwargs)
    traced = _unsampled_agent_span(state, ctx, instance, args, kwargs)
    return await _run_traced_async(state, traced, _record_reply, original, instance, args, kwargs)


def _record_reply(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    if state.capture and result is not None:
        traced.set(semconv.GEN_AI_OUTPUT_MESSAGES, _content(_reply_output, result))


def _reply_output(result: Any) -> str:
    return _messages.render([_messages.output_message(result)])[0]


# --- LLM call ------------------------------------------------------------------------------------
_NO_USAGE: dict[str, Any] = {}


class _ModelCall:
    """What the metrics of one model call need, recorded when it ends whether or not its span is."""

    __slots__ = ("cost", "info", "request_model", "response_model", "started", "usage")

    def __init__(self, info: _models.ConfigInfo, request_model: Any) -> None:
        self.info = info
        self.request_model = str(request_model) if request_model else None
        self.response_model: str | None = None
        self.usage: dict[str, Any] = _NO_USAGE  # the gen_ai.usage.* attributes of the response
        self.cost: float | None = None
        self.started = perf_counter()

    def response(self, response: Any) -> None:
        self.response_model, self.usage, self.cost = _response_facts(response)

    def ended(self, state: _State, exc: BaseException | None) -> None:
        """Record the call's metrics (never raises)."""
        try:
            metrics = state.metrics
            if metrics is None or not metrics.live():
                return
            seconds = perf_counter() - self.started
            key = (self.info, self.request_model, self.response_model)
            attributes = state.call_attributes.get(key)
            if attributes is None:
                if len(state.call_attributes) >= 256:
                    state.call_attributes.clear()  # models seen in one process: a bound, not a cache policy
                info = self.info
                attributes = state.call_attributes[key] = CallAttributes(
                    info.provider, self.request_model, self.response_model, info.server)
            usage = self.usage
            metrics.model_call(attributes, seconds, error_type(exc) if exc is not None else None,
                               usage.get(semconv.GEN_AI_USAGE_INPUT_TOKENS),
                               usage.get(semconv.GEN_AI_USAGE_OUTPUT_TOKENS), self.cost)
        except Exception:
            logger.debug("cmbagent_otel: could not record a model call's metrics", exc_info=True)


def _response_facts(response: Any) -> tuple[str | None, dict[str, Any], float | None]:
    """(response model, ``gen_ai.usage.*`` attributes, cost) of a model response: what its metrics
    (:meth:`_ModelCall.response`) and its span's attributes (:func:`_record_llm`, which has it written in: one
    ``return``, at its end) read of it."""
    model = getattr(response, "model", None)
    usage = getattr(response, "usage", None)
    cost = getattr(response, "cost", None)
    if type(cost) is not float:
        cost = float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None
    usage = usage_attributes(usage)  # an assignment: written in with this function (one frame less per call)
    # the server writes the model as it likes (a key it was sent, megabytes): redacted and bounded
    return (redact_str_name(model) if type(model) is str
            else redact_name(str.__str__(model)) if isinstance(model, str) else None,
            usage, cost)


class _CacheAnswers(threading.local):
    """Per thread: the ``OpenAIWrapper`` whose last answer (the one its ``create`` is returning) AG2's cache
    gave, ``None`` when a model gave it (see :func:`_cache_answer_wrapper`)."""

    wrapper: Any = None


_cache_answered = _CacheAnswers()


def _cache_answer_wrapper(state: _State) -> Callable[..., Any]:
    """``OpenAIWrapper._update_usage``, which ``create`` calls once for the answer it is about to return (in
    every AG2 from 0.9 to 0.14 and cmbagent_autogen): with no ``actual_usage`` and a ``total_usage`` when its
    cache answered (``cache=`` of ``initiate_chat`` / ``create``, a ``Cache.disk()`` / ``Cache.redis()`` context,
    ``cache_seed`` in llm_config), both a model's call's usage otherwise. The cached answer carries its first
    call's usage and ``cost``: the call's span (:func:`_record_llm`) and metrics (:func:`_llm_fast`) read this
    mark to record a cache hit with no tokens and no cost, as AG2 counts it in ``actual_usage_summary``."""
    def method_for(original: Callable[..., Any]) -> Callable[..., Any]:
        def _update_usage(self: Any, *args: Any, **kwargs: Any) -> Any:
            if state.active:
                actual = kwargs.get("actual_usage", args[0] if args else None)
                total = kwargs.get("total_usage", args[1] if len(args) > 1 else None)
                _cache_answered.wrapper = self if actual is None and total is not None else None
            return original(self, *args, **kwargs)

        return _update_usage

    return wrapt_wrapper(method_for, state)


def _model_call(instance: Any, kwargs: dict[str, Any]) -> _ModelCall:
    info = _models.config_info(_models.first_config(instance), instance)
    model = kwargs.get("model")
    return _ModelCall(info, redact_name(str(model)) if model else info.model)


class _ChatSpan(TracedSpan):
    """A model call (CLIENT span) that records its metrics when it ends (its duration from when
    :func:`_llm` built it) or, with content events on, emits the GenAI conventions'
    ``gen_ai.client.inference.operation.details`` event (a log record in the span's context).
    A model call with neither (no live meter provider, content events off) is a plain TracedSpan."""

    __slots__ = ("call", "event", "event_logger", "state")
    __init__ = object.__init__  # type: ignore[assignment]  # made by _llm, started by start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.state.metrics is not None:
                self.call.ended(self.state, exc)
            event, self.event = self.event, None
            if event is not None and self.event_logger is not None:
                if exc is not None:
                    event[semconv.ERROR_TYPE] = error_type(exc)
                self.event_logger.emit(_logs.LogRecord(
                    event_name=semconv.EVENT_INFERENCE_DETAILS, attributes=event,
                    context=otel_trace.set_span_in_context(self.span)))
        except Exception:
            logger.debug("cmbagent_otel: could not emit the content event", exc_info=True)
        finally:
            TracedSpan.__exit__(self, exc_type, exc, tb)  # a plain call: no super object, no *args


# attributes of the model call the content event repeats (the conventions' event attributes)
_EVENT_KEYS = ("gen_ai.", "server.")


def _event_base(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k.startswith(_EVENT_KEYS) and k not in semconv.JSON_CONTENT_ATTRIBUTES}


def _llm(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedSpan:
    configs = getattr(instance, "_config_list", None)
    register_llm_config_secrets(configs)
    # first_config's result as config_info takes it (anything but a mapping: no config), one read of the
    # list; config_info's cache hit written out (every model call: one call less)
    first = configs[0] if configs else None
    info = _models._infos.get(id(first))
    if info is None or info.config is not first:
        info = _models.config_info(first, instance)
    request_model = kwargs.get("model")  # a call's own model is the application's text too: redacted
    request_model = redact_name(str(request_model)) if request_model else info.model
    model = request_model or "unknown"
    agent = kwargs.get("agent")
    agent_label = None
    if agent is not None:  # _agent_label's cache hit written out: every model call
        static = state.agents.get(id(agent))
        agent_label = static.name if static is not None and static.config is getattr(agent, "llm_config", None) \
            else _agent_label(state, agent)
    own_parameters = not REQUEST_KEYS.isdisjoint(kwargs)  # the set's method over the keywords: no keys view made
    key = (info, model, agent_label)
    cached = None if own_parameters else state.chat_attributes.get(key)
    if cached is None:
        attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: semconv.OP_CHAT, **info.call_attributes,
                                 semconv.GEN_AI_REQUEST_MODEL: model}
        if agent_label is not None:
            attrs[GEN_AI_AGENT_NAME] = agent_label
        attrs.update(_models.request_attributes(kwargs, info.config, info))
        cached = (SharedAttributes(attrs), f"chat {model}")
        if not own_parameters:  # the call's attributes are its config's: the same every time
            if len(state.chat_attributes) >= 256:
                state.chat_attributes.clear()
            state.chat_attributes[key] = cached
    attrs, span_name = cached  # compose copies the attributes: shared, never changed
    event = None
    content = state.content
    if content is not ContentMode.NO_CONTENT:
        found, dropped = _content(_model_input, kwargs.get("messages")) or ({}, 0)
        if content.on_events:
            event = _event_base(attrs)
            event.update({k: json.loads(v) for k, v in found.items()})
        if content.on_spans:
            attrs = {**attrs, **found}
            if dropped:
                attrs[semconv.CONTENT_DROPPED_MESSAGES] = dropped
    metrics = state.metrics
    live = False
    if event is None and metrics is not None:  # an assignment: written in (_MADE), one frame less per call
        live = ModelMetrics.live(metrics)
    if event is None and not live:  # nothing to do when it ends but end
        return _start_llm(TracedSpanShell(), span_name, attrs, state.tracer, ctx)
    traced = _ChatSpan()  # its four fields set here: no __init__ (see TracedSpanShell), no keywords dict
    traced.state = state
    traced.call = call = _ModelCall(info, request_model)
    traced.event_logger = state.event_logger
    traced.event = event
    call.started = perf_counter()  # the call's duration (its metric) starts here
    return _start_llm(traced, span_name, attrs, state.tracer, ctx)


def _llm_fast(state: _State, ctx: Any, original: Callable[..., Any], instance: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """An unrecorded model call: its metrics only (when a meter provider records them)."""
    metrics = state.metrics
    live = False
    if metrics is not None:  # an assignment: written in (_MADE), one frame less per call
        live = ModelMetrics.live(metrics)
    if not live:
        return original(instance, *args, **kwargs)
    try:
        call = _model_call(instance, kwargs)
    except Exception:
        logger.debug("cmbagent_otel: no metrics for a model call", exc_info=True)
        return original(instance, *args, **kwargs)
    try:
        response = original(instance, *args, **kwargs)
    except BaseException as exc:
        call.ended(state, exc)
        raise
    try:
        call.response(response)
        if _cache_answered.wrapper is instance:  # AG2's cache answered: no tokens used, nothing paid
            _cache_answered.wrapper = None
            call.usage, call.cost = _NO_USAGE, None
    except Exception:
        logger.debug("cmbagent_otel: could not read a model response", exc_info=True)
    call.ended(state, None)
    return response


def _model_input(messages: Any) -> tuple[dict[str, str], int]:
    """(system instructions and input messages as attribute texts, input messages left out)."""
    found: dict[str, str] = {}
    dropped = 0
    if isinstance(messages, (list, tuple)) and messages:
        system, rest = _messages.split_system(messages)
        if system:
            found[semconv.GEN_AI_SYSTEM_INSTRUCTIONS] = _messages.render(system)[0]
        if rest:
            text, dropped = _messages.render(rest, convert=_messages.message)
            found[semconv.GEN_AI_INPUT_MESSAGES] = text
    return found, dropped


def _response_output(response: Any, history: Any = None) -> str | None:
    out = _messages.response_messages(response)
    if not out:
        return None
    _messages.learn_reply_split(history, out)
    return _messages.render(out)[0]


def _record_llm(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, response: Any) -> None:
    # every model call: the response's facts read here, its attributes set in one call
    response_model, usage, cost = _response_facts(response)
    attrs: dict[str, Any] = {}
    if _cache_answered.wrapper is instance:  # AG2's cache answered (its first call's usage and cost): no call made
        _cache_answered.wrapper = None
        usage, cost = _NO_USAGE, None
        attrs[semconv.LLM_CACHE_HIT] = True
    chat = type(traced) is _ChatSpan
    if chat:  # its metrics read the response when it ends
        call = traced.call  # type: ignore[attr-defined]
        call.response_model, call.usage, call.cost = response_model, usage, cost
    if response_model is not None:
        attrs[GEN_AI_RESPONSE_MODEL] = response_model
    response_id = getattr(response, "id", None)
    if isinstance(response_id, str):  # the server's text too, as the finish reasons are
        attrs[GEN_AI_RESPONSE_ID] = redact_id(response_id)
    attrs.update(usage)
    if cost is not None:
        attrs[LLM_COST_USD] = cost
    choices = getattr(response, "choices", None)
    output = None
    if isinstance(choices, list):
        reasons = []
        try:
            for choice in choices[:MAX_REASONS]:  # a loop, not a comprehension: one frame less per call
                reason = getattr(choice, "finish_reason", None)
                if reason:
                    reasons.append(reason if reason in _FINISH_WORDS else _finish_reason(reason))
        except TypeError:  # a reason that cannot be hashed (a server's object): each one's text
            reasons = [_finish_reason(reason) for choice in choices[:MAX_REASONS]
                       if (reason := getattr(choice, "finish_reason", None))]
        if reasons:
            attrs[GEN_AI_RESPONSE_FINISH_REASONS] = reasons
        if state.content is not ContentMode.NO_CONTENT:
            output = _content(_response_output, response, kwargs.get("messages"))
            if output is not None and state.capture:
                attrs[semconv.GEN_AI_OUTPUT_MESSAGES] = output
    if attrs:
        try:
            traced.span.set_attributes(attrs)
        except Exception:
            logger.debug("cmbagent_otel: could not set attributes", exc_info=True)
    event = traced.event if chat else None  # type: ignore[attr-defined]
    if event is not None:
        event.update(_event_base(attrs))
        if output is not None:
            event[semconv.GEN_AI_OUTPUT_MESSAGES] = json.loads(output)


# the finish reasons of the OpenAI API (the ones AG2's other clients map theirs to): kept as they are
_FINISH_WORDS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
MAX_REASONS = 16
"""Finish reasons recorded per response at most (one per choice; a server may send thousands): with each
at most :data:`MAX_NAME` characters, the attribute stays within ~4 KB."""


def _finish_reason(reason: Any) -> str:
    """Any other finish reason: the server's text (or object), redacted and bounded."""
    try:
        text = reason if isinstance(reason, str) else str(reason)
        return redact_name(text[:4 * MAX_NAME])
    except Exception:
        return "unknown"


# --- tools -----------------------------------------------------------------------------------------
def _tool(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedSpan:
    func_call = _arg(args, kwargs, 0, "func_call")
    name = "unknown"
    arguments = None
    if isinstance(func_call, dict):
        arguments = func_call.get("arguments")
        # Before the tool runs, content capture on or off: a password passed to the tool must
        # also be redacted from the exception message or result it produces.
        learn_secrets_in(arguments)
        # the model's text: a name it made up may quote a key (span name, gen_ai.tool.name, rows)
        name = _tool_names.redact(bounded_name(str(func_call.get("name") or "unknown"))) or "unknown"
    attrs: dict[str, Any] = {
        GEN_AI_OPERATION_NAME: OP_EXECUTE_TOOL,
        GEN_AI_TOOL_NAME: name,
        GEN_AI_TOOL_TYPE: "function",
        GEN_AI_AGENT_NAME: cached_name(state.agents, instance),
    }
    call_id = _arg(args, kwargs, 1, "call_id")
    if isinstance(call_id, str):  # the model server's text (a key it was sent, megabytes): redact_id skips ordinary ids
        attrs[GEN_AI_TOOL_CALL_ID] = redact_id(call_id)
    if state.capture and arguments is not None:
        text = _content(_tool_arguments_text, arguments)
        if text is not None:
            attrs[semconv.GEN_AI_TOOL_CALL_ARGUMENTS] = text
    return _start_tool(TracedSpanShell(), f"execute_tool {name}", attrs, state.tracer, ctx)


# redact() memoised (a tool's name comes back), bounded and made encodable: the model server's text
_tool_names = RedactionCache(max_len=512, max_chars=1_000_000, names=True)


def _record_tool(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    if not (isinstance(result, tuple) and len(result) == 2):
        return
    success, payload = result
    register_new_environment()  # a tool may return a key the app put in os.environ after instrument()
    content = payload.get("content") if isinstance(payload, dict) else None
    learn_encoded_in(content)  # a password from the tool's arguments, returned base64-encoded
    if success is False:
        traced.fail(truncate(str(content), 1024) if content is not None else "tool execution failed", "tool_error")
    if state.capture and content is not None:
        traced.set(semconv.GEN_AI_TOOL_CALL_RESULT, _content(_tool_result_text, content))


def _tool_arguments_text(arguments: Any) -> str:
    return _messages.render_value(_messages.tool_arguments(arguments))


def _tool_result_text(content: Any) -> str:
    return _messages.render_value(_messages.tool_result(content))


def _record_tool_call(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    _record_tool(state, traced, instance, args, kwargs, result)
    tracker = traced.steps
    if tracker is not None:
        _track_tool(tracker, instance, args, kwargs, result)


def _track_tool(tracker: _steps.StepTracker, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    """Hand a tool call's outcome to the plan-step tracker of the cmbagent chat it ran in."""
    if not (isinstance(result, tuple) and len(result) == 2) or result[0] is False:
        return
    func_call = _arg(args, kwargs, 0, "func_call")
    name = func_call.get("name") if isinstance(func_call, dict) else None
    payload = result[1]
    content = payload.get("content") if isinstance(payload, dict) else None
    # the context variables the tool returned (a ReplyResult), else the group's own
    context = getattr(content, "context_variables", None)
    if context is None:
        context = getattr(instance, "context_variables", None)
    tracker.after_tool(str(name), context)


def _steps_of(ctx: Any) -> _steps.StepTracker | None:
    try:
        value = ctx.get(_SCOPE_KEY)
        if value is None:  # not ours (an unsampled chat): no call
            return None
        value = scope_in(value)
        tracker = value.steps if value is not None else None
        if tracker is not None:
            current_scope(ctx)  # a turn starting: opens a step announced before it, as a span would
        return tracker
    except Exception:
        logger.debug("cmbagent_otel: no step tracker", exc_info=True)
        return None


def _tool_fast(state: _State, ctx: Any, original: Callable[..., Any], instance: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    """An unrecorded tool call: the plan-step tracker still sees it."""
    tracker = _steps_of(ctx)
    result = original(instance, *args, **kwargs)
    if tracker is not None:
        try:
            _track_tool(tracker, instance, args, kwargs, result)
        except Exception:
            logger.debug("cmbagent_otel: the step tracker could not read a tool call", exc_info=True)
    return result


async def _tool_fast_async(state: _State, ctx: Any, original: Callable[..., Any], instance: Any,
                           args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tracker = _steps_of(ctx)
    result = await original(instance, *args, **kwargs)
    if tracker is not None:
        try:
            _track_tool(tracker, instance, args, kwargs, result)
        except Exception:
            logger.debug("cmbagent_otel: the step tracker could not read a tool call", exc_info=True)
    return result


# --- code execution ---------------------------------------------------------------------------------
def _block_parts(block: Any) -> tuple[str, str]:
    if isinstance(block, (tuple, list)) and len(block) >= 2:
        return str(block[0] or "unknown"), str(block[1])
    return str(getattr(block, "language", "unknown") or "unknown"), str(getattr(block, "code", ""))


def _code_blocks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], str]:
    """(the code blocks of an execution, their language: one name, or a sorted comma list)."""
    blocks = _arg(args, kwargs, 0, "code_blocks")
    blocks = list(blocks) if isinstance(blocks, Iterable) and not isinstance(blocks, (str, bytes)) else []
    languages = sorted({_block_parts(b)[0] for b in blocks}) or ["unknown"]
    # the model's text (a fence's info string): a key written there went into the span name,
    # cmbagent.code.language and the code metrics' attributes, content capture off too
    return blocks, redact_name(languages[0] if len(languages) == 1 else ",".join(languages))


def _code(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> TracedSpan | None:
    if _in_code_span.get():
        return None  # an executor subclass calling super(): one span per execution
    blocks, language = _code_blocks(args, kwargs)
    attrs: dict[str, Any] = {
        semconv.CODE_LANGUAGE: language,
        semconv.CODE_BLOCK_COUNT: len(blocks),
        semconv.CODE_EXECUTOR: type(instance).__name__,
    }
    if state.capture and blocks:
        attrs[semconv.CODE_SOURCE] = safe_text("\n\n".join(_block_parts(b)[1] for b in blocks))
    return _CodeSpan(f"execute_code {language}", semconv.KIND_CODE, attrs, tracer=state.tracer, context=ctx,
                     state=state, language=language).__enter__()


class _CodeSpan(TracedSpan):
    """Marks the context so nested executor calls do not open a second code span, and hands the
    span's trace context to the processes the execution starts (:mod:`._subprocess_context`).
    A failed execution is counted in ``cmbagent.code.execution.failures``."""

    __slots__ = ("_carrier", "_flag", "language", "state")

    def __init__(self, name: str, kind: str, attributes: dict[str, Any], *, tracer: Tracer, context: Any,
                 state: _State, language: str) -> None:
        super().__init__(name, kind, attributes, tracer=tracer, context=context)
        self.state = state
        self.language = language

    def __enter__(self) -> TracedSpan:
        # the mark is set once the span started: set before, an interrupt inside start() left it set in the
        # context (the thread's later code executions got no span)
        self._flag = self._carrier = None
        super().__enter__()
        try:
            self._flag = _in_code_span.set(True)
            try:
                self._carrier = _subprocess_context.enter(self.span)
            except Exception:
                logger.debug("cmbagent_otel: no trace context for the executed code", exc_info=True)
        except BaseException as exc:  # Ctrl-C before the wrapper's try: see end_interrupted
            _end_marked_interrupted(self, _in_code_span, exc)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            _subprocess_context.leave(self._carrier)
        except Exception:
            logger.debug("cmbagent_otel: could not reset the executed code's trace context", exc_info=True)
        if exc[1] is not None and self.state.metrics is not None:
            self.state.metrics.code_failure(self.language, error_type(exc[1]))
        try:
            super().__exit__(*exc)
        finally:
            if self._flag is not None:
                _in_code_span.reset(self._flag)


def _end_marked_interrupted(traced: _CodeSpan | _HumanSpan, mark: contextvars.ContextVar[bool],
                            exc: BaseException) -> None:
    """:func:`end_interrupted` for a span that marks its context (``mark``, set after the span started):
    an interrupt raised when the mark's ``set`` returned (a signal handler runs after a C call) lost its
    token, so the mark is put back by value (it was unset: the span is opened only then)."""
    if traced._flag is None:
        mark.set(False)
    end_interrupted(traced, exc)


def _code_outcome(result: Any) -> tuple[Any, Any]:
    """(exit code, output) of ``ConversableAgent.execute_code_blocks`` (a tuple) or a ``CodeResult``."""
    if isinstance(result, tuple) and len(result) >= 2:
        return result[0], result[1]
    return getattr(result, "exit_code", None), getattr(result, "output", None)


def _record_code(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    exit_code, output = _code_outcome(result)
    if isinstance(exit_code, int):
        traced.set(semconv.CODE_EXIT_CODE, exit_code)
        if exit_code != 0:
            traced.fail(f"code execution exited with {exit_code}", "nonzero_exit_code")
            if state.metrics is not None and isinstance(traced, _CodeSpan):
                state.metrics.code_failure(traced.language, "nonzero_exit_code")
    if output is not None:
        register_new_environment()  # the code may print a key the app put in os.environ after instrument()
        learn_encoded_in(output)
        traced.set(semconv.CODE_OUTPUT, safe_text(output, 2048))


def _code_fast(state: _State, ctx: Any, original: Callable[..., Any], instance: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    """An unrecorded code execution: the processes it starts still get the (unsampled) trace context,
    so a script's own spans are not sampled either, and a failure is still counted."""
    if _in_code_span.get():
        return original(instance, *args, **kwargs)
    flag = _in_code_span.set(True)
    carrier = language = None
    try:
        carrier = _subprocess_context.enter(otel_trace.get_current_span(ctx))
        metrics = state.metrics
        if metrics is not None and metrics.live():  # the blocks' language only for a failure count recorded
            language = _code_blocks(args, kwargs)[1]
    except Exception:
        logger.debug("cmbagent_otel: no trace context for the executed code", exc_info=True)
    try:
        result = original(instance, *args, **kwargs)
    except BaseException as exc:
        if language is not None and state.metrics is not None:
            state.metrics.code_failure(language, error_type(exc))
        raise
    finally:
        with contextlib.suppress(Exception):
            _subprocess_context.leave(carrier)
        _in_code_span.reset(flag)
    if language is not None and state.metrics is not None:
        try:
            exit_code = _code_outcome(result)[0]
            if isinstance(exit_code, int) and exit_code != 0:
                state.metrics.code_failure(language, "nonzero_exit_code")
        except Exception:
            logger.debug("cmbagent_otel: could not read a code execution's outcome", exc_info=True)
    return result


# --- human input --------------------------------------------------------------------------------------
_in_human_span: contextvars.ContextVar[bool] = contextvars.ContextVar("cmbagent_otel_in_human", default=False)


def _human(state: _State, ctx: Any, instance: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> TracedSpan | None:
    if _in_human_span.get():
        return None  # a subclass's get_human_input calling super(): one span per request
    name = cached_name(state.agents, instance)
    attrs: dict[str, Any] = {GEN_AI_AGENT_NAME: name}
    if state.capture:
        attrs[semconv.HUMAN_INPUT_PROMPT] = safe_text(_arg(args, kwargs, 0, "prompt"))
    return _HumanSpan(f"await_human_input {name}", semconv.KIND_HUMAN_INPUT, attrs, tracer=state.tracer,
                      context=ctx).__enter__()


class _HumanSpan(TracedSpan):
    """Marks the context so that a subclass's ``get_human_input`` calling ``super()`` (both patched,
    see :func:`_adopt_overrides`) opens one ``await_human_input`` span, not two."""

    __slots__ = ("_flag",)

    def __enter__(self) -> TracedSpan:
        # the mark is set once the span started (see _CodeSpan.__enter__)
        self._flag = None
        super().__enter__()
        try:
            self._flag = _in_human_span.set(True)
        except BaseException as exc:  # Ctrl-C before the wrapper's try: see end_interrupted
            _end_marked_interrupted(self, _in_human_span, exc)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._flag is not None:
                _in_human_span.reset(self._flag)


def _adopt_overrides(state: _State, cls: type) -> None:
    """Trace what the agent class ``cls`` overrides of the methods patched on ``ConversableAgent`` for
    human input: AG2 looks the method up on the instance's class, so an override (an application's
    user proxy reading input from a web socket) bypasses the patch on the base class. The overriding
    class is patched when an agent of ``cls`` first takes a turn in an instrumentation cycle
    (:func:`_type_facts`, once per class: no per-turn cost), and restored by ``uninstrument()``."""
    try:
        with _executor_lock:
            for attr, make_wrapper in _OVERRIDABLE:
                owner = defining_class(cls, attr)
                if owner is None or owner is object or _ours_in_chain(vars(owner)[attr]):
                    continue  # ConversableAgent's own (patched), or an override patched already
                AG2Instrumentor().patch_late(owner, attr, make_wrapper(state))
    except Exception:
        logger.debug("cmbagent_otel: could not adopt an agent class's overrides", exc_info=True)


def _adopt_instance_overrides(state: _State, agent: Any) -> None:
    """Trace a human-input function set on the agent itself: cmbagent's backend gives its admin agent the
    web UI's answers so (MARS ``configure_admin_for_websocket``: ``agent.get_human_input = fn``), and AG2
    finds it in the instance, past every patch on a class. Wrapped where it is (the wrapper passes the
    agent, which a function in the instance is not bound to), when the agent's facts are computed or it
    starts a conversation; restored by ``uninstrument()`` (agents held weakly)."""
    try:
        own = getattr(agent, "__dict__", None)
        if not own or own.keys().isdisjoint(_OVERRIDABLE_NAMES):
            return
        with _executor_lock:
            for attr, make_wrapper in _OVERRIDABLE:
                value = own.get(attr)
                if value is None or not callable(value) or _ours_in_chain(value):
                    continue
                AG2Instrumentor().patch_instance(agent, attr, _on_instance(state, agent, make_wrapper(state)))
    except Exception:
        logger.debug("cmbagent_otel: could not adopt an agent's own human input", exc_info=True)


def _on_instance(state: _State, agent: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper`` for a function stored in ``agent`` (wrapt calls it with no instance)."""
    ref = weakref.ref(agent)

    def on_instance(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        owner = ref() if instance is None else instance
        if owner is None:
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, owner, args, kwargs)

    on_instance._cmbagent_otel = state  # type: ignore[attr-defined]
    return on_instance


def _record_human(state: _State, traced: TracedSpan, instance: Any, args: Any, kwargs: Any, result: Any) -> None:
    if state.capture:
        traced.set(semconv.HUMAN_INPUT_RESPONSE, safe_text(result))


_CONTENT_ONLY = frozenset({_record_reply, _record_human})  # recorders with nothing to do while capture is off

# --- targets ------------------------------------------------------------------------------------------
def _sync(build: Callable[..., TracedSpan | None], record: Callable[..., None] | None = None,
          fast: Callable[..., Any] | None = None) -> Callable[[_State], Any]:
    return lambda state: _traced_sync(state, build, record, fast)


def _async(build: Callable[..., TracedSpan | None], record: Callable[..., None] | None = None,
           fast: Callable[..., Any] | None = None) -> Callable[[_State], Any]:
    return lambda state: _traced_async(state, build, record, fast)


# what an agent subclass overrides (a web UI's user proxy asks its human its own way) and is traced
# when it does (see _adopt_overrides): (attribute, wrapper factory)
_OVERRIDABLE: tuple[tuple[str, Callable[[_State], Any]], ...] = (
    ("get_human_input", _sync(_human, _record_human)),
    ("a_get_human_input", _async(_human, _record_human)))
_OVERRIDABLE_NAMES = frozenset(attr for attr, _ in _OVERRIDABLE)


# (module, class name or "" for a module attribute, attribute, wrapper factory)
_AGENT_MODULE = "autogen.agentchat.conversable_agent"
_GROUPCHAT_MODULE = "autogen.agentchat.groupchat"
_CLIENT_MODULE = "autogen.oai.client"
# classes every supported AG2 (0.9 to 0.14, cmbagent_autogen) has with all the methods TARGETS names on
# them: one missing is worth a warning (the code executors and module functions vary between lines)
_EXPECTED_OWNERS = ("ConversableAgent", "OpenAIWrapper", "GroupChat")


def _sent_credentials_wrapper(state: _State) -> Callable[..., Any]:
    """``openai``'s ``_process_response`` (sync and async: the coroutine is returned as it is): the
    credentials of the request, as sent, are registered before the answer is parsed
    (:func:`redaction.register_sent_credentials`). The sync method is patched with this body itself
    (``method_for``: no trampoline frame and no bound method per call, as AG2's methods are)."""
    def method_for(original: Callable[..., Any]) -> Callable[..., Any]:
        def process_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            if state.active:
                # only a client whose credential is computed per request (an Azure AD token provider, an
                # httpx auth=): a key the config walk registered is in the headers of every other client
                fields = getattr(self, "__dict__", None)
                if type(fields) is dict and (fields.get("_azure_ad_token_provider") is not None
                                             or getattr(fields.get("_client"), "_auth", None) is not None):
                    register_sent_credentials(kwargs.get("response"))
            return original(self, *args, **kwargs)

        return process_response

    return wrapt_wrapper(method_for, state)


TARGETS: tuple[tuple[str, str, str, Callable[[_State], Any]], ...] = (
    (_AGENT_MODULE, "ConversableAgent", "initiate_chat", _sync(_conversation, _record_chat_result)),
    (_AGENT_MODULE, "ConversableAgent", "a_initiate_chat", _async(_conversation, _record_chat_result)),
    (_AGENT_MODULE, "", "initiate_chats", _sync(_initiate_chats)),
    (_AGENT_MODULE, "", "a_initiate_chats", _async(_initiate_chats)),
    ("autogen", "", "initiate_chats", _sync(_initiate_chats)),
    ("autogen.agentchat", "", "initiate_chats", _sync(_initiate_chats)),
    # every public name of the two functions is its own module attribute, bound at import: the ones
    # above serve agents' nested and sequential chats, these an application's own import of them
    ("autogen.agentchat", "", "a_initiate_chats", _async(_initiate_chats)),
    ("autogen.agentchat.chat", "", "initiate_chats", _sync(_initiate_chats)),
    ("autogen.agentchat.chat", "", "a_initiate_chats", _async(_initiate_chats)),
    (_AGENT_MODULE, "ConversableAgent", "generate_reply", _sync(_agent, _record_reply, _agent_fast)),
    (_AGENT_MODULE, "ConversableAgent", "a_generate_reply", _async(_agent, _record_reply, _agent_fast_async)),
    (_CLIENT_MODULE, "OpenAIWrapper", "create", _sync(_llm, _record_llm, _llm_fast)),
    (_AGENT_MODULE, "ConversableAgent", "execute_function", _sync(_tool, _record_tool_call, _tool_fast)),
    (_AGENT_MODULE, "ConversableAgent", "a_execute_function", _async(_tool, _record_tool_call, _tool_fast_async)),
    (_AGENT_MODULE, "ConversableAgent", "execute_code_blocks", _sync(_code, _record_code, _code_fast)),
    *(
        (module, cls, "execute_code_blocks", _sync(_code, _record_code, _code_fast))
        for module, cls in CODE_EXECUTOR_CLASSES + OPTIONAL_EXECUTOR_CLASSES
    ),
    (_GROUPCHAT_MODULE, "GroupChat", "select_speaker", _handoffs.selection_sync),
    (_GROUPCHAT_MODULE, "GroupChat", "a_select_speaker", _handoffs.selection_async),
    (_GROUPCHAT_MODULE, "GroupChat", "_auto_select_speaker", _handoffs.auto_sync),
    (_GROUPCHAT_MODULE, "GroupChat", "a_auto_select_speaker", _handoffs.auto_async),
    (_AGENT_MODULE, "ConversableAgent", "get_human_input", _sync(_human, _record_human)),
    (_AGENT_MODULE, "ConversableAgent", "a_get_human_input", _async(_human, _record_human)),
    # what an azure_ad_token_provider or an httpx auth= put in a successful request (kept by neither)
    ("openai._base_client", "SyncAPIClient", "_process_response", _sent_credentials_wrapper),
    ("openai._base_client", "AsyncAPIClient", "_process_response", _sent_credentials_wrapper),
    # whether AG2's cache gave the answer create() returns
    (_CLIENT_MODULE, "OpenAIWrapper", "_update_usage", _cache_answer_wrapper),
)


def _popen_wrapper(state: _State) -> Callable[..., Any]:
    def popen_init(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not state.active:
            return wrapped(*args, **kwargs)
        return _subprocess_context.popen_init(wrapped, instance, args, kwargs)

    popen_init._cmbagent_otel = state  # type: ignore[attr-defined]
    return popen_init


# Methods of a class are patched with a plain function (:func:`_plain_method`), not a wrapt proxy:
# through a proxy every read of the method off an instance builds a bound-wrapper object, and every
# call goes through it (~3,000 instructions more per call than a plain function, callgrind), and
# ``isinstance(x, Agent)`` (AG2 asks it several times per turn) reads ``generate_reply`` and
# ``a_generate_reply`` off the agent each time. The plain function reads as an ordinary method, calls
# the same wrapper, carries ``__wrapped__`` (as a wrapt wrapper does) and is found and removed anywhere
# in a chain of wrapt wrappers like a proxy of ours is. Module functions and what is found late
# (a custom executor's class, :meth:`AG2Instrumentor.patch_late`) keep wrapt proxies.
def _plain_patchable(owner_name: str, current: Any) -> bool:
    """Whether the class attribute ``current`` is patched with a plain function (a function, or
    another instrumentation's wrapt wrapper of one)."""
    if not owner_name:
        return False
    node = current
    for _ in range(32):  # another instrumentation's proxies: what they end in decides (a staticmethod or
        if not isinstance(node, PROXY):  # classmethod keeps a proxy: it binds differently)
            break
        node = node.__wrapped__
    return type(node) is types.FunctionType


def _plain_method(original: Any, wrapper: Callable[..., Any], state: _State) -> Any:
    """``original`` (a class attribute) patched with ``wrapper`` (a wrapt-style wrapper of ours) as a
    plain function: ``wrapper(bound original, instance, args, kwargs)``, an ``async def`` when the
    original is one."""
    bind = original.__get__
    method_for = getattr(wrapper, "_method_for", None)
    is_async = inspect.iscoroutinefunction(original)
    if method_for is not None and type(original) is types.FunctionType \
            and is_async == getattr(wrapper, "_method_is_async", False):
        patched = method_for(original)  # the wrapper's body itself: no trampoline (another's proxy: bound, below)
    elif is_async:
        async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await wrapper(bind(self, type(self)), self, args, kwargs)
    else:
        def patched(self: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            return wrapper(bind(self, type(self)), self, args, kwargs)
    for name in ("__module__", "__name__", "__qualname__", "__doc__"):
        with contextlib.suppress(Exception):
            setattr(patched, name, getattr(original, name))
    patched.__wrapped__ = original  # type: ignore[attr-defined]
    patched._cmbagent_otel = state  # type: ignore[attr-defined]
    return patched


def _ours_in_chain(value: Any) -> bool:
    """Whether a live wrapper of ours is somewhere in ``value``'s chain of wrapt wrappers (another
    instrumentation, e.g. OpenInference, may have wrapped before or after us)."""
    node = value
    for _ in range(32):
        if not is_link(node):
            return False
        state = state_of(node)
        if isinstance(state, _State) and state.active:
            return True
        node = node.__wrapped__
    return False


def _resolve(module_name: str, owner_name: str) -> Any:
    if (module_name, owner_name) in OPTIONAL_EXECUTOR_CLASSES and module_name not in sys.modules:
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception:  # optional dependency of AG2 missing, or another AG2 line
        return None
    return getattr(module, owner_name, None) if owner_name else module


def _autogen_version() -> str:
    return str(getattr(sys.modules.get("autogen"), "__version__", "of unknown version"))


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


_warned_unsupported = False


def _autogen_importable() -> bool:
    """Whether AG2's classic ``autogen`` package imports. When it does not, says why: at INFO when no AG2
    is installed (an ingest host, an OTLP-only program), once as a WARNING when an AG2 is installed that
    has no classic API (ag2 1.x ships a new ``ag2`` package and no ``autogen``) or whose import fails."""
    global _warned_unsupported
    try:
        importlib.import_module("autogen")
        return True
    except Exception as exc:
        failure = exc
    ag2 = _distribution_version("ag2")
    no_autogen = isinstance(failure, ModuleNotFoundError) and failure.name == "autogen"
    if no_autogen and ag2 is None:
        logger.info("cmbagent_otel: autogen is not importable; AG2 instrumentation skipped")
    elif not _warned_unsupported:
        _warned_unsupported = True
        if no_autogen:
            logger.warning("cmbagent_otel: ag2 %s is installed but has no importable classic `autogen` package "
                           "(ag2 1.x replaced it with the new `ag2` package): AG2 is not instrumented; "
                           "cmbagent-otel supports ag2 0.9 to 0.14 and cmbagent_autogen", ag2)
        else:
            logger.warning("cmbagent_otel: importing autogen failed (%s: %s): AG2 is not instrumented",
                           type(failure).__name__, safe_text(str(failure), 200))
    return False


class AG2Instrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments AG2 agents, group chats, LLM calls, tools and code execution.

    ``instrument(tracer_provider=None, capture_content=None, logger_provider=None,
    meter_provider=None, metrics=None)``: ``capture_content`` (a bool, a :class:`ContentMode`
    or its name) defaults to ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``; content
    events go to ``logger_provider`` (default: the global one); metrics (``docs/metrics.md``) to
    ``meter_provider`` (default: the global one), none with ``metrics=False`` or
    ``CMBAGENT_OTEL_METRICS=false``. Safe to call twice (idempotent); ``uninstrument()``
    restores every patched attribute and drops all state (tracers, meters, capture settings,
    AG2 classes, the provider binding of the workflow API).
    """

    _patched: list[tuple[Any, str]]
    _instances: weakref.WeakValueDictionary[int, Any] | None = None  # agents with a function patched in them
    _state: _State | None = None
    _binding: object | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        # AG2 ships as `ag2`, `autogen` or `cmbagent_autogen` distributions, all importing
        # `autogen`; importability is checked in _instrument instead of by distribution name.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider")
        meter_provider = kwargs.get("meter_provider")
        metrics_on = bool(environment_variables.get(environment_variables.METRICS, kwargs.get("metrics")))
        capture = kwargs.get("capture_content")
        mode = capture_from_env() if capture is None else content_mode(capture)
        event_logger = None
        if mode.on_events:
            try:
                event_logger = _logs.get_logger(semconv.SCOPE_AG2, __version__, schema_url=semconv.SCHEMA_URL,
                                                logger_provider=kwargs.get("logger_provider"))
            except Exception:
                logger.warning("cmbagent_otel: no logger for content events; they are off", exc_info=True)
        _generate_starts()
        state = _State(make_tracer(semconv.SCOPE_AG2, provider), make_tracer(semconv.SCOPE_WORKFLOW, provider), mode,
                       event_logger, model_metrics(meter_provider) if metrics_on else None)
        self._state = state
        # workflow blocks opened by the application go to the same providers as the AG2 spans and metrics
        self._binding = (workflow_tracers.bind_providers(provider, meter_provider, metrics_on)
                         if provider is not None or meter_provider is not None or not metrics_on else None)
        self._patched = []
        if not _autogen_importable():
            return
        state.manager_cls = _resolve("autogen.agentchat.groupchat", "GroupChatManager")
        state.tool_executor_cls = _resolve("autogen.agentchat.group.group_tool_executor", "GroupToolExecutor")
        state.no_speaker_cls = _resolve("autogen.exception_utils", "NoEligibleSpeakerError")
        seen: set[tuple[int, str]] = set()
        missing: list[str] = []
        for module_name, owner_name, attr, make_wrapper in TARGETS:
            owner = _resolve(module_name, owner_name)
            if owner is None or not hasattr(owner, attr):
                if owner_name in _EXPECTED_OWNERS and module_name in (_AGENT_MODULE, _GROUPCHAT_MODULE, _CLIENT_MODULE):
                    missing.append(f"{owner_name}.{attr}")
                continue
            if (id(owner), attr) in seen:
                continue
            if owner_name and attr not in vars(owner):
                continue  # inherited: patching the defining class covers it
            current = vars(owner)[attr] if owner_name else getattr(owner, attr)
            if _ours_in_chain(current):
                continue  # a live wrapper of ours is there already; another one's wrapper is wrapped in turn
            wrapper = make_wrapper(state)
            try:
                if _plain_patchable(owner_name, current):
                    setattr(owner, attr, _plain_method(current, wrapper, state))
                else:
                    wrapt.wrap_function_wrapper(owner, attr, wrapper)
            except Exception:
                logger.debug("cmbagent_otel: could not patch %s.%s", owner, attr, exc_info=True)
                missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
                continue
            seen.add((id(owner), attr))
            self._patched.append((owner, attr))
        agent_cls = _resolve(_AGENT_MODULE, "ConversableAgent")
        if agent_cls is not None:
            state.human_input = (getattr(agent_cls, "get_human_input", None),
                                 getattr(agent_cls, "a_get_human_input", None))
        if missing:
            # an AG2 release whose classes lack (or renamed) what we wrap: one line, the rest is instrumented
            logger.warning("cmbagent_otel: this AG2 (autogen %s) lacks %s: those operations get no spans; "
                           "the rest is instrumented (supported: ag2 0.9 to 0.14, cmbagent_autogen)",
                           _autogen_version(), ", ".join(missing))
        try:  # code executions hand their trace context to the processes they start
            wrapt.wrap_function_wrapper(subprocess.Popen, "__init__", _popen_wrapper(state))
            self._patched.append((subprocess.Popen, "__init__"))
        except Exception:
            logger.debug("cmbagent_otel: could not patch subprocess.Popen", exc_info=True)

    def patch_late(self, owner: Any, attr: str, wrapper: Callable[..., Any]) -> None:
        """Patch ``owner.attr`` found after ``instrument()`` (e.g. a custom code executor class)."""
        if not self._patching():
            return
        wrapt.wrap_function_wrapper(owner, attr, wrapper)
        self._patched.append((owner, attr))

    def patch_instance(self, agent: Any, attr: str, wrapper: Callable[..., Any]) -> None:
        """Patch ``agent.attr``, a function stored in the agent itself; the agent is held weakly."""
        if not self._patching():
            return
        wrapt.wrap_function_wrapper(agent, attr, wrapper)
        instances = self._instances
        if instances is None:
            instances = self._instances = weakref.WeakValueDictionary()
        instances[id(agent)] = agent

    def _patching(self) -> bool:
        """Whether a late patch may be made: in a cycle ``uninstrument()`` has not ended (read under
        ``_executor_lock`` by the adopting callers, as ``uninstrument()`` ends it)."""
        state = getattr(self, "_state", None)
        return self.is_instrumented_by_opentelemetry and state is not None and state.active

    def _uninstrument(self, **kwargs: Any) -> None:
        state = self._state
        # under the lock the late patches are made with (another thread's agent adopting its executor or
        # override): each is made before, then listed here and put back, or refused after. One made while
        # the list below was being put back stayed, outside any list, and the next cycle found it ours
        with _executor_lock:
            if state is not None:
                state.active = False
            patched, self._patched = getattr(self, "_patched", []), []
            instances, self._instances = self._instances, None
        for owner, attr in reversed(patched):
            try:
                unwrap_ours(owner, attr, state)
            except Exception:
                logger.debug("cmbagent_otel: could not unpatch %s.%s", owner, attr, exc_info=True)
        for agent in list(instances.values()) if instances is not None else ():
            for attr, _ in _OVERRIDABLE:
                try:
                    unwrap_ours(agent, attr, state)
                except Exception:
                    logger.debug("cmbagent_otel: could not unpatch an agent's %s", attr, exc_info=True)
        with _executor_lock:
            _known_executor_types.clear()
        binding, self._binding = self._binding, None
        if binding is not None:
            workflow_tracers.release(binding)
        self._state = None

    @property
    def patched(self) -> list[tuple[Any, str]]:
        """The (owner, attribute) pairs currently patched."""
        return list(getattr(self, "_patched", []))
