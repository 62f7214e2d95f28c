"""Every module-level lock of ours is free in a forked child (thirty-seventh fault campaign).

``fork()`` copies a lock another thread holds as held, by nobody, for ever. docs/reliability.md promises
that a process forked at any moment does not hang, and ``_forksafe.reset_in_child`` resets the locks
registered with it; ten module-level locks were not (main 86547de), among them the workflow blocks'
``_open_lock`` (taken by every block's entry and exit, in any thread) and the run-trace registry's: a
``multiprocessing`` worker started (``fork``) while another thread entered or left a workflow block hung at
its own first block. Forced by a thread holding each lock at the fork; the child reports the locks it
cannot take, and enters and leaves a workflow block inside an application's span.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

import cmbagent_otel

from .test_fork_locks import wait_child

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


def _module_locks() -> list[tuple[str, str, Any]]:
    """(module, name, lock) of every module-level lock in cmbagent_otel's importable modules."""
    found: list[tuple[str, str, Any]] = []
    seen: set[int] = set()
    for info in pkgutil.walk_packages(cmbagent_otel.__path__, "cmbagent_otel."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an optional dependency missing (grpc, cmbagent): its locks are not in use here
            continue
        for name, value in vars(module).items():
            if isinstance(value, _LOCK_TYPES) and id(value) not in seen:  # once if imported elsewhere
                seen.add(id(value))
                found.append((info.name, name, value))
    return found


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_child_forked_while_each_module_lock_is_held_takes_them_all() -> None:
    from cmbagent_otel import workflow

    locks = _module_locks()
    assert any(name == "_open_lock" for _, name, _ in locks), locks
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:  # other threads of the application, each inside one of our locks at the fork
        taken = [lock for _, _, lock in locks if lock.acquire(timeout=5)]
        held.set()
        release.wait()
        for lock in taken:
            lock.release()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            stuck = [f"{module}.{name}" for module, name, lock in locks if not lock.acquire(blocking=False)]
            os.write(write, (" ".join(stuck) or "-").encode())
            if not stuck:
                for _, _, lock in locks:
                    lock.release()
                with TracerProvider().get_tracer("app").start_as_current_span("request"), workflow("child"):
                    pass
                code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        code = wait_child(pid)
        with os.fdopen(read, "rb") as answer:
            stuck = answer.read().decode()
    finally:
        release.set()
        thread.join()
    # on main 86547de: cmbagent_otel._context._cursor_lock, cmbagent_otel.workflow._open_lock, ... held
    assert (code, stuck) == (0, "-"), f"held in the child: {stuck}"
