"""Speaker selection in AG2 group chats: a span event, or a span when the model is asked.

Most selections do no work of their own (``round_robin``, ``random``, ``manual``, a selection
function, a handoff or an AG2 group pattern's after-work target): such a selection becomes a
``cmbagent.handoff`` event on the span it happens in (the group chat manager's
``invoke_agent``, or the plan step a cmbagent control chat is in), with the attributes a
``select_speaker`` span would carry: ``cmbagent.span.kind=speaker_selection``,
``cmbagent.execution_order``, ``cmbagent.event.depth``, ``cmbagent.handoff.from/to/candidates/
reason`` and, when the chat ends there, ``cmbagent.handoff.ends_chat`` (or ``error.type`` and
``exception.message`` when the selection failed). A selection that asks the model (``auto``,
or a selection function / group pattern target answering ``"auto"``) goes through AG2's
``_auto_select_speaker``: that one is a ``select_speaker {from}`` span, so the model calls it
makes keep their parent.

A span holds a bounded number of events (``OTEL_SPAN_EVENT_COUNT_LIMIT``, 128 by default):
past that, a selection is recorded as a zero-length ``select_speaker`` span instead, so a long
chat loses none. The DAG exporter writes the same ``handoff`` execution event from either form.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from .. import semconv
from .._context import _GIL, _SCOPE_KEY, _SUPPRESS, _SUPPRESS_PLAIN, SPAN_KEY, Scope, get_current, scope_in
from .._spans import END_TIME_SPAN, TracedSpan, compose, error_type, exception_text, record_exception
from .._specialise import specialiser
from ..redaction import max_length, safe_text

# the keys of every handoff event, read as module globals (one lookup each, not a global and a module attribute)
from ..semconv import (
    EVENT_DEPTH,
    EXECUTION_ORDER,
    HANDOFF_CANDIDATES,
    HANDOFF_FROM,
    HANDOFF_REASON,
    HANDOFF_TO,
    KIND_SPEAKER_SELECTION,
    SPAN_KIND,
)
from ._content import agent_name, cached_name
from ._patching import wrapt_wrapper

logger = logging.getLogger("cmbagent_otel")

EVENT_NAME = "cmbagent.handoff"
DEFAULT_EVENT_LIMIT = 128  # the SDK's default OTEL_SPAN_EVENT_COUNT_LIMIT
MAX_CANDIDATES = 128  # agents named in cmbagent.handoff.candidates (see _candidates)
EVENT_MARGIN = 2  # left free for the span's own exception event: the SDK drops the oldest event when full

_selection: contextvars.ContextVar[Selection | None] = contextvars.ContextVar("cmbagent_otel_selection",
                                                                              default=None)


def ends_chat(exc: BaseException | None, cls: type | None) -> bool:
    """Whether ``exc`` is AG2's NoEligibleSpeakerError: its normal way to end a group chat."""
    if exc is None:
        return False
    return (cls is not None and isinstance(exc, cls)) or type(exc).__name__ == "NoEligibleSpeakerError"


def _reason(groupchat: Any) -> str:
    method = getattr(groupchat, "speaker_selection_method", None)
    if callable(method):
        return str(getattr(method, "__name__", type(method).__name__))
    return str(method) if method is not None else "unknown"


class Selection:
    """One speaker selection in progress, as a selection that asks the model sees it (:func:`_promote`): the
    sync wrapper keeps these facts in its own locals (:func:`_current_selection` reads them off its frame), the
    async one in a ``Selection`` in a contextvar. ``promoted`` is the selection's mark: a list that the
    promotion fills, so that :func:`_ended` records nothing of a selection that became a span."""

    __slots__ = ("facts", "from_name", "groupchat", "promoted", "scope", "span")

    @property
    def attributes(self) -> dict[str, Any]:
        """The handoff's from / reason / candidates attributes (a new dict)."""
        facts = self.facts
        return {HANDOFF_FROM: self.from_name,  # the agent handing off: execution_events.agent_name
                HANDOFF_REASON: facts[2], HANDOFF_CANDIDATES: facts[3]}


