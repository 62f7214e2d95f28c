"""Twenty-ninth fault campaign: ``SpillStore.recover()`` never takes a file another process is writing.

``recover()`` (run by every exporter that starts on a spill folder) handles the ``.tmp`` files writers
left: renamed into place when whole, removed when not. Its guard against a live writer was the writer's
pid and the file's age by the wall clock: a ``.tmp`` older than 60 s was taken as abandoned even when its
pid was alive (a reused pid). So a process whose wall clock had stepped forward (an NTP step, a resumed
VM; here libfaketime, two hours) or a write stalled for a minute (an fsync on a disk or NFS server that
hangs) took a file still being written: the session-34 campaign left it as "not reproduced". Reproduced
here on 0c80923: stalled after creating its file, the writer's file was removed under it and its batch
lost (``SpillFailed``: 5 spans in no file); stalled in fsync, its whole file was renamed under it and the
writer reported its batch lost although the file was there. A writer now holds an advisory lock on its
``.tmp`` until the file is renamed; ``recover()`` leaves a locked file alone, whatever its age. A writer
that dies drops the lock with its process, so its file is still recovered (checked too).

The writer is a child process spilling real spans; the disk "stalls" in one call (``os.fdopen`` right
after the file is created, or ``os.fsync``), which waits for a line on stdin, so the parent runs the
other process's ``recover()`` at exactly that point. Without libfaketime the test skips locally and fails
under ``CI=true`` (as the twenty-eighth campaign's clock tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cmbagent_otel.spill import read_spill

from .test_faults28_clock_jumps import HOUR, Clock, clock  # noqa: F401 - clock: the fixture

ROOT = Path(__file__).resolve().parents[2]
TARGET = "sqlite:///spilled.db"

WRITER = r'''
import os, stat, sys, json
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from cmbagent_otel.spill import SpillStore

memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
tracer = provider.get_tracer("faults29")
for number in range(5):
    with tracer.start_as_current_span(f"step {number}"):
        pass
spans = memory.get_finished_spans()
where = sys.argv[2]
real = getattr(os, where)
stalled = []


def stall(*args, **kwargs):
    if not stalled:  # the disk hangs in this call until the parent says go
        stalled.append(True)
        print("STALLED", flush=True)
        sys.stdin.readline()
    return real(*args, **kwargs)


setattr(os, where, stall)
try:
    paths = SpillStore(sys.argv[1], sys.argv[3]).append(spans)
except Exception as exc:
    print("FAILED", type(exc).__name__, exc, flush=True)
    raise SystemExit(1)
print("SPILLED", json.dumps([str(p) for p in paths]), flush=True)
'''

RECOVER = ("import sys; from cmbagent_otel.spill import SpillStore; "
           "print(SpillStore(sys.argv[1], sys.argv[2]).recover())")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **extra}


def _writer(folder: Path, where: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), where, TARGET], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == "STALLED\n", (line, child.stderr.read() if child.stderr else "")
    return child


def _stop(writer: subprocess.Popen[str]) -> None:
    """Kill a writer still running (a test that failed while it stalled)."""
    if writer.poll() is None:
        writer.kill()
        writer.wait()


def _finishes_whole(writer: subprocess.Popen[str], folder: Path) -> None:
    """Let a writer stalled by ``stall`` go on (killed if that fails): it reports its file spilled, with all
    five spans, and leaves no ``.tmp`` behind."""
    try:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        out, err = writer.communicate(timeout=120)
    finally:
        _stop(writer)
    assert writer.returncode == 0 and out.startswith("SPILLED"), (out, err)
    (path,) = json.loads(out.split(" ", 1)[1])
    assert [span.name for span in read_spill(Path(path)).spans] == [f"step {n}" for n in range(5)]
    assert not list(folder.glob("*.tmp"))


def _recover_later(folder: Path, clock: Clock) -> int:  # noqa: F811
    """``recover()`` in another process whose wall clock is two hours ahead of the writer's."""
    clock.set(2 * HOUR)
    done = subprocess.run([sys.executable, "-c", RECOVER, str(folder), TARGET], capture_output=True, text=True,
                          timeout=120, env=_env(**clock.env()))
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("where", ["fdopen", "fsync"], ids=["stalled-after-creating", "stalled-in-fsync"])
def test_recover_after_a_jump_forward_leaves_a_file_being_written_alone(
        tmp_path: Path, clock: Clock, where: str) -> None:  # noqa: F811
    folder = tmp_path / "spill"
    child = _writer(folder, where)
    try:
        (tmp,) = list(folder.glob("spill-*.tmp"))
        assert _recover_later(folder, clock) == 0
        assert tmp.exists() and not list(folder.glob("spill-*.otlp"))
    except BaseException:
        _stop(child)
        raise
    _finishes_whole(child, folder)


@pytest.mark.parametrize("where", ["fdopen", "fsync"], ids=["killed-after-creating", "killed-in-fsync"])
def test_recover_still_takes_the_file_of_a_writer_that_died(
        tmp_path: Path, clock: Clock, where: str) -> None:  # noqa: F811
    """The lock goes with the writer's process: its file is recovered (whole) or removed (empty)."""
    folder = tmp_path / "spill"
    child = _writer(folder, where)
    (tmp,) = list(folder.glob("spill-*.tmp"))
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=120)
    assert _recover_later(folder, clock) == 1
    assert not tmp.exists()
    recovered = list(folder.glob("spill-*.otlp"))
    if where == "fsync":  # written whole before the fsync: renamed into place
        (path,) = recovered
        assert len(read_spill(path).spans) == 5
    else:
        assert recovered == []
