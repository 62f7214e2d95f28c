"""Export what was recorded when the process is told to stop (SIGTERM, SIGHUP).

Python's default for SIGTERM and SIGHUP ends the process at once, without ``atexit``: the
spans queued for the batch processors (up to a second of them, with the DAG processor's
defaults) and the run and DAG-node rows of the live DAG were lost, with nothing saying so,
whenever a container, a job scheduler, ``timeout`` or a closed terminal stopped the run.
``instrument()`` now puts a handler in place of the default one (never in place of the
application's own, and only from the main thread); it flushes the tracer provider, within
the export deadline and from another thread (the signal may arrive while the main thread
holds a lock the flush needs), then restores the default and sends the same signal again,
so the process still ends by that signal, with no application code run in between.

Before the flush, the run and DAG-node spans of ours still open (the run, its phase, its
current step, a sub-agent turn) are ended with ERROR status, ``stopped by SIGTERM`` and
``error.type=stopped_by_signal``: they would never end otherwise, and their rows would show
the run ``executing`` and its nodes ``running`` for ever. The run and steps among them record
their duration metrics as their owners would have (``error.type=stopped_by_signal``), and the
meter provider the metrics go to is flushed after the tracer provider: what the periodic
reader had not exported yet (up to a minute of it, with the SDK's default) died with the process.

While ours is in place, the application sees the default there: ``signal.getsignal`` answers ``SIG_DFL`` for
it, ``signal.signal`` returns ``SIG_DFL`` as the handler ours replaced, and ``signal.signal(signum, SIG_DFL)``
puts ours back (:func:`_virtual_default`). Handlers decide by what they find (``previous is SIG_DFL``, ``in
(SIG_DFL, SIG_IGN)``, ``callable(previous)``, a library installing its own only over the default): with ours
seen as itself, a handler testing ``SIG_DFL`` before calling ``previous`` called ours and went on where it
ended the process without us, and a library left the signal to ours.

A ``multiprocessing`` child ends by ``os._exit`` once its target returns (start methods ``fork``
and ``forkserver``), so neither ``atexit`` nor the providers' shutdown runs there: every span the
child recorded (its whole run) was lost, with nothing saying so. Its exit hook
(``multiprocessing.util._exit_function``, which runs the finalizers) now flushes the providers
too: registered after each fork for a child ``multiprocessing`` bootstraps, and by
``instrument()`` in a ``spawn``/``forkserver`` child that instruments itself when it imports
its main module.
"""

from __future__ import annotations

import atexit
import contextlib
import dis
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import Status, StatusCode

from . import environment_variables as env
from . import semconv
from ._varblock import VarSet

logger = logging.getLogger("cmbagent_otel")

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_target: dict[str, Any] = {"provider": None, "meter_provider": None, "metrics": False}

STOPPED_BY_SIGNAL = "stopped_by_signal"  # error.type of a span ended because a signal stopped the process
PROCESS_EXITED = "process_exited"  # error.type of a span still open when the interpreter exited
INSTRUMENTATION_STOPPED = "instrumentation_stopped"  # error.type of a span open when its provider shut down
_exit_hook = {"registered": False}


# signal's own functions, which install() replaces by the views of _virtual_default while ours is in place
_real: dict[str, Any] = {"signal": signal.signal, "getsignal": signal.getsignal}
_views: dict[str, Any] = {}  # those views, while they are signal's


def _virtual_default() -> tuple[Any, Any]:
    """``signal.signal`` and ``signal.getsignal`` as the application would find them without us: ours is the
    default. ``getsignal`` answers ``SIG_DFL`` for ours; ``signal`` returns ``SIG_DFL`` for ours replaced, and
    puts ours in place of ``SIG_DFL`` for SIGTERM/SIGHUP (restoring the default the application read keeps the
    flush). Anything else goes to signal's own functions unchanged, their errors too."""
    real_signal, real_getsignal = _real["signal"], _real["getsignal"]

    @functools.wraps(real_getsignal)
    def getsignal(signalnum: Any) -> Any:
        handler = real_getsignal(signalnum)
        return signal.SIG_DFL if handler is _on_signal else handler

    @functools.wraps(real_signal)
    def signal_(signalnum: Any, handler: Any) -> Any:
        try:
            # as signal.signal reads a handler that is not callable: by equality
            default = signalnum in _SIGNALS and not callable(handler) and handler == signal.SIG_DFL
        except Exception:
            default = False
        previous = real_signal(signalnum, _on_signal if default else handler)
        return signal.SIG_DFL if previous is _on_signal else previous

    return signal_, getsignal


