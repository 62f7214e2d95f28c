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
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from . import environment_variables as env

logger = logging.getLogger("cmbagent_otel")

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_target: dict[str, Any] = {"provider": None}


def install(provider: Any) -> None:
    """Flush ``provider`` when SIGTERM/SIGHUP ends the process (where their handler is the default)."""
    _target["provider"] = provider
    if not env.get(env.FLUSH_ON_SIGNAL) or threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _on_signal)


def uninstall() -> None:
    """Put the default back where our handler still is (the application may have replaced it)."""
    _target["provider"] = None
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, signal.SIG_DFL)


def _on_signal(signum: int, frame: Any) -> None:
    with contextlib.suppress(Exception):
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    try:
        _flush()
    finally:
        os.kill(os.getpid(), signum)  # ends the process as the default would have


def _flush() -> None:
    provider = _target["provider"]
    flush = getattr(provider, "force_flush", None)
    if flush is None:
        return
    timeout = float(env.get(env.EXPORT_TIMEOUT))

    def run() -> None:
        with contextlib.suppress(Exception):
            flush(int(timeout * 1000))

    # not in the handler itself: the main thread may have been stopped inside a processor or
    # exporter, holding a lock the flush waits for; then the wait ends at the deadline
    worker = threading.Thread(target=run, name="cmbagent-otel-signal-flush", daemon=True)
    try:
        worker.start()
        worker.join(timeout + 1.0)
    except Exception:
        logger.debug("cmbagent_otel: flush on signal failed", exc_info=True)
