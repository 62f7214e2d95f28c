"""Workflow API: ``workflow`` > ``phase`` > ``step`` > ``redo``.

Each is a context manager (``with`` / ``async with``) and a decorator (sync, async,
generator and async-generator functions; every call opens a fresh span, and a generator's
span stays open until its iteration ends, current only while the generator's own code
runs; above ``@classmethod``/``@staticmethod`` it wraps the function inside). A block object may
be entered again while open, and from several threads or tasks at once: each entry is its own
span. Blocks left out of order end their spans when left; the context from before the first
comes back when the last is left. Nesting is checked when the block is entered:

* ``phase`` outside a ``workflow``, ``step`` outside a ``phase``, ``redo`` outside the
  ``step`` it redoes raise :class:`WorkflowNestingError` before the block runs;
* ``redo`` with ``attempt`` above the workflow's ``max_redos`` raises
  :class:`RedoLimitExceeded`;
* a ``workflow`` opened inside another workflow joins it (no second run, no new span),
  which is how nested cmbagent instances stay in the parent's trace; inside one that has
  already ended (a context that outlived its block) it starts a run of its own, with a warning.

An exception inside a block marks that span and every enclosing one failed and propagates
unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from . import semconv
from ._context import _SCOPE_KEY, RunState, Scope, current_scope, detach
from ._forksafe import reset_in_child
from ._spans import (
    CHILD_ORDER_BASE,
    NodeSpec,
    TracedSpan,
    _LateTracer,
    effective_parent,
    end_interrupted,
    record_exception,
    retake_node,
    workflow_tracers,
)
from .redaction import REDACTED, is_secret_key, redact_id, safe_text, truncate

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("cmbagent_otel")

PLANNING_PHASES = frozenset({"planning", "hitl_planning"})


def is_planning_phase(name: str) -> bool:
    """Planning phases: DAG node type ``planning``, order 0, a ``plan`` operation."""
    return name in PLANNING_PHASES or name.endswith("planning")


def _text(value: Any) -> str | None:
    """``value`` as plain text for a span, never raising: ``None`` stays ``None``; an object
    whose ``str()`` raises becomes ``<unprintable TYPE>``. A ``str`` (or ``int``) subclass
    becomes the plain value, so its own methods are never called again."""
    if value is None or type(value) is str:
        return value
    try:
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return int.__repr__(value)
        return str(value)
    except Exception:
        logger.debug("cmbagent_otel: str() of a workflow argument raised", exc_info=True)
        try:
            return f"<unprintable {type(value).__qualname__}>"
        except Exception:
            return "<unprintable>"


def _clean(value: Any) -> str | None:
    """:func:`_text`, redacted and cut to the attribute bound: what the caller passes (a task,
    a goal, an agent name) is the application's text, and may quote a key or be megabytes."""
    return safe_text(_text(value))


def _id(value: Any) -> str | None:
    """:func:`_text` of an id the caller passes (a session's, a task's), kept as it is unless it
    holds a secret (then redacted and bounded, as a model server's ids are): ids key the rows and
    are compared with the caller's own, so they are not cut like text."""
    text = _text(value)
    return None if text is None else redact_id(text)


def _plain_value(value: Any) -> Any:
    # str/int subclasses become their plain value (their own methods may raise later);
    # other types go to the SDK, which drops what it cannot store
    if type(value) in (str, int, bool, float) or not isinstance(value, (str, int)) or isinstance(value, bool):
        return value
    return str.__str__(value) if isinstance(value, str) else int.__int__(value)