def _ended(state: Any, scope: Scope | None, span: Any, from_name: str, facts: tuple[Any, ...], promoted: list[Any],
           result: Any, exc: BaseException | None) -> None:
    """Record a selection's outcome on the enclosing span ``span`` (nothing when it became a span: ``promoted``
    filled). One exit, so the sync wrapper can be generated with it written in (:func:`_selection_method`)."""
    if not promoted:
        try:
            room = None
            if scope is not None:
                room = scope.handoffs
                if room is None:
                    room = _event_room(span)
            if room and exc is None and result is not None:
                # nearly every selection: the event's attributes as one literal, in the order the general
                # path builds them (one dict of the right size, no insert growing it)
                static = state.agents.get(id(result))  # cached_name written out
                to = static.name if static is not None else agent_name(result)
                scope.handoffs = room - 1  # type: ignore[union-attr]
                run = scope.run  # type: ignore[union-attr]
                span.add_event(EVENT_NAME, {
                    HANDOFF_FROM: from_name, HANDOFF_REASON: facts[2], HANDOFF_CANDIDATES: facts[3], HANDOFF_TO: to,
                    SPAN_KIND: KIND_SPEAKER_SELECTION,
                    EXECUTION_ORDER: next(run._order) if _GIL else run.next_order(),
                    EVENT_DEPTH: scope.event_depth})  # type: ignore[union-attr]
            else:
                _outcome(state, scope, span, from_name, facts, room, result, exc)
        except Exception:
            logger.debug("cmbagent_otel: could not record a handoff", exc_info=True)


def _outcome(state: Any, scope: Scope | None, span: Any, from_name: str, facts: tuple[Any, ...], room: int | None,
             result: Any, exc: BaseException | None) -> None:
    """:func:`_ended`'s general path: a selection that failed, chose no one, or found its span's events full."""
    attrs = {HANDOFF_FROM: from_name, HANDOFF_REASON: facts[2], HANDOFF_CANDIDATES: facts[3]}
    if result is not None:
        static = state.agents.get(id(result))  # cached_name written out
        attrs[HANDOFF_TO] = static.name if static is not None else agent_name(result)
    if exc is not None:
        if ends_chat(exc, state.no_speaker_cls):
            attrs[semconv.HANDOFF_ENDS_CHAT] = True  # AG2 catches it and ends the chat normally
        else:
            attrs[semconv.ERROR_TYPE] = error_type(exc)
            attrs["exception.message"] = safe_text(exception_text(exc)) or ""
    if room:
        scope.handoffs = room - 1  # type: ignore[union-attr]
        attrs[SPAN_KIND] = KIND_SPEAKER_SELECTION
        run = scope.run  # type: ignore[union-attr]
        attrs[EXECUTION_ORDER] = next(run._order) if _GIL else run.next_order()
        attrs[EVENT_DEPTH] = scope.event_depth  # type: ignore[union-attr]
        span.add_event(EVENT_NAME, attrs)
    else:
        _as_span(state, scope, span, from_name, exc, attrs)


def _as_span(state: Any, scope: Scope | None, parent: Any, from_name: str, exc: BaseException | None,
             outcome: dict[str, Any]) -> None:
    """A zero-length ``select_speaker`` span under the enclosing span (its events are full)."""
    attrs, _ = compose(scope, KIND_SPEAKER_SELECTION, outcome, None, False, None, None)
    attrs.pop("exception.message", None)
    span = state.tracer.start_span(f"select_speaker {from_name}", context=trace.set_span_in_context(parent),
                                   kind=SpanKind.INTERNAL, attributes=attrs)
    try:
        if exc is not None and semconv.ERROR_TYPE in attrs:
            record_exception(span, exc)
    finally:
        span.end()


def _group_facts(state: Any, groupchat: Any, method: Any, agents: Any) -> tuple[Any, ...]:
    """(weak ref to the group chat, (id of its selection method, ids of its agents in order), the method's
    name, the agents' names), cached per group chat (:class:`Selection` reads the cache; this fills it):
    computed again only when its method or its agents change (one tuple compared). The agents by their
    ids, not the list's: a list changed in place (``groupchat.agents[i] = other``, ``remove`` then
    ``append``), or a new list given the id of a dropped one, kept its length and id, and every
    selection after named the agents that had left as candidates. Ids are only compared while their
    objects live: the entry goes when one of them is freed (see :func:`_remember_group`)."""
    facts = (None, (id(method), *map(id, agents)), _reason(groupchat), _candidates(state, agents))
    return _remember_group(state.candidates, groupchat, facts, (method, *agents))


