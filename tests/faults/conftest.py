"""Shared pieces of the fault-injection suite: databases, the child app, the independent record."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text

import cmbagent_otel
from cmbagent_otel.dag.mapping import run_id_of
from cmbagent_otel.dag.statements import decode_meta
from cmbagent_otel.dag.writer import DagWriter, dump_tables
from cmbagent_otel.processor import as_started
from cmbagent_otel.spill import record_to_span

APP = Path(__file__).with_name("app.py")


@contextmanager
def folder_locked(folder: Path) -> Iterator[None]:
    """``folder``'s ``flock`` held (exclusive) inside the block, through an open file description of its own:
    ``flock`` locks those, so this process's other descriptors conflict with it as another process's do."""
    import fcntl  # POSIX only, as the lock under test

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
def locked_elsewhere(path: Path) -> bool:
    """Whether an exclusive ``flock`` on ``path`` (a file or a folder) is held by another open file description,
    asked without waiting."""
    import fcntl  # POSIX only, as the lock under test

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return dump_tables(conn)
    finally:
        engine.dispose()


def reference(spans: Sequence[ReadableSpan], url: str,
              started: Sequence[ReadableSpan] = ()) -> dict[str, list[tuple[Any, ...]]]:
    """The tables one direct write of ``spans`` (and the started records of spans that never
    ended: the live DAG's running rows) into the empty database ``url`` gives."""
    writer = DagWriter(url)
    try:
        writer.write([*started, *spans])
    finally:
        writer.close()
    return dump(url)


def plan_run_spans(name: str, steps: int = 3) -> list[ReadableSpan]:
    """The finished spans of one small instrumented run: ``workflow name > phase control > step 1..steps``."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        with cmbagent_otel.workflow(name, mode="planning-control"), cmbagent_otel.phase("control"):
            for n in range(1, steps + 1):
                with cmbagent_otel.step(n, f"step {n}", agent="engineer"):
                    pass
    finally:
        cmbagent_otel.uninstrument()
        provider.shutdown()
    return list(memory.get_finished_spans())


def complete_lines(path: Path | str) -> list[str]:
    """The lines of a record file that were written whole: a child killed (kill -9) in the middle of
    a write leaves its last line without its newline, and that record is not one it made."""
    text = Path(path).read_text()
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # the last piece is "" after a whole line, else cut


def read_record(path: Path | str) -> tuple[list[ReadableSpan], list[int]]:
    """Spans in a record file (see app.py) and, per ``flushed`` marker, how many spans preceded it."""
    spans: list[ReadableSpan] = []
    marks: list[int] = []
    for line in complete_lines(path):
        record = json.loads(line)
        if "started" in record:
            continue
        if "flushed" in record:
            marks.append(len(spans))
        else:
            spans.append(record_to_span(record))
    return spans, marks


def read_started(path: Path | str) -> list[ReadableSpan]:
    """Started records (see app.py) of the spans in a record file that never ended."""
    started: dict[tuple[str, str], ReadableSpan] = {}
    ended: set[tuple[str, str]] = set()
    for line in complete_lines(path):
        record = json.loads(line)
        if "started" in record:
            span = as_started(record_to_span(record["started"]))
            started[span_key(span)] = span
        elif "flushed" not in record:
            ended.add(span_key(record_to_span(record)))
    return [span for key, span in started.items() if key not in ended]


def span_key(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def stored_spans(url: str) -> Counter[tuple[str, str]]:
    """(trace id, span id) of every span stored in ``url``, counted once per row that stores it:
    the workflow span's run row, node rows (DAG-node spans; not the ``running`` rows of spans
    that have only started) and event rows (all other spans)."""
    found: Counter[tuple[str, str]] = Counter()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for meta, in conn.execute(text("SELECT meta FROM execution_events")):
                meta = decode_meta(meta)
                if meta.get("span_id"):
                    found[(meta["trace_id"], meta["span_id"])] += 1
            for run_id, meta, status in conn.execute(text("SELECT run_id, meta, status FROM dag_nodes")):
                meta = decode_meta(meta)
                # a running row is the live DAG's view of a span that has not ended: not a stored span
                if meta.get("span_id") and not meta.get("derived") and status != "running":
                    found[(uuid.UUID(run_id).hex, meta["span_id"])] += 1
            for run_id, meta in conn.execute(text("SELECT id, meta FROM workflow_runs")):
                meta = decode_meta(meta)
                if meta.get("otel_source") == "workflow":
                    found[(uuid.UUID(run_id).hex, meta["span_id"])] += 1
    finally:
        engine.dispose()
    return found


def expected_keys(spans: Sequence[ReadableSpan]) -> Counter[tuple[str, str]]:
    assert all(run_id_of(s.context.trace_id) for s in spans)
    return Counter(span_key(s) for s in spans)


def spawn(db_url: str, spill_dir: Path, record: str, env: dict[str, str] | None = None,
          **settings: Any) -> subprocess.Popen[str]:
    """Start app.py; ``settings`` become ``FAULT_<NAME>`` variables, ``env`` more variables."""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", **(env or {})}
    env.update({f"FAULT_{k.upper()}": str(v) for k, v in settings.items()})
    return subprocess.Popen([sys.executable, str(APP), db_url, str(spill_dir), record], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



def hangup_as_default() -> None:
    """A child's ``preexec_fn``: SIGHUP back to its default. A runner started under ``nohup`` ignores
    SIGHUP and its children inherit that, and ``instrument()`` leaves an ignored signal alone (as it
    should): the SIGHUP tests' children would never see it (CI run under ``nohup`` on 70063e4)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cmbagent-otel")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, check=False)