def _attributes(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A plain copy of user ``attributes`` (None when the mapping cannot be read)."""
    if not value:
        return None
    try:
        out: dict[str, Any] = {}
        for k, v in dict(value).items():
            key = _text(k) or ""
            plain = _plain_value(v)
            if is_secret_key(key):
                out[key] = REDACTED
                continue
            out[_clean(key) or ""] = _clean(plain) if isinstance(plain, str) else plain  # a key may quote a key
        return out
    except Exception:
        logger.debug("cmbagent_otel: workflow attributes could not be read", exc_info=True)
        return None


def _plain_int(value: Any) -> int:
    return int.__int__(value)  # an int subclass's own __int__/__format__ may raise


class WorkflowNestingError(ValueError):
    """A phase, step or redo was opened where the workflow hierarchy does not allow it."""


class RedoLimitExceeded(WorkflowNestingError):
    """A redo attempt number is above the workflow's ``max_redos``."""


def is_clean_exit(exc: BaseException | None) -> bool:
    """Whether ``exc`` ends a block the way a return does: ``SystemExit`` with exit code 0 or ``None``
    (``sys.exit()``, ``sys.exit(0)``), the process's success status. Any other exit code (an int other
    than 0, or a message, which Python exits with 1) and any other ``BaseException`` (``KeyboardInterrupt``)
    is a failure. The OpenTelemetry API's ``use_span`` (``start_as_current_span``) records no
    ``BaseException`` that is not an ``Exception`` at all (not even ``SystemExit(1)``), the SDK's
    ``Span.__exit__`` records every one of them: we follow the exit code, as a run's status is what the
    cmbagent UI shows as success or failure."""
    if not isinstance(exc, SystemExit):
        return False
    try:  # never raises: it runs while the application's exception propagates, which it must not replace
        code = exc.code  # a subclass's property may raise
        # as the interpreter reads it: an int subclass by its value (its own __eq__ may raise), not its methods
        return code is None or (issubclass(type(code), int) and int.__int__(code) == 0)
    except Exception:
        logger.debug("cmbagent_otel: could not read a SystemExit's code", exc_info=True)
        return False


class _Entry:
    """One entry into a block: its span (``None`` for a workflow that joined an enclosing run)."""

    __slots__ = ("block", "restated", "restore", "traced")

    def __init__(self, block: _Block, traced: TracedSpan | None) -> None:
        self.block = block
        self.traced = traced
        # the context token of an entry made before this one but left while this one was open (left
        # out of order): resetting it when this entry is left gives back the context from before it
        self.restore: Any = None
        # (error, stop): an error raised inside the block that restates a stop (see restated_stop); the block
        # left by that very error, or normally, ends with the stop
        self.restated: tuple[BaseException, BaseException] | None = None


# The blocks entered in the current context, innermost last: each entry of a block object
# (nested, in another thread, in another asyncio task) is its own span, and the handle API
# acts on the entry of the context it is called from.
_ENTRIES: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar("cmbagent_otel_blocks", default=())
_open_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_open_lock")  # a forked child must not find it held


class _Block:
    """Shared machinery: context manager (sync/async) and decorator (sync, async, generator and
    async-generator functions).

    A block object may be entered again while open, and from several threads or tasks at
    once: every entry opens its own span. ``set_attribute``/``fail`` act on the innermost
    entry of the calling context (in a function the block decorates: that call's entry), else
    (a thread the blocks' context did not follow) on the most recent entry still open in the run
    of the calling context's span (any, when it holds none), else on the span an integration
    attached (``_traced``).
    """

    _traced: TracedSpan | None
    _open_entries: list[_Entry]
    # the block a decorator's per-call copy was made from: the handle API of that block (called inside the
    # decorated function) acts on the copy's entry, and the copy's entries are listed on it
    _origin: _Block | None = None

    def _open(self, scope: Scope | None = None, taken: list[int] | None = None) -> TracedSpan | None:
        """Check the nesting at ``scope`` (default: where new work stands now) and describe the span.
        ``taken``: where a phase puts the index it takes (see :meth:`_taken_interrupted`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _taken_interrupted(self, taken: list[int], exc: BaseException) -> None:
        """Hook: ``exc`` (not an ``Exception``) came out of :meth:`_open` after it put ``taken`` there."""

    def _entered(self, traced: TracedSpan | None) -> None:
        """Hook: an entry opened ``traced`` (``None``: nothing was opened)."""

    def __enter__(self) -> _Block:
        taken: list[int] = []
        try:
            traced = self._open(None, taken)
        except BaseException as exc:  # Ctrl-C inside _open (or as it returned) after it took a number
            if taken and not isinstance(exc, Exception):
                self._taken_interrupted(taken, exc)
            raise
        context = traced._ctx if traced is not None else None  # (start() takes it: see _start_interrupted)
        try:
            self._entered(traced)
            if traced is not None:
                traced.__enter__()
        except BaseException as exc:  # Ctrl-C before the span started (start() ends one it started itself)
            if traced is not None and traced.span is trace.INVALID_SPAN:
                self._start_interrupted(traced, context, exc)
            raise
        try:
            entry = _Entry(self, traced)
            _ENTRIES.set((*_ENTRIES.get(), entry))
            with _open_lock:
                (self._origin or self).__dict__.setdefault("_open_entries", []).append(entry)
        except BaseException as exc:  # Ctrl-C before the with statement took the block over
            if traced is not None:
                if any(e.traced is traced for e in _ENTRIES.get()):
                    self.__exit__(type(exc), exc, exc.__traceback__)  # registered: left as a with would
                else:
                    end_interrupted(traced, exc)
                    self._left(traced)
            raise
        return self

    def _start_interrupted(self, traced: TracedSpan, context: otel_context.Context | None,
                           exc: BaseException) -> None:
        """Start and end ``traced`` for ``exc``, raised after :meth:`_open` described it and before its span
        started: what ``_open`` took (a phase's index, a one_shot's ``execute`` node id, the trace's first
        run) belongs to a block that is recorded, failed, rather than to none (the next phase was
        numbered 2, the next one_shot ``execute_2``); so does the node id an interrupted start took
        (the phase's node was ``a_2``, a step's ``step_1_2``)."""
        try:
            traced._ctx = context
            retake_node(traced)
            traced.__enter__()
        except Exception:
            return
        end_interrupted(traced, exc)
        self._left(traced)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = None
        later: tuple[_Entry, ...] = ()
        stack = _ENTRIES.get()
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].block is self:
                entry = stack[index]
                later = stack[index + 1:]
                _ENTRIES.set(stack[:index] + later)
                break
        with _open_lock:
            entries = (self._origin or self).__dict__.get("_open_entries") or []
            if entry is None:  # exited in a context the entry was not made in
                # the entry of the caller's run; else (left from another run's context) the latest: a block
                # left must end its span
                entry = _of_this_run([e for e in entries if e.block is self], or_latest=True)
            if entry in entries:
                entries.remove(entry)
        if entry is None:
            return
        traced = entry.traced
        if later:
            # left before blocks entered after it (out of order): its span ends now, but resetting its
            # context now would let theirs, when they are left, bring back this ended span for good;
            # the next block out takes over the reset (the earliest one wins: it undoes them all)
            later[0].restore = entry.restore or (traced._token if traced is not None else None)
            entry.restore = None
            if traced is not None:
                traced._token = None
        try:
            if traced is not None:
                if exc is not None and is_clean_exit(exc):
                    exc_type, exc, tb = None, None, None
                restated, entry.restated = entry.restated, None
                # left normally: the application caught the restating error inside; the stop still happened
                if restated is not None and (exc is None or restated[0] is exc):
                    exc_type, exc, tb = _ending_with_stop(traced, restated[0], restated[1])
                try:
                    traced.__exit__(exc_type, exc, tb)
                finally:  # a Ctrl-C out of the span's end (a span processor's on_end) ends the run too
                    self._left(traced)
        finally:
            if entry.restore is not None:
                token, entry.restore = entry.restore, None
                try:
                    detach(token)
                except Exception:
                    logger.debug("cmbagent_otel: could not restore the context of a block left out of order",
                                 exc_info=True)

    def _left(self, traced: TracedSpan) -> None:
        """Hook: an entry's span ``traced`` has ended."""

    async def __aenter__(self) -> _Block:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _copy(self) -> _Block:  # pragma: no cover - abstract
        raise NotImplementedError

    def _for_call(self) -> _Block:
        """The block one call of a function it decorates enters: a copy, whose handle is this block."""
        copy = self._copy()
        copy._origin = self._origin or self
        return copy

    def __call__(self, func: F) -> F:
        if isinstance(func, (classmethod, staticmethod)):
            # written above @classmethod/@staticmethod: wrap the function inside, as the method binds
            return type(func)(self(func.__func__))  # type: ignore[return-value]
        shape = _shape_of(func)
        if inspect.isasyncgenfunction(shape):
            return _wrap_async_generator(self, func)  # type: ignore[return-value]
        if inspect.isgeneratorfunction(shape):
            return _wrap_generator(self, func)  # type: ignore[return-value]
        if inspect.iscoroutinefunction(shape):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with self._for_call():
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._for_call():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    # --- handle API, usable inside the block -------------------------------------------
    def _current(self) -> TracedSpan | None:
        for entry in reversed(_ENTRIES.get()):
            if entry.block is self or entry.block._origin is self:
                return entry.traced
        with _open_lock:
            entries = list(self.__dict__.get("_open_entries") or ())
        if entries:
            # a thread the block's context did not follow (a pool worker, a thread of its own): the entry
            # of the run this context is in; the latest entry may be another run's (one block object
            # used by concurrent runs), and acting on it put one run's summary or failure on another's
            entry = _of_this_run(entries)
            return entry.traced if entry is not None else self._traced
        return self._traced

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute on this block's span (no-op outside the block), redacted and bounded
        as ``attributes=`` are (a secret-named key keeps its key and loses its value)."""
        traced = self._current()
        if traced is not None:
            for name, clean in (_attributes({key: value}) or {}).items():
                traced.set(name, clean)

    def fail(self, description: str) -> None:
        """Mark this block failed without raising (e.g. a step judged unsuccessful)."""
        traced = self._current()
        if traced is not None:
            traced.fail(description)


def restated_stop(error: BaseException, stop: BaseException) -> None:
    """``error``, raised in the current context, restates ``stop`` (the user's cancel): MARS's executor raising
    its own ``RuntimeError("Phase control failed: Workflow cancelled by user")`` after its phase failed with
    the cancel. Each block open here that ``error`` leaves then ends with ``stop`` (its status, ``error.type``,
    the DAG's ``cancelled``), ``error`` one more exception event of its span; so does a block left normally (the
    application caught ``error`` inside it: the cancel happened all the same, and cmbagent's cancel endpoint marks
    the run cancelled whatever the application does next). A block left by another exception (the application
    caught ``error`` and raised its own) ends with that exception, as before. Never raises."""
    try:
        for entry in _ENTRIES.get():
            if entry.traced is not None:
                entry.restated = (error, stop)  # dropped when the block is left: held no longer than the run
    except Exception:
        logger.debug("cmbagent_otel: could not mark a restated stop", exc_info=True)


def _ending_with_stop(traced: TracedSpan, error: BaseException,
                      stop: BaseException) -> tuple[type[BaseException], BaseException, TracebackType | None]:
    """What a block left by ``error``, which restates ``stop``, ends with: ``stop``; ``error`` recorded first."""
    try:
        if traced.span.is_recording():
            record_exception(traced.span, error)
    except Exception:
        logger.debug("cmbagent_otel: could not record the restating error", exc_info=True)
    return type(stop), stop, stop.__traceback__


def _of_this_run(entries: list[_Entry], or_latest: bool = False) -> _Entry | None:
    """The latest of ``entries`` whose span is in the trace of the current context's span; the latest of
    all when the context holds no span (a thread no context followed), or when none is in its run and
    ``or_latest``; else ``None``."""
    if not entries:
        return None
    try:
        current = trace.get_current_span().get_span_context()
        if not current.is_valid:
            return entries[-1]
        for entry in reversed(entries):
            traced = entry.traced
            if traced is not None and traced.span.get_span_context().trace_id == current.trace_id:
                return entry
        return entries[-1] if or_latest else None
    except Exception:
        logger.debug("cmbagent_otel: could not match a block's entry to the current run", exc_info=True)
        return entries[-1]


def _shape_of(func: Any) -> Any:
    """What tells whether calling ``func`` runs a coroutine or a generator: ``func`` itself, or for a
    callable object (not a function, method or partial) its ``__call__`` (an ``async def __call__``
    was wrapped as a plain function: the block ended before the coroutine ran)."""
    if inspect.isroutine(func) or isinstance(func, functools.partial):
        return func
    try:
        call = getattr(func, "__call__", None)  # noqa: B004 - the method itself: its kind is wanted
        return call if inspect.ismethod(call) else func
    except Exception:
        return func


class _Suspended:
    """A block opened for a generator: its span stays open while the generator is suspended,
    but is current only while the generator's own code runs (between two ``next``), so the
    caller's work between iterations is never parented under it."""

    __slots__ = ("_block", "_context", "_otel")

    def __init__(self, block: _Block) -> None:
        self._block = block
        self._context = contextvars.copy_context()
        self._context.run(block.__enter__)  # nesting errors propagate to the first next()
        self._otel = self._context.run(otel_context.get_current)

    def resume(self) -> object:
        """Make the block's span current; pass the result to :meth:`pause`."""
        try:
            return otel_context.attach(self._otel)
        except Exception:
            logger.debug("cmbagent_otel: could not attach the generator's context", exc_info=True)
            return None

    @staticmethod
    def pause(token: object) -> None:
        if token is not None:
            try:
                otel_context.detach(token)  # type: ignore[arg-type]
            except Exception:
                logger.debug("cmbagent_otel: could not detach the generator's context", exc_info=True)

    def close(self, exc: BaseException | None = None) -> None:
        self._context.run(self._block.__exit__, type(exc) if exc is not None else None, exc,
                          exc.__traceback__ if exc is not None else None)


def _wrap_generator(block: _Block, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        span = _Suspended(block._for_call())
        failure: BaseException | None = None
        try:
            gen = func(*args, **kwargs)
            sent: Any = None
            thrown: BaseException | None = None
            while True:
                token = span.resume()
                try:
                    value = gen.send(sent) if thrown is None else gen.throw(thrown)
                except StopIteration as stop:
                    return stop.value
                finally:
                    span.pause(token)
                thrown = None
                try:
                    sent = yield value
                except GeneratorExit:
                    token = span.resume()
                    try:
                        gen.close()
                    finally:
                        span.pause(token)
                    raise
                except BaseException as exc:  # thrown in by the caller: the generator handles it or fails
                    thrown = exc
        except GeneratorExit:
            raise  # closed early (a `break` in the caller's loop): not a failure
        except BaseException as exc:
            failure = exc
            raise
        finally:
            span.close(failure)

    return wrapper


def _wrap_async_generator(block: _Block, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        span = _Suspended(block._for_call())
        failure: BaseException | None = None
        try:
            agen = func(*args, **kwargs)
            sent: Any = None
            thrown: BaseException | None = None
            while True:
                token = span.resume()
                try:
                    value = await (agen.asend(sent) if thrown is None else agen.athrow(thrown))
                except StopAsyncIteration:
                    return
                finally:
                    span.pause(token)
                thrown = None
                try:
                    sent = yield value
                except GeneratorExit:
                    token = span.resume()
                    try:
                        await agen.aclose()
                    finally:
                        span.pause(token)
                    raise
                except BaseException as exc:
                    thrown = exc
        except GeneratorExit:
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            span.close(failure)

    return wrapper


class workflow(_Block):
    """One run: the root span of a trace, stored as one ``workflow_runs`` row.

    ``mode`` uses cmbagent's mode strings (``planning-control``, ``one-shot``, ...).
    ``session_id`` defaults to ``default_session``. ``max_redos`` bounds ``redo``
    attempts (``None``: unbounded). ``agent``/``model`` fill the run's columns of the same
    name; ``work_dir`` and ``task_id`` are kept in the run's meta.
    """

    def __init__(
        self,
        name: str = "workflow",
        *,
        mode: str = "one-shot",
        session_id: str | None = None,
        task: str | None = None,
        agent: str | None = None,
        model: str | None = None,
        work_dir: str | None = None,
        task_id: str | None = None,
        max_redos: int | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self._args = dict(
            name=name, mode=mode, session_id=session_id, task=task, agent=agent, model=model,
            work_dir=work_dir, task_id=task_id, max_redos=max_redos, attributes=attributes,
        )
        self.name = _clean(name) or "workflow"
        self.mode = _clean(mode) or "one-shot"
        self.session_id = _id(session_id) or semconv.DEFAULT_SESSION_ID
        self.task = _clean(task)
        self.agent = _clean(agent)
        self.model = _clean(model)
        self.work_dir = _clean(work_dir)
        self.task_id = _id(task_id)
        # a max_redos that is not an int cannot bound anything: unbounded, as with None
        self.max_redos = (_plain_int(max_redos)
                          if isinstance(max_redos, int) and not isinstance(max_redos, bool) else None)
        self.attributes = _attributes(attributes)
        self._traced = None
        self._joined = False

    def _copy(self) -> workflow:
        return workflow(**self._args)  # type: ignore[arg-type]

    def _entered(self, traced: TracedSpan | None) -> None:
        self._joined = traced is None

    @property
    def joined(self) -> bool:
        """Whether this block (its innermost entry in the calling context, else its last one)
        joined an enclosing run instead of starting one."""
        for entry in reversed(_ENTRIES.get()):
            if entry.block is self or entry.block._origin is self:
                return entry.traced is None
        return self._joined

    def _left(self, traced: TracedSpan) -> None:
        scope = traced.scope
        if scope is not None:
            scope.run.ended = True

    def _open(self, scope: Scope | None = None, taken: list[int] | None = None) -> TracedSpan | None:
        parent = scope or current_scope()
        context = link = None
        if parent is not None and parent.in_workflow:
            if scope is not None or not parent.run.ended:
                return None
            context = _outside_ended_run(parent.run, self.name)
        elif scope is None:
            context, link = _trace_of_its_own(parent, taken)
        return self._described(context, link)

    def _taken_interrupted(self, taken: list[int], exc: BaseException) -> None:
        """:meth:`_open` registered this run as the first of its trace (:func:`_trace_of_its_own`) and ``exc`` came
        before its span started: the run is recorded there, failed, as one interrupted as its span started is
        (before, it was in no span, and the next run in that trace was put into a trace of its own). Never
        raises."""
        try:
            traced = self._described(None, None)
        except Exception:
            logger.debug("cmbagent_otel: could not record a run interrupted as it opened", exc_info=True)
            return
        self._start_interrupted(traced, traced._ctx, exc)

    def _described(self, context: otel_context.Context | None, link: Any) -> TracedSpan:
        """The run's span, started in ``context`` (``None``: the current one), linked to ``link`` (or not)."""
        attrs: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_INVOKE_WORKFLOW,
            semconv.GEN_AI_WORKFLOW_NAME: self.name,
            semconv.WORKFLOW_NAME: self.name,
            semconv.WORKFLOW_MODE: self.mode,
        }
        for key, value in (
            (semconv.WORKFLOW_TASK, truncate(self.task)),
            (semconv.WORKFLOW_AGENT, self.agent),
            (semconv.WORKFLOW_MODEL, self.model),
            (semconv.WORKFLOW_WORK_DIR, self.work_dir),
            (semconv.WORKFLOW_TASK_ID, self.task_id),
        ):
            if value is not None:
                attrs[key] = value
        if self.attributes:
            attrs.update(self.attributes)
        tracer = workflow_tracers.current()
        if type(tracer) is _LateTracer:
            tracer = None  # no provider yet: each block takes the one there is when it opens
        run = RunState(session_id=self.session_id, max_redos=self.max_redos, name=self.name, tracer=tracer)
        if link is not None:
            return _LinkedRunSpan(link, f"workflow {self.name}", semconv.KIND_WORKFLOW, attrs, run=run,
                                  context=context, tracer=tracer)
        return TracedSpan(f"workflow {self.name}", semconv.KIND_WORKFLOW, attrs, run=run, context=context,
                          tracer=tracer)


class _LinkedRunSpan(TracedSpan):
    """A run's span started in a trace of its own (see :func:`_trace_of_its_own`), linked to the span it was
    opened in, so a trace UI leads from there to the run."""

    __slots__ = ("_link",)

    def __init__(self, link: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._link = link

    def __enter__(self) -> TracedSpan:
        super().__enter__()
        try:
            self.span.add_link(self._link)
        except Exception:  # an API span without add_link (opentelemetry-api < 1.23)
            pass
        except BaseException as exc:  # Ctrl-C before the block took the span over: see end_interrupted
            end_interrupted(self, exc)
            raise
        return self


# The traces of other instrumentations' (or the application's own) spans that a run of ours has started in,
# least recently used first, bounded: the run id is the trace id, so a later run opened in such a trace starts
# its own. Each run opened in one counts as a use: a trace forgotten (and joined again by its next run) is one
# in which no run was opened during 65,536 other traces' first runs, not one merely older than them (a
# long-lived span of a service's opening a run a minute was forgotten after 65,536 others' runs all the same)
_RUN_TRACES: OrderedDict[int, None] = OrderedDict()
_RUN_TRACES_MAX = 65_536
_run_traces_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_run_traces_lock")  # a forked child must not find it held


def _trace_of_its_own(parent: Scope | None, taken: list[int] | None = None) -> tuple[otel_context.Context | None, Any]:
    """Where a run opened outside any run of ours starts: ``(None, None)``, the current context, for the first
    run in the trace of the span current here (another instrumentation's, a web request's, the application's
    own: it stays inside that span, as before); a context without that span, and the span's context to link
    to, for a later run in the same trace (two entry calls in one request, two threads of one application
    span) or a run opened inside a plain AG2 program's run (``parent``, an implicit run: its trace is that
    run): they shared the trace, and so the run id, with the run before and were stored as one run (nodes
    overwritten, execution orders repeated). An unsampled span is kept as the parent (nothing is recorded
    under it: no run to mix with). ``taken``: gets an item when the trace is registered for this run (its first:
    see ``workflow._taken_interrupted``). Never raises."""
    try:
        span_context = trace.get_current_span().get_span_context()
        if not span_context.is_valid or not span_context.trace_flags.sampled:
            return None, None
        if parent is None:
            with _run_traces_lock:
                if span_context.trace_id in _RUN_TRACES:
                    _RUN_TRACES.move_to_end(span_context.trace_id)
                else:
                    _RUN_TRACES[span_context.trace_id] = None
                    if taken is not None:
                        taken.append(1)  # no signal-handler point between the store and this C call
                    if len(_RUN_TRACES) > _RUN_TRACES_MAX:
                        _RUN_TRACES.popitem(last=False)
                    return None, None
        context = trace.set_span_in_context(trace.INVALID_SPAN, otel_context.get_current())
        return otel_context.set_value(_SCOPE_KEY, None, context), span_context
    except Exception:
        logger.debug("cmbagent_otel: could not check the trace a run starts in", exc_info=True)
        return None, None


def _outside_ended_run(ended: RunState, name: str) -> otel_context.Context:
    """The current context without the span and scope of the ended run ``ended`` (a new run's start),
    saying so once per ended run: that context outlived its workflow block (the block was left in
    another thread or task, or the context was copied inside it), and a run opened there must not
    vanish into the ended one."""
    if not ended.warned:
        ended.warned = True
        logger.warning("cmbagent_otel: workflow(%r) opened in a context that still holds the workflow %r, "
                       "which has already ended (its block was left in another thread or task, or this "
                       "context was copied inside it); it starts a run of its own", name, ended.name)
    context = trace.set_span_in_context(trace.INVALID_SPAN, otel_context.get_current())
    return otel_context.set_value(_SCOPE_KEY, None, context)


def _require(scope: Scope | None, what: str, inside: str) -> Scope:
    if scope is None or not scope.in_workflow:
        raise WorkflowNestingError(f"{what} must be opened inside {inside}; no workflow is active")
    return scope


ONE_SHOT_PHASE = "one_shot"
EXECUTE_NODE = "execute"


class phase(_Block):
    """A phase of a workflow (``planning``, ``control``, ``hitl_control``, ``one_shot``...).

    Becomes a DAG node whose short id is the phase name (``control_2`` when a name repeats
    in the run). Planning phases get node type ``planning``, order index 0 and
    ``gen_ai.operation.name=plan``; other phases get node type ``control`` and order index
    ``1000 + <1-based position of the phase in the run>`` (never a step number). A ``one_shot``
    phase is an ``execute`` node of type ``agent`` (its agent turns are its sub-agent nodes): the
    first of the run is cmbagent's fixed-pipeline ``execute`` (order index 1, between the derived
    ``init`` and ``terminator`` nodes), a repeated one ``execute_2``, ``execute_3``... (order index
    ``1000 + <position>``, e.g. get_keywords' solve per UNESCO level).
    ``agent``: the agent that runs the phase (for a planning phase, the planner: the
    ``plan`` span's ``gen_ai.agent.name``).
    """

    def __init__(self, name: str, *, agent: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        if not isinstance(name, str) or not str.__len__(name):
            raise ValueError("phase name must be a non-empty string")
        self.name: str = _clean(name) or "phase"
        self.agent = _clean(agent)
        self.attributes = _attributes(attributes)
        self._traced = None

    def _copy(self) -> phase:
        return phase(self.name, agent=self.agent, attributes=self.attributes)

    def _open(self, scope: Scope | None = None, taken: list[int] | None = None) -> TracedSpan:
        scope = _require(scope or current_scope(), f"phase({self.name!r})", "a workflow")
        if scope.phase is not None:
            raise WorkflowNestingError(
                f"phase({self.name!r}) opened inside phase({scope.phase!r}); phases do not nest"
            )
        if taken is None:
            taken = []
        scope.run.take_phase_index(taken)
        return self._described(scope, taken)

    def _taken_interrupted(self, taken: list[int], exc: BaseException) -> None:
        """The phase took index ``taken[0]`` (and the number after it, see :meth:`_described`) and ``exc``
        came before its span started: the phase is recorded under them, failed, as one interrupted before
        its span started (the next phase numbered 2 and no span of this one, before; the retry's description
        took a planning phase's or one_shot's number again: order 1001 for cmbagent's planning, ``execute_2``
        for the first one_shot). Never raises."""
        try:
            scope = current_scope()  # where _open read it: the same context, nothing entered since
            if scope is None:
                return
            traced = self._described(scope, taken)
        except Exception:
            logger.debug("cmbagent_otel: could not record a phase interrupted as it opened", exc_info=True)
            return
        self._start_interrupted(traced, traced._ctx, exc)

    def _described(self, scope: Scope, taken: list[int]) -> TracedSpan:
        """The span of this phase, the run's ``taken[0]``-th. A planning phase's planning number, or a one_shot's
        ``execute`` number, is taken into ``taken`` after the index (``RunState.take``: kept through a Ctrl-C as
        it is taken), once: the description of an interrupted open again (:meth:`_taken_interrupted`) reuses it."""
        index = taken[0]
        planning = is_planning_phase(self.name)
        attrs: dict[str, Any] = {semconv.PHASE: self.name, semconv.PHASE_INDEX: index}
        if planning:
            attrs[semconv.GEN_AI_OPERATION_NAME] = semconv.OP_PLAN
        if self.agent:
            attrs[semconv.GEN_AI_AGENT_NAME] = self.agent
        if self.attributes:
            attrs.update(self.attributes)
        if planning:
            # the run's first planning phase is cmbagent's own at order 0; another (of any name: a second joined
            # planning_and_control's planning_2, ...) at a non-step order of its own, as a repeated execute
            if len(taken) < 2:
                scope.run.take_planning_index(taken)
            order = 0 if taken[1] == 1 else CHILD_ORDER_BASE + index
            node = NodeSpec(self.name, semconv.NODE_PLANNING, order_index=order, kept=True)
        elif self.name == ONE_SHOT_PHASE:
            # every one_shot solve is an execute node (its agent turns become its sub-agent nodes); the
            # first is cmbagent's own at order 1, a repeated one (execute_2, ...) at a non-step order
            if len(taken) < 2:
                scope.run.take(EXECUTE_NODE, taken)  # the counter unique_node_id(EXECUTE_NODE) reads
            node_id = RunState.numbered_id(EXECUTE_NODE, taken[1])
            order = 1 if node_id == EXECUTE_NODE else CHILD_ORDER_BASE + index
            node = NodeSpec(node_id, semconv.NODE_AGENT, order_index=order, unique=False, kept=True)
        else:
            node = NodeSpec(self.name, semconv.NODE_CONTROL, order_index=CHILD_ORDER_BASE + index, kept=True)
        return TracedSpan(f"phase {self.name}", semconv.KIND_PHASE, attrs, node=node,
                          scope_changes={"phase": self.name}, tracer=scope.run.tracer)


class step(_Block):
    """A numbered plan step inside a phase; DAG node ``step_<number>`` (order index = number)."""

    def __init__(
        self,
        number: int,
        goal: str = "",
        *,
        agent: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(number, bool) or not isinstance(number, int) or _plain_int(number) < 1:
            raise ValueError(f"step number must be a positive int, got {_text(number)}")
        self.number = _plain_int(number)
        self.goal = _clean(goal) or ""
        self.agent = _clean(agent)
        self.attributes = _attributes(attributes)
        self._traced = None

    def _copy(self) -> step:
        return step(self.number, self.goal, agent=self.agent, attributes=self.attributes)

    def set_summary(self, summary: str) -> None:
        """Record the step's outcome summary (``cmbagent.step.summary``)."""
        self.set_attribute(semconv.STEP_SUMMARY, _clean(summary))

    def _open(self, scope: Scope | None = None, taken: list[int] | None = None) -> TracedSpan:
        scope = _require(scope or current_scope(), f"step({self.number})", "a phase")
        if scope.phase is None:
            raise WorkflowNestingError(f"step({self.number}) must be opened inside a phase")
        if scope.step is not None:
            raise WorkflowNestingError(f"step({self.number}) opened inside step({scope.step}); steps do not nest")
        attrs: dict[str, Any] = {
            semconv.STEP_NUMBER: self.number,
            semconv.STEP_GOAL: truncate(self.goal) or "",
            semconv.PHASE: scope.phase,
        }
        if self.agent:
            attrs[semconv.STEP_AGENT] = self.agent
        if self.attributes:
            attrs.update(self.attributes)
        node = NodeSpec(f"step_{self.number}", semconv.NODE_AGENT, order_index=self.number, kept=True)
        return TracedSpan(f"step {self.number}", semconv.KIND_STEP, attrs, node=node,
                          scope_changes={"step": self.number}, tracer=scope.run.tracer)


def _step_agent() -> str | None:
    """The agent of the step whose span is where new work stands now (``None`` if unknown)."""
    try:
        attributes = getattr(effective_parent()[1], "attributes", None)
        agent = attributes.get(semconv.STEP_AGENT) if attributes is not None else None
        return agent if isinstance(agent, str) else None
    except Exception:
        logger.debug("cmbagent_otel: could not read the step's agent", exc_info=True)
        return None


class redo(_Block):
    """Redo attempt ``attempt`` (1-based) of step ``step``: a branch of that step.

    Must be opened inside ``step(step)``; ``agent`` defaults to the step's agent. Becomes DAG
    node ``step_<n>_redo_<attempt>`` of type ``redo`` with ``cmbagent.branch.name`` =
    ``redo_<attempt>`` and order index
    ``n * 1000 + k`` (k-th child of the step, counted with its sub-agents); the DAG exporter
    adds the ``branch_at_step_<n>`` branch point and a conditional edge ``branch_redo_<attempt>``.
    """

    def __init__(
        self,
        step: int,
        attempt: int,
        hypothesis: str | None = None,
        *,
        agent: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        for label, value in (("step", step), ("attempt", attempt)):
            if isinstance(value, bool) or not isinstance(value, int) or _plain_int(value) < 1:
                raise ValueError(f"redo {label} must be a positive int, got {_text(value)}")
        self.step = _plain_int(step)
        self.attempt = _plain_int(attempt)
        self.hypothesis = _clean(hypothesis)
        self.agent = _clean(agent)
        self.attributes = _attributes(attributes)
        self._traced = None

    def _copy(self) -> redo:
        return redo(self.step, self.attempt, self.hypothesis, agent=self.agent, attributes=self.attributes)

    def _open(self, scope: Scope | None = None, taken: list[int] | None = None) -> TracedSpan:
        # the redo is the step's agent's work unless told otherwise: read it off the step's span
        agent = self.agent or (_step_agent() if scope is None else None)
        scope = _require(scope or current_scope(), f"redo(step={self.step})", f"step({self.step})")
        if scope.step != self.step or scope.dag_node_type != semconv.NODE_AGENT:
            raise WorkflowNestingError(
                f"redo(step={self.step}, attempt={self.attempt}) must be opened directly inside "
                f"step({self.step}); current step is {scope.step!r}"
            )
        limit = scope.run.max_redos
        if limit is not None and self.attempt > limit:
            raise RedoLimitExceeded(
                f"redo attempt {self.attempt} of step {self.step} exceeds max_redos={limit}"
            )
        name = f"redo_{self.attempt}"
        attrs: dict[str, Any] = {
            semconv.STEP_NUMBER: self.step,
            semconv.BRANCH_NAME: name,
            semconv.BRANCH_ATTEMPT: self.attempt,
            semconv.PHASE: scope.phase,
        }
        if self.hypothesis:
            attrs[semconv.BRANCH_HYPOTHESIS] = truncate(self.hypothesis)
        if agent:
            attrs[semconv.STEP_AGENT] = agent
        if self.attributes:
            attrs.update(self.attributes)
        node = NodeSpec(f"{scope.dag_node}_{name}", semconv.NODE_REDO, child=True, kept=True)
        return TracedSpan(f"redo step {self.step} attempt {self.attempt}", semconv.KIND_BRANCH, attrs,
                          node=node, tracer=scope.run.tracer)
