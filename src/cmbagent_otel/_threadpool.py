"""Tasks of a ``multiprocessing.pool.ThreadPool`` run in the context they were submitted from.

A ``ThreadPool`` starts its worker threads (and its result-handler thread) once, when it is made,
and hands them tasks through a queue: no ``submit`` the threading instrumentation could wrap. Those
threads kept the context of the code that made the pool for their whole life, so with a pool made
inside run A (in a step, or lazily by a library on its first use), every task of every later run
B ran in run A's context: B's AG2 chats were recorded in run A's trace, under A's step, after A had
ended; and work outside any run too. While instrumented, ``ThreadPool``'s task-submitting methods
(``apply_async``, ``_map_async`` behind ``map``/``starmap`` and their async forms, ``imap``,
``imap_unordered``; ``apply`` goes through ``apply_async``) bind each task, and each
``callback``/``error_callback``, to the caller's current context, as the threading
instrumentation does for ``ThreadPoolExecutor.submit``. Process pools are not touched (their
tasks are pickled and run in other processes).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from ._context import attach, detach, get_current
from ._forksafe import reset_in_child

_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_lock")  # a forked child must not find it held
_patched: dict[str, Any] = {}
# method -> (positions of callback/error_callback among the arguments after func, their keywords)
_METHODS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "apply_async": ((2, 3), ("callback", "error_callback")),
    "_map_async": ((3, 4), ("callback", "error_callback")),
    "imap": ((), ()),
    "imap_unordered": ((), ()),
}


def _run_in(context: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    token = attach(context)
    try:
        return func(*args, **kwargs)
    finally:
        with contextlib.suppress(Exception):  # a token of another context: nothing of ours to undo
            detach(token)


def _bound(context: Any, func: Any) -> Any:
    return functools.partial(_run_in, context, func) if callable(func) else func


def _wrapper(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    positions, keywords = _METHODS[name]

    @functools.wraps(original)
    def submit(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        context = get_current()
        if positions:
            args = tuple(_bound(context, arg) if index in positions else arg for index, arg in enumerate(args))
            for keyword in keywords:
                if kwargs.get(keyword) is not None:
                    kwargs[keyword] = _bound(context, kwargs[keyword])
        return original(self, _bound(context, func), *args, **kwargs)

    submit.__cmbagent_otel_original__ = original  # type: ignore[attr-defined]
    return submit


def instrument() -> None:
    """Bind ``ThreadPool`` tasks to their submitter's context (idempotent)."""
    from multiprocessing.pool import ThreadPool

    with _lock:
        if _patched:
            return
        for name in _METHODS:
            original = getattr(ThreadPool, name, None)
            if original is None or getattr(original, "__cmbagent_otel_original__", None) is not None:
                continue
            _patched[name] = ThreadPool.__dict__.get(name)  # None: inherited from Pool
            setattr(ThreadPool, name, _wrapper(name, original))


def uninstrument() -> None:
    """Undo :func:`instrument`."""
    from multiprocessing.pool import ThreadPool

    with _lock:
        for name, own in _patched.items():
            if own is None:
                if name in ThreadPool.__dict__:
                    delattr(ThreadPool, name)
            else:
                setattr(ThreadPool, name, own)
        _patched.clear()