def install(provider: Any, meter_provider: Any = None, metrics: bool = False) -> None:
    """End our open run and node spans failed and flush ``provider`` (and, with ``metrics``, the meter
    provider: ``meter_provider``, ``None`` for the global one) when SIGTERM/SIGHUP ends the process
    (where their handler is the default)."""
    _target.update(provider=provider, meter_provider=meter_provider, metrics=metrics)
    if not _exit_hook["registered"]:
        # registered after the provider was made: runs before the SDK's own atexit shutdown of it
        _exit_hook["registered"] = True
        atexit.register(_at_exit)
    with contextlib.suppress(Exception):
        process, util = sys.modules.get("multiprocessing.process"), sys.modules.get("multiprocessing.util")
        # a spawn/forkserver child importing its main module: a spawn child keeps the finalizer; a
        # forkserver child's bootstrap clears it, then runs the after-fork hooks, which register it again
        if process is not None and util is not None and getattr(process.current_process(), "_inheriting", False):
            _flush_at_child_exit(None)
            util.register_after_fork(_CHILD_HOOK, _flush_at_child_exit)
    if not env.get(env.FLUSH_ON_SIGNAL) or threading.current_thread() is not threading.main_thread():
        return
    installed = False
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if _real["getsignal"](signum) in (signal.SIG_DFL, _on_signal):
                _real["signal"](signum, _on_signal)
                installed = True
    if installed and signal.signal is _real["signal"] and signal.getsignal is _real["getsignal"]:
        _views["signal"], _views["getsignal"] = _virtual_default()
        signal.signal, signal.getsignal = _views["signal"], _views["getsignal"]


def uninstall() -> None:
    """Put the default back where our handler still is (the application may have replaced it), and signal's
    own functions where the views of :func:`_virtual_default` still are."""
    _target.update(provider=None, meter_provider=None, metrics=False)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if _real["getsignal"](signum) is _on_signal:
                _real["signal"](signum, signal.SIG_DFL)
    for name, view in list(_views.items()):
        if getattr(signal, name) is view:  # not where another library has put its own since
            setattr(signal, name, _real[name])
    _views.clear()


def _on_signal(signum: int, frame: Any) -> None:
    try:
        installed = _real["getsignal"](signum) is _on_signal
    except Exception:
        installed = True
    if not installed and not _default_branch_after(sys._getframe(1)):
        # called by the application's handler, installed after ours, which calls the one it replaced
        # (``if callable(previous): previous(...)``): without us that was the default, not callable, and
        # the process went on. Put the default in place of the application's handler, end the run and
        # kill the process here and the rest of its handler never runs: only flush what is queued.
        _chained_flush()
        return
    # installed, or called by a handler that without us took its branch for the default, after this call
    # (``elif previous == SIG_DFL:``, which ends the process): ended by the signal, as the default would
    with contextlib.suppress(Exception):
        _real["signal"](signum, signal.SIG_DFL)  # a second signal ends the process at once
    if _deferring and _deferral["pid"] == os.getpid():
        # the main thread is exporting: signals_deferred() stops us after. Only in the process that
        # deferred: a child forked meanwhile may run this before its fork hook clears the deferral
        _deferral["pending"] = signum
        return
    _stop(signum)


_COMPARISONS = frozenset({"COMPARE_OP", "IS_OP", "CONTAINS_OP"})