def _candidates(state: Any, agents: Any) -> list[str]:
    """The agents' names for ``cmbagent.handoff.candidates``: at most :data:`MAX_CANDIDATES` names and
    the attribute bound's characters in all, then ``"... (N more)"`` for the ``N`` left out. Copied into
    every selection's event: a group chat of thousands of agents (or of long names) listed them all in
    each one."""
    bound = max_length()
    names: list[str] = []
    total = 0
    for agent in agents:
        name = cached_name(state.agents, agent)
        total += len(name)
        if len(names) == MAX_CANDIDATES or total > bound:
            break
        names.append(name)
    if len(names) < len(agents):
        names.append(f"... ({len(agents) - len(names)} more)")
    return names


_watch_tokens = itertools.count()
# values that refer to no other object: these types exactly (an instance of a subclass of int or bytes,
# which cannot be held weakly either, may carry attributes: the group chat itself)
_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})


def _remember_group(cache: dict[int, tuple[Any, ...]], groupchat: Any, facts: tuple[Any, ...],
                    watched: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """Keep a group chat's facts without keeping the group chat: it is held weakly and its method and
    agents by id. A strong entry kept every finished chat's group chat, agents and message histories
    alive: the agents refer to the manager, the manager to the group chat, so no entry holding the agents
    could ever go. The weak reference's callback removes the entry while the group chat is being dropped,
    before its id can be reused (as ``ag2._remember`` does for agents): the entry found under a live group
    chat's id is that group chat's. The objects whose ids the facts compare (``watched``: its method and
    agents) are held weakly too: one freed removes the entry, so an agent taking a freed one's id (and
    place in the list) is never named by the freed one's name. One that cannot be held weakly is held
    only when it refers to nothing (a method given as a plain string): its id is not reused while it is
    held. Any other (a callable object with ``__slots__`` and no ``__weakref__``, a callable instance of a
    subclass of ``int`` with attributes) may refer to the group chat,
    which the entry then kept alive with its agents and history: such a group's facts are not kept."""
    key = id(groupchat)
    token = next(_watch_tokens)

    def forget(_: Any, key: int = key, token: int = token) -> None:
        entry = cache.get(key)
        if entry is not None and entry[4][0] == token:  # not a newer entry of the same group chat
            cache.pop(key, None)

    guard: list[Any] = [token]
    try:
        facts = (weakref.ref(groupchat, lambda _, key=key: cache.pop(key, None)), *facts[1:4], guard)
        for item in watched:
            try:
                guard.append(weakref.ref(item, forget))
            except TypeError:
                if type(item) not in _ATOMS:
                    return facts
                guard.append(item)
    except TypeError:  # not weak-referenceable: computed each time
        return facts
    if len(cache) >= 64:
        cache.clear()  # group chats alive at once: a bound, not a cache policy
    cache[key] = facts
    return facts


def _event_room(span: Span) -> int:
    """How many handoff events a span takes before they become spans (its event limit less a margin)."""
    limits = getattr(span, "_limits", None)  # the SDK span's SpanLimits (None: unlimited)
    limit = getattr(limits, "max_events", DEFAULT_EVENT_LIMIT) if limits is not None else DEFAULT_EVENT_LIMIT
    return 2**31 if limit is None else max(limit - EVENT_MARGIN, 0)


def _begin(state: Any, groupchat: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[Scope | None, Any, str | None, tuple[Any, ...] | None]:
    """Where the selection about to run is recorded and what it records: ``(scope, span, from_name, facts)``,
    the scope of the enclosing span's children, that span (the manager's ``invoke_agent``, or an open plan
    step), the agent handing off and the group's facts (:func:`_group_facts`); ``span`` is ``None`` when
    nothing is to be recorded (suppressed, not sampled, or our own error: never the app's). One exit, so
    the sync wrapper can be generated with it written in (:func:`_selection_method`)."""
    try:
        ctx = get_current()
        # `in` first: the keys are nearly always absent, and a contains test costs less than .get()
        if (_SUPPRESS in ctx and ctx[_SUPPRESS]) or (_SUPPRESS_PLAIN in ctx and ctx[_SUPPRESS_PLAIN]):  # noqa: RUF019
            scope = span = from_name = facts = None
        else:
            scope = ctx.get(_SCOPE_KEY)
            if type(scope) is not Scope and scope is not None:  # None: not ours (an unsampled chat), no call
                scope = scope_in(scope)  # a span's children's scope not built yet
            span = None
            if scope is not None:
                span = scope.owner  # ours, even when another instrumentation's span is current inside it
                if scope.cursor is not None:
                    # a turn of a cmbagent control chat: it belongs to the open plan step (opening one announced)
                    frame = scope.cursor.resolve()
                    if frame is not None:
                        scope, span = frame.scope, frame.span
            if span is None:  # no span of ours owns the scope: the current span (read only then: one call less)
                span = ctx.get(SPAN_KEY) if SPAN_KEY is not None else trace.get_current_span(ctx)
            if span is None or not (span._end_time is None if type(span) is END_TIME_SPAN else span.is_recording()):
                span = from_name = facts = None  # unsampled: nothing to record it on
            else:
                # by position first: AG2 passes it so, and a call naming it twice fails in AG2 anyway
                last = args[0] if args else kwargs.get("last_speaker")
                if last is None:
                    from_name = "none"
                else:  # cached_name written out: this runs for every selection
                    static = state.agents.get(id(last))
                    from_name = static.name if static is not None else agent_name(last)
                # _group_facts' cache hit written out: this runs for every selection
                method = getattr(groupchat, "speaker_selection_method", None)
                agents = getattr(groupchat, "agents", None) or ()
                facts = state.candidates.get(id(groupchat))
                if facts is None or facts[1] != (id(method), *map(id, agents)):  # found by id: see _remember_group
                    facts = _group_facts(state, groupchat, method, agents)
    except Exception:
        scope = span = from_name = facts = None
        logger.debug("cmbagent_otel: could not follow a speaker selection", exc_info=True)
    return scope, span, from_name, facts


def _selection_method(state: Any, original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """The body of ``GroupChat.select_speaker``'s wrapper: made per patched method with ``state`` and
    ``original`` bound, :func:`_begin` and :func:`_ended` written in (:func:`selection_sync`), so a
    selection runs in one frame of ours and its facts stay in that frame's locals."""
    if not state.active:
        return original(self, *args, **kwargs)
    # no contextvar set and reset around the call (~1,500 instructions per selection): a selection that asks
    # the model finds this frame's locals on the stack (_current_selection)
    scope, span, from_name, facts = _begin(state, self, args, kwargs)
    if span is None:
        return original(self, *args, **kwargs)
    promoted: list[Any] = []  # filled when the selection asks the model: recorded as a span (_promote)
    try:
        result = original(self, *args, **kwargs)
    except BaseException as exc:
        _ended(state, scope, span, from_name, facts, promoted, None, exc)  # type: ignore[arg-type]
        raise
    _ended(state, scope, span, from_name, facts, promoted, result, None)  # type: ignore[arg-type]
    return result


_selection_maker: Callable[..., Callable[..., Any]] | None = None  # made by the first selection_sync()


def selection_sync(state: Any) -> Callable[..., Any]:
    """The wrapper of ``GroupChat.select_speaker``."""
    global _selection_maker
    if _selection_maker is None:  # generated once per process (two instrument()s at once: the same code)
        _selection_maker = specialiser(_selection_method, "select_speaker", ("state", "original"),
                                       constants=("_GIL", "SPAN_KEY"), inline=(_begin, _ended))
    maker = _selection_maker

    def method_for(original: Callable[..., Any]) -> Callable[..., Any]:
        """The plain function patched over ``original`` (see ``ag2._plain_method``), calling
        ``original(self, ...)``: no trampoline; wrapt proxies run the same body (``wrapt_wrapper``)."""
        patched = maker(state, original)
        _SYNC_SELECTION_CODES.add(patched.__code__)  # the same code object for every patched method
        return patched

    return wrapt_wrapper(method_for, state)


def selection_async(state: Any) -> Callable[..., Any]:
    """The wrapper of ``GroupChat.a_select_speaker``."""
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        if not state.active:
            return await wrapped(*args, **kwargs)
        scope, span, from_name, facts = _begin(state, instance, args, kwargs)
        if span is None:
            return await wrapped(*args, **kwargs)
        selection = Selection()  # for a selection that asks the model (_current_selection), in a contextvar
        selection.groupchat, selection.scope, selection.span = instance, scope, span
        selection.from_name, selection.facts, selection.promoted = from_name, facts, []
        token = _selection.set(selection)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _end(state, selection, token, None, exc)
            raise
        _end(state, selection, token, result, None)
        return result

    _ASYNC_SELECTION_CODES.add(wrapper.__code__)
    wrapper._cmbagent_otel = state  # type: ignore[attr-defined]
    return wrapper


def _end(state: Any, selection: Selection, token: Any, result: Any, exc: BaseException | None) -> None:
    try:
        _selection.reset(token)
    except Exception:  # a token of another context (a generator resumed elsewhere): not the app's problem
        logger.debug("cmbagent_otel: could not reset the speaker selection", exc_info=True)
    _ended(state, selection.scope, selection.span, selection.from_name, selection.facts, selection.promoted,
           result, exc)


# AG2 asks the model through a two-agent chat of its own (checking_agent, speaker_selection_agent): its
# turns are the selection's events, never sub-agent nodes of the DAG (as AG2's tool runner is not)
_INSIDE_SELECTION = {"agent_depth": 1}


class _SelectionSpan(TracedSpan):
    """The span of a selection that asks the model; NoEligibleSpeakerError is no failure."""

    __slots__ = ("_no_speaker_cls",)

    def __init__(self, selection: Selection, state: Any) -> None:
        super().__init__(f"select_speaker {selection.from_name}", KIND_SPEAKER_SELECTION,
                         selection.attributes, scope_changes=_INSIDE_SELECTION, tracer=state.tracer)
        self._no_speaker_cls = state.no_speaker_cls

    def _exception(self, exc: BaseException) -> None:
        if ends_chat(exc, self._no_speaker_cls):
            self.set(semconv.HANDOFF_ENDS_CHAT, True)
            return
        super()._exception(exc)


# selection_sync's wrapper body: the generated one's, and _selection_method's own (a copy that could not be
# generated calls it)
_SYNC_SELECTION_CODES: set[types.CodeType] = {_selection_method.__code__}
_ASYNC_SELECTION_CODES: set[types.CodeType] = set()  # selection_async's
_SELECTION_DEPTH = 32  # frames searched above a model-asking selection for the selection wrapper's


def _current_selection() -> Selection | None:
    """The innermost selection in progress on this call stack: the one selection_sync's wrapper keeps in its
    locals (it calls AG2's selection, which calls ``_auto_select_speaker`` on this thread, the frames in
    between AG2's), else the async wrapper's (its contextvar). Read off the frame only here: a selection
    that asks the model is rare, and its model call costs far more."""
    frame = sys._getframe(1)
    for _ in range(_SELECTION_DEPTH):
        if frame is None:
            break
        code = frame.f_code
        if code in _SYNC_SELECTION_CODES:
            found = frame.f_locals
            if found.get("promoted") is None or found.get("span") is None:
                return None  # not recorded (suppressed, unsampled), or not begun
            selection = Selection()
            selection.groupchat, selection.scope, selection.span = found.get("self"), found["scope"], found["span"]
            selection.from_name, selection.facts = found["from_name"], found["facts"]
            selection.promoted = found["promoted"]
            return selection
        if code in _ASYNC_SELECTION_CODES:
            break  # an async selection nearer: its contextvar
        frame = frame.f_back
    return _selection.get()


def _promote(state: Any, instance: Any) -> _SelectionSpan | None:
    selection = _current_selection()
    if selection is None or selection.groupchat is not instance:
        return None  # not inside a selection we follow (unsampled, suppressed, called directly)
    selection.promoted.append(True)
    return _SelectionSpan(selection, state)


def auto_sync(state: Any) -> Callable[..., Any]:
    """The wrapper of ``GroupChat._auto_select_speaker``: the selection asks the model."""
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        traced = None
        if state.active:
            try:
                traced = _promote(state, instance)
            except Exception:
                logger.debug("cmbagent_otel: could not open a speaker selection span", exc_info=True)
        if traced is None:
            return wrapped(*args, **kwargs)
        with traced:
            result = wrapped(*args, **kwargs)
            if result is not None:
                traced.set(HANDOFF_TO, agent_name(result))
            return result

    wrapper._cmbagent_otel = state  # type: ignore[attr-defined]
    return wrapper


def auto_async(state: Any) -> Callable[..., Any]:
    """The wrapper of ``GroupChat.a_auto_select_speaker``."""
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        traced = None
        if state.active:
            try:
                traced = _promote(state, instance)
            except Exception:
                logger.debug("cmbagent_otel: could not open a speaker selection span", exc_info=True)
        if traced is None:
            return await wrapped(*args, **kwargs)
        with traced:
            result = await wrapped(*args, **kwargs)
            if result is not None:
                traced.set(HANDOFF_TO, agent_name(result))
            return result

    wrapper._cmbagent_otel = state  # type: ignore[attr-defined]
    return wrapper
