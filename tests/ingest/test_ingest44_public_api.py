"""The ingest server uses no private API of CPython's (session 44): ``threading._register_atexit`` (to stop
before the interpreter joined the call threads) and ``ThreadPoolExecutor._threads`` /
``_adjust_thread_count`` (to wait for the pool's threads with a bound, to survive a thread that cannot
start) are gone; the receivers' pools are :class:`~cmbagent_otel._ingest_pool.CallPool`\\ s of daemon
threads, stopped at exit by an ordinary ``atexit`` function. The behaviour those pinned is pinned by
test_ingest43_serve_forever.py (exit with a call waiting), test_ingest43_lifecycle.py (nothing left
after a stop) and tests/faults/test_faults29_thread_exhaustion.py (no thread can start)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

import cmbagent_otel
from cmbagent_otel._ingest_pool import CallPool, join_pool

SRC = Path(cmbagent_otel.__file__).resolve().parent
INGEST_MODULES = ("ingest.py", "_ingest_core.py", "_ingest_grpc.py", "_ingest_http.py", "_ingest_pool.py")
FOREIGN = {"threading", "futures", "concurrent", "pool", "executor", "asyncio", "socket", "signal", "os", "sys",
           "super()"}


def _private_uses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is a module or object of the standard library's (by name), or ``super()``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        base = node.value
        name = (base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute)
                else "super()" if isinstance(base, ast.Call) and getattr(base.func, "id", "") == "super" else "")
        if name.lower() in FOREIGN:
            found.append(f"{path.name}:{node.lineno}: {name}.{node.attr}")
    for node in ast.walk(ast.parse(path.read_text())):  # getattr(x, "_private", ...) too
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")
                and not str(node.args[1].value).startswith("__")):
            found.append(f"{path.name}:{node.lineno}: getattr(..., {node.args[1].value!r})")
    return found


def test_the_ingest_modules_use_no_private_api_of_the_standard_library() -> None:
    """On main: threading._register_atexit, getattr(pool, '_threads'), two _adjust_thread_count overrides."""
    assert [use for name in INGEST_MODULES for use in _private_uses(SRC / name)] == []


def test_join_pool_waits_with_a_bound_and_says_whether_the_threads_ended() -> None:
    release = threading.Event()
    pool = CallPool(2, "test-ingest44-pool")
    busy = pool.submit(release.wait)
    queued = [pool.submit(release.wait) for _ in range(3)]  # two of them not begun: dropped by the join
    assert join_pool(pool, lambda: 0.05) is False  # a thread still in its work: the wait was bounded
    release.set()
    assert join_pool(pool, lambda: 60.0) is True
    assert busy.result(60) is True
    assert sum(future.cancelled() for future in queued) == 2
    assert all(not thread.is_alive() and thread.daemon for thread in pool.threads)
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_a_refusing_pool_cancels_the_work_no_thread_can_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Thread.start`` failing is the C library's (a pids limit; the real one in test_faults29); here it is
    made to fail so both policies are seen in one process: the refused work is never run later."""
    ran: list[str] = []

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    refusing = CallPool(1, "test-ingest44-refuse", refuse_without_thread=True)
    waiting = CallPool(1, "test-ingest44-wait")
    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(RuntimeError, match="can't start"):
            refusing.submit(ran.append, "refused")
        later = waiting.submit(ran.append, "kept")
    assert not later.done()
    assert waiting.submit(ran.append, "next").result(60) is None and later.result(60) is None
    refusing.submit(ran.append, "served").result(60)
    assert sorted(ran) == ["kept", "next", "served"]
    assert join_pool(refusing, lambda: 60.0) and join_pool(waiting, lambda: 60.0)