Hit = Callable[[FrameType, str, Any], bool]


def called_from(frame: FrameType | None, code: CodeType, up: int = 1) -> bool:
    """Whether the frame ``up`` frames above ``frame`` runs ``code``."""
    for _ in range(up):
        frame = frame.f_back if frame is not None else None
    return frame is not None and frame.f_code is code


@contextmanager
def interrupt_at(hit: Hit, *, lines_of: CodeType | None = None) -> Iterator[list[BaseException]]:
    """A ``KeyboardInterrupt`` raised at the first point ``hit(frame, event, arg)`` names, as a signal handler
    would raise it there (one runs when a call returns or a function is entered), out of the block.

    The point is found with a ``sys.setprofile`` hook (events ``call``, ``return``, ``c_call``, ``c_return``: an
    exception raised at a ``return`` replaces the returned value, which the caller never gets), or, with
    ``lines_of``, a ``sys.settrace`` hook on that code's ``line`` events. The interpreter removes a hook that
    raises; one that never fired is removed on the way out. The block must end in that very interrupt (the
    yielded list holds it), unchanged: it is swallowed then, and the test fails on any other ending."""
    raised: list[BaseException] = []

    def hook(frame: FrameType, event: str, arg: Any) -> Any:
        if not raised and hit(frame, event, arg):
            # the value returned is dropped with the raise, as a signal handler's interrupt drops it (the
            # traceback holds this frame: its reference kept a lost file object open past the unwinding)
            del arg
            raised.append(KeyboardInterrupt())
            raise raised[-1]
        return hook

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return hook if frame.f_code is lines_of else None

    if lines_of is None:
        sys.setprofile(hook)
    else:
        sys.settrace(calls)
    try:
        yield raised
    except KeyboardInterrupt as caught:
        assert raised and caught is raised[0], "another interrupt came out of the block"  # the very one, unchanged
    else:
        pytest.fail(f"the interrupt did not come out of the block (raised: {raised})")
    finally:
        sys.setprofile(None)
        sys.settrace(None)


def each_interrupt(action: Callable[[], Any], counted: Callable[[FrameType, str], bool],
                   ) -> Iterator[tuple[str, list[BaseException]]]:
    """``action()`` run again and again, interrupted (:func:`interrupt_at`) at its n-th point that
    ``counted(frame, event)`` names, n = 1, 2, ... until a run meets fewer (the iteration ends then). Yields each
    run's point (the event and the function entered, or the C call's caller) and its interrupt, kept while the
    caller looks (as an interactive session keeps the last one: ``sys.last_traceback``)."""
    for n in itertools.count(1):
        seen: list[str] = []

        def nth(frame: FrameType, event: str, _arg: Any, n: int = n, seen: list[str] = seen) -> bool:
            if not counted(frame, event):
                return False
            seen.append(f"{event} {frame.f_code.co_name}")
            return len(seen) == n

        try:
            with interrupt_at(nth) as raised:
                action()
        except pytest.fail.Exception:  # no n-th point in this run: every point was met
            return
        yield seen[-1], raised


def runs_under(frame: FrameType | None, code: CodeType | None) -> bool:
    """Whether ``frame`` or a frame it was called from runs ``code``."""
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


FDS = Path("/proc/self/fd")  # Linux: this process's descriptors, each a link to what it is open on
_OURS = str(Path(cmbagent_otel.__file__).parent)


def descriptors_on(target: Path | Callable[[str], bool], among: Iterable[str] | None = None) -> set[str]:
    """This process's descriptors (of ``among``, default all) on ``target`` (a path, or a test of the link's
    text: ``socket:[…]`` for a socket)."""
    match = target if callable(target) else str(target).__eq__
    found = set()
    for name in os.listdir(FDS) if among is None else among:
        try:
            if match(os.readlink(FDS / name)):
                found.add(name)
        except OSError:
            continue  # the listing's own descriptor, closed since
    return found


def opened_on(target: Path | Callable[[str], bool]) -> Hit:
    """For :func:`interrupt_at`: the first return of a C call (``os.open``'s, or of what holds its descriptor)
    to our code (where a signal handler runs) after a descriptor on ``target`` was opened: looked for in our
    code's calls only, among the descriptors opened since, for speed."""
    before = descriptors_on(lambda path: True)  # not the listing's own descriptor: the file's may take its number
    return lambda frame, event, arg: event == "c_return" and frame.f_code.co_filename.startswith(_OURS) \
        and bool(descriptors_on(target, set(os.listdir(FDS)) - before))


@contextmanager
def call_at(hit: Hit, action: Callable[[], Any]) -> Iterator[list[FrameType]]:
    """``action()`` run once at the first point ``hit(frame, event, arg)`` names inside the block (a
    ``sys.setprofile`` hook, as :func:`interrupt_at` finds its point), as another thread would run it there:
    the interleaving a race needs, made certain. The yielded list holds the frame it ran at (empty: never)."""
    ran: list[FrameType] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if not ran and hit(frame, event, arg):
            ran.append(frame)
            action()  # profiling is off inside the hook: action's own calls are not looked at

    sys.setprofile(hook)
    try:
        yield ran
    finally:
        sys.setprofile(None)