def _default_branch_after(caller: Any) -> bool:
    """Whether the handler running in ``caller`` (that called ours) compares a value with ``SIG_DFL`` after the
    call running now: ``if callable(previous): previous(signum, frame)`` then ``elif previous == SIG_DFL:`` (or
    ``is``, ``in (SIG_DFL, ...)``), a shape application handlers take. Without us ``previous`` was the default,
    not callable, and that branch ran: it ends the process (puts the default back and raises the signal
    again, or exits); with ours called in its place the process went on after SIGTERM. Read from the
    caller's bytecode (a load of ``SIG_DFL`` followed by a comparison before any call); never raises."""
    try:
        code, at = caller.f_code, caller.f_lasti
        after = [ins for ins in dis.get_instructions(code) if ins.offset > at]
        for n, ins in enumerate(after):
            if ins.argval != "SIG_DFL" or not ins.opname.startswith("LOAD_"):
                continue
            for following in after[n + 1:n + 8]:  # the other operands first: ``in (SIG_DFL, SIG_IGN, None)``
                if following.opname in _COMPARISONS:
                    return True
                if following.opname.startswith(("CALL", "PRECALL", "STORE_", "POP_JUMP", "RETURN")):
                    break
    except Exception:
        logger.debug("cmbagent_otel: could not read the handler that called ours", exc_info=True)
    return False


def _stop(signum: int) -> None:
    try:
        _flush(_signal_name(signum))
    finally:
        os.kill(os.getpid(), signum)  # ends the process as the default would have


_deferral: dict[str, Any] = {"pending": None, "pid": 0}  # touched in the main thread only
# one None per signals_deferred() block open in the main thread, appended and removed by C calls (see VarSet)
_deferring: list[None] = []


def signals_deferred() -> contextlib.AbstractContextManager[Any]:
    """In the main thread, let our SIGTERM/SIGHUP handler wait until the block ends. The handler
    runs in the main thread: one arriving while the main thread itself exported a batch (a
    ``force_flush``: the application's, ``uninstrument()``'s, a ``multiprocessing`` child's at its
    exit) stopped that export half-way, its own flush found the batch gone from the queue, and the
    process ended without it. Now the handler notes the signal and returns; the export goes on
    (no application code runs) and the handler's work runs when the block ends, bounded by the
    flush's own timeout. A second signal meanwhile ends the process at once, as always.

    The deferral ends however the block is left (:class:`~cmbagent_otel._varblock.VarSet`): a Ctrl-C as the
    block was entered or left kept it for good, and the next SIGTERM was noted, never acted on (the process went
    on). One landing as the block's exit calls :func:`_stop_deferred` skips a signal noted meanwhile (the
    interrupt ends the application or is handled by it)."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    _deferral["pid"] = os.getpid()
    return VarSet(_deferring.append, _deferring.remove, None, then=_stop_deferred)


def _stop_deferred(_token: None) -> None:
    """After a :func:`signals_deferred` block: our handler's work for a signal noted inside, once none is open."""
    signum = _deferral["pending"]
    if signum is not None and not _deferring:
        _deferral["pending"] = None
        _stop(signum)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except Exception:
        return f"signal {signum}"


def _at_exit() -> None:
    """At the interpreter's exit, end the run and DAG-node spans still open (a daemon thread inside a step,
    a generator suspended in a block, a block entered by hand and never left) failed, as the signal
    handler does, before the providers' own exit hooks flush and shut them down: their rows said
    ``executing``/``running`` for ever."""
    end_open_spans("the process exited while it was open", PROCESS_EXITED)


_TIMED = "_cmbagent_otel_timed"  # on a run or step span: who records its duration metric (first come)


def claim_duration(span: Any, claimant: object) -> bool:
    """Whether ``claimant`` records ``span``'s duration metric: the first to ask, its owner when it ends the
    span or :func:`end_open_spans` ending it for the owner, does; the other not. The owner went on after a
    span was ended for it (a daemon thread at exit, the thread that shut the provider down) and recorded
    the same run or step a second time. Atomic (one ``dict.setdefault``); a span without a ``__dict__``
    is always its owner's."""
    attributes = getattr(span, "__dict__", None)
    return attributes is None or attributes.setdefault(_TIMED, claimant) is claimant


