"""A fork while a thread of ours is inside SQLite (fork campaign, session 47).

SQLite is not fork-safe: a child forked while a thread of its parent was inside a SQLite transaction finds the
file locked by a connection it does not have (SQLite keeps the lock state in the process), and one forked while a
thread was inside a SQLite call may find SQLite's global mutexes held for good. With the DAG exporter writing all
the time, 24 children in 40 waited out their export timeout and spilled. Now a fork waits (bounded) for the DAG
writer's SQLite calls in flight, so the child writes its own spans; a child forked while one was still under way
(the wait ran out) never calls SQLite: its batches go to the spill store at once, and the parent writes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from cmbagent_otel import _forksafe
from cmbagent_otel.dag import writer

from .conftest import call_at
from .test_faults46_fork_sqlite_spill import _run, _runs
from .test_fork_locks import HANG_GUARD_S, wait_child

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")

# the application's own before-fork hooks: registered after ours, so they run before them
_before_ours: list[Callable[[], object]] = []


def _app_before_fork() -> None:
    while _before_ours:
        _before_ours.pop()()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_app_before_fork)


def _export_held(exporter: DagSpanExporter, spans: list, release: threading.Event) -> tuple[threading.Thread, list]:
    """``exporter.export(spans)`` in a thread, held inside its transaction (at the batch's first statement) until
    ``release``; returned once it is there, with the list its result goes to."""
    inside, result = threading.Event(), []

    def hold() -> None:
        inside.set()
        release.wait(HANG_GUARD_S)

    def export() -> None:
        entered = writer._write_batch.__code__
        with call_at(lambda frame, event, _arg: event == "call" and frame.f_code is entered, hold):
            result.append(exporter.export(spans))

    thread = threading.Thread(target=export)
    thread.start()
    assert inside.wait(HANG_GUARD_S)
    return thread, result


def _sqlite(arg: object) -> bool:
    """Whether a ``c_call`` profile event's ``arg`` is a call into SQLite (the ``sqlite3`` module's C code)."""
    return "sqlite3" in f"{getattr(arg, '__module__', None)} {type(getattr(arg, '__self__', None)).__module__}"


def _child(exporter: DagSpanExporter, spans: list, wanted: Callable[[dict[str, int], list[str]], bool]) -> int:
    """Fork a child that exports ``spans`` and exits 0 when it succeeded and ``wanted(its stats, its calls into
    SQLite)``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            calls: list[str] = []
            sys.setprofile(lambda _frame, event, arg: calls.append(repr(arg)) if event == "c_call" and _sqlite(arg)
                           else None)
            exported = exporter.export(spans)
            sys.setprofile(None)
            code = 0 if exported is SpanExportResult.SUCCESS and wanted(exporter.stats(), calls) else 2
        finally:
            os._exit(code)
    return pid


@pytest.fixture
def parent(capture, tmp_path: Path, sqlite_url: str) -> Iterator[SimpleNamespace]:  # type: ignore[no-untyped-def]
    """A DAG exporter on SQLite that has stored one run (``before``), the spans of two more (``held``, ``child``),
    and the event that lets a held export go on (``release``)."""
    before, held, child = (_run(capture, name) for name in ("parent before", "parent held", "child"))
    exporter = DagSpanExporter(sqlite_url, timeout=2, spill_dir=tmp_path / "spill")
    release = threading.Event()
    try:
        assert exporter.export(before) is SpanExportResult.SUCCESS
        yield SimpleNamespace(exporter=exporter, before=before, held=held, child=child, release=release)
    finally:
        release.set()
        _before_ours.clear()
        exporter.shutdown()


def test_a_fork_waits_for_the_dag_writers_transaction_so_the_child_writes_itself(parent, sqlite_url: str) -> None:
    exporter = parent.exporter
    thread, result = _export_held(exporter, parent.held, parent.release)
    _before_ours.append(parent.release.set)  # the transaction goes on once the fork has begun
    # before: forked inside the parent's transaction, the child found the database locked and spilled
    pid = _child(exporter, parent.child, lambda stats, _: not stats["spilled"] and not stats["retried"])
    thread.join(HANG_GUARD_S)
    assert wait_child(pid) == 0
    assert result == [SpanExportResult.SUCCESS]
    assert _runs(sqlite_url) == 3 and not exporter.stats()["spilled"], exporter.stats()


def test_a_child_forked_inside_the_dag_writers_sqlite_calls_spills_without_calling_sqlite(
        parent, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_forksafe, "FORK_WAIT_CAP_S", 0.2)  # the wait runs out: the transaction goes on past it
    exporter = parent.exporter
    thread, result = _export_held(exporter, parent.held, parent.release)
    # before: the child called SQLite, found the database locked, waited out its timeout, then spilled
    pid = _child(exporter, parent.child, lambda stats, calls: stats["spilled"] == 3 and not calls)
    parent.release.set()
    thread.join(HANG_GUARD_S)
    assert wait_child(pid) == 0
    assert result == [SpanExportResult.SUCCESS]
    assert exporter.export(parent.before) is SpanExportResult.SUCCESS  # the parent writes the child's spill file
    assert _runs(sqlite_url) == 3, exporter.stats()


INTERRUPTED = textwrap.dedent('''
    import os, signal, sys, threading
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel.dag import writer

    # an application with Python's own Ctrl-C: a process started in the background (CI's jobs, `cmd &`) inherits
    # SIGINT ignored, and Python then installs no handler: the interrupt below would be dropped by the kernel
    signal.signal(signal.SIGINT, signal.default_int_handler)
    url, bound = sys.argv[1], float(sys.argv[2])
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)

    def run(name):
        memory.clear()
        with workflow(name, mode="one_shot"), phase("control"), step(1, name):
            pass
        return memory.get_finished_spans()

    dag = writer.DagWriter(url)
    dag.write(run("before"))
    fork_began, release = threading.Event(), threading.Event()
    main = threading.get_ident()

    def held(frame, event, arg):  # the write held inside its transaction; Ctrl-C comes while the fork waits
        if event == "call" and frame.f_code is writer._write_batch.__code__:
            sys.setprofile(None)
            inside.set()
            fork_began.wait(bound)
            signal.pthread_kill(main, signal.SIGINT)
            release.wait(bound)

    def write():
        sys.setprofile(held)
        dag.write(held_run)

    inside, held_run = threading.Event(), run("held")
    thread = threading.Thread(target=write)
    thread.start()
    inside.wait(bound)
    os.register_at_fork(before=fork_began.set)  # the application's hook: runs before ours
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            os.write(w, str(os.getpid()).encode())
            os._exit(0)
        print("fork returned", flush=True)
    except KeyboardInterrupt:
        print("interrupt from fork", flush=True)
    release.set()
    thread.join(bound)
    print("child", os.waitstatus_to_exitcode(os.waitpid(int(os.read(r, 32)), 0)[1]), flush=True)
''')


def test_an_interrupt_during_the_forks_wait_reaches_the_application(tmp_path: Path, sqlite_url: str) -> None:
    """Ctrl-C while a fork waits for our calls in flight ended the wait and was lost: Python only reports an
    exception out of a fork hook ("Exception ignored in"). It is raised by ``os.fork()`` once the child is made."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), sqlite_url, str(HANG_GUARD_S)], capture_output=True, text=True,
                          env=env, timeout=3 * HANG_GUARD_S)
    assert done.stdout.splitlines() == ["interrupt from fork", "child 0"], (done.stdout, done.stderr[-3000:])
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr[-3000:]