_HOOK = object()  # end_open_spans as a claimant
# on a run or step span with a duration metric: its start by ``time.perf_counter()`` (see _record_durations)
MONOTONIC_START = "_cmbagent_otel_monotonic_start"


def _ended(end_time: int | None = None) -> None:
    """What ``end()`` of a span :func:`end_open_spans` ended does: its owner (a daemon thread going on while
    the interpreter exits) ends it again when its block is left, which the SDK logs as a warning."""


def end_open_spans(reason: str, error_type: str = STOPPED_BY_SIGNAL, processor: Any = None) -> int:
    """End the run and DAG-node spans of ours still open (only those recorded through ``processor``, if
    given), failed with ``reason`` and ``error_type``, innermost first; never raises. Returns how many it
    ended."""
    from ._spans import open_node_spans

    try:
        spans = [span for span in open_node_spans() if span.is_recording()
                 and (processor is None or getattr(span, "_span_processor", None) is processor)]
    except Exception:
        logger.debug("cmbagent_otel: could not read the open spans", exc_info=True)
        return 0
    with contextlib.suppress(Exception):
        spans.sort(key=lambda span: getattr(span, "start_time", None) or 0, reverse=True)  # children first
    ended: list[Any] = []
    by_owner: list[Any] = []  # ended by their owners since they were listed, their durations ours to record
    for span in spans:
        try:
            end = span.end
            if not claim_duration(span, _HOOK):
                continue  # its owner has just ended it (and recorded its duration)
            # an instance attribute: only this span, no cost to any other; its owner's end() does nothing now
            span.end = _ended
            if not span.is_recording():
                by_owner.append(span)
                continue
            if span.status.status_code is StatusCode.UNSET:  # a failure recorded before keeps its reason
                span.set_status(Status(StatusCode.ERROR, reason))
                span.set_attribute(semconv.ERROR_TYPE, error_type)
            end()
            ended.append(span)
        except Exception:
            logger.debug("cmbagent_otel: could not end an open span", exc_info=True)
    _record_durations([*ended, *by_owner], error_type, by_owner)
    return len(ended)


def _record_durations(spans: list[Any], error_type: str = STOPPED_BY_SIGNAL,
                      by_owner: Sequence[Any] = ()) -> None:
    """The run-level duration metrics of the workflow and step spans just ended: their owners, which
    record them when they end a span, will not now (see :func:`claim_duration`). ``by_owner``: those among
    them their owners ended (with their own outcome, not ``error_type``)."""
    from ._spans import workflow_tracers
    from .metrics import TIMED_KINDS

    try:
        metrics = workflow_tracers.current_metrics()
        if metrics is None:
            return
        # by the monotonic clock, as their owners would have: the spans' wall-clock times may straddle a
        # step of the clock (NTP, a resumed VM), which made a run's duration an hour long or zero
        now, now_ns = time.perf_counter(), time.time_ns()
        runs = {span.context.trace_id: span.attributes.get(semconv.WORKFLOW_NAME) for span in spans
                if span.attributes.get(semconv.SPAN_KIND) == semconv.KIND_WORKFLOW}
        for span in spans:
            attributes = span.attributes
            kind = attributes.get(semconv.SPAN_KIND)
            if kind in TIMED_KINDS and span.start_time:
                started = getattr(span, "__dict__", {}).get(MONOTONIC_START)
                if type(started) is float:
                    seconds = now - started
                else:  # a span started without a duration metric bound (none recorded then): its wall clock
                    seconds = ((span.end_time or now_ns) - span.start_time) / 1e9
                outcome = attributes.get(semconv.ERROR_TYPE) or (None if span in by_owner else error_type)
                metrics.ended(kind, attributes, max(0.0, seconds), outcome, runs.get(span.context.trace_id))
    except Exception:
        logger.debug("cmbagent_otel: could not record the durations of the ended spans", exc_info=True)


def _meter_provider() -> Any:
    if not _target["metrics"]:
        return None
    if _target["meter_provider"] is not None:
        return _target["meter_provider"]
    from opentelemetry import metrics as otel_metrics

    return otel_metrics.get_meter_provider()


class _ChildHook:
    """What ``multiprocessing.util.register_after_fork`` holds (weakly) for :func:`_flush_at_child_exit`."""


_CHILD_HOOK = _ChildHook()
_child_finalizer: list[Any] = [None]


def _flush_at_child_exit(_hook: Any) -> None:
    """Flush the providers when this ``multiprocessing`` child exits (its finalizers run; ``atexit``
    does not), once."""
    util = sys.modules.get("multiprocessing.util")
    current = _child_finalizer[0]
    if util is None or (current is not None and current.still_active()):
        return
    _child_finalizer[0] = util.Finalize(None, _flush_providers, exitpriority=0)


def _flush_providers() -> None:
    if _target["provider"] is None and not _target["metrics"]:
        return  # not instrumented (any more)
    try:
        _flush_both(getattr(_target["provider"], "force_flush", None), float(env.get(env.EXPORT_TIMEOUT)))
    except Exception:
        logger.debug("cmbagent_otel: could not flush at the process's exit", exc_info=True)


def _after_fork_in_child() -> None:
    # forked from another thread while the main thread was in signals_deferred(): the child's main thread
    # is not, and a deferral left in place would keep our handler from ever ending the child
    _deferring.clear()
    _deferral.update(pending=None, pid=0)
    util = sys.modules.get("multiprocessing.util")
    if util is not None and _target["provider"] is not None:
        with contextlib.suppress(Exception):
            # run by multiprocessing's bootstrap of the child, after it cleared the parent's finalizers;
            # a plain os.fork() child never runs it
            util.register_after_fork(_CHILD_HOOK, _flush_at_child_exit)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _flush_both(flush: Any, timeout: float) -> None:
    """The tracer provider's ``flush``, then the meter provider's, within ``timeout`` together."""
    started = time.monotonic()
    with contextlib.suppress(Exception):
        if flush is not None:
            flush(int(timeout * 1000))
    meters = getattr(_meter_provider(), "force_flush", None)  # a proxy (no SDK provider) has none
    if meters is not None:
        with contextlib.suppress(Exception):
            meters(int(max(0.1, timeout - (time.monotonic() - started)) * 1000))


def _chained_flush() -> None:
    """Export what is queued, from another thread within the export deadline (as :func:`_flush` does),
    ending nothing: the process goes on."""
    if _target["provider"] is None and not _target["metrics"]:
        return
    timeout = float(env.get(env.EXPORT_TIMEOUT))
    _in_thread(lambda: _flush_both(getattr(_target["provider"], "force_flush", None), timeout),
               "cmbagent-otel-signal-flush", timeout + 1.0)


def _flush(signal_name: str = "a signal") -> None:
    provider = _target["provider"]
    flush = getattr(provider, "force_flush", None)
    timeout = float(env.get(env.EXPORT_TIMEOUT))

    def end() -> None:
        end_open_spans(f"stopped by {signal_name}")

    def run() -> None:
        _flush_both(flush, timeout)

    # neither in the handler itself: the main thread may have been stopped holding a lock they wait
    # for (a span's, a processor's, an exporter's); then each wait ends at its deadline. The spans are
    # ended in a thread of their own, so one whose lock is held never keeps the rest from the flush.
    _in_thread(end, "cmbagent-otel-signal-end", min(1.0, timeout))
    if flush is not None or _target["metrics"]:
        _in_thread(run, "cmbagent-otel-signal-flush", timeout + 1.0)


def _in_thread(target: Any, name: str, wait: float) -> None:
    worker = threading.Thread(target=target, name=name, daemon=True)
    try:
        worker.start()
        worker.join(wait)
    except Exception:
        logger.debug("cmbagent_otel: %s failed", name, exc_info=True)
