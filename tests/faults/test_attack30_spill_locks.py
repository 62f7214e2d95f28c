"""Thirtieth campaign (attacks): the lock a spill writer holds on its ``.tmp`` covers exactly its writing.

Session 35 made a writer lock its ``.tmp`` (``spill._hold``) so that ``recover()`` in another process
leaves a file being written alone whatever its age. Two ways the lock did not match the writing, found on
e66d960 with a real writer process stalled in one OS call (as tests/faults/test_faults29_spill_recover.py):

* it was dropped before the rename (the file closed, then renamed): a ``recover()`` that found the whole
  ``.tmp`` unlocked and a minute old (a stalled disk, a clock step) renamed it under its writer, whose own
  rename then failed and reported the batch lost although it was on disk;
* a child forked while the file was open (another thread of the application forking) shared the lock, and
  kept it after the writer died: the dead writer's file was never recovered while the child lived.

The writer now renames its file while it holds the lock, and a forked child closes the ``.tmp`` files it
inherited (``os.register_at_fork``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmbagent_otel.spill import SpillStore, read_spill

from .test_faults29_spill_recover import TARGET, WRITER, _env, _finishes_whole, _stop

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks and fork")

# the stalled writer forks a child at the stall when asked (the child waits for stdin to close); the child
# says FORKED once os.fork() has returned in it, that is once its at-fork handlers (which close the .tmp
# files it inherited) have run: until then it shares the writer's lock, and a busy machine may run it late.
# Each line is one os.write (atomic on a pipe): print() writes its pieces one by one when the output is
# unbuffered (PYTHONUNBUFFERED, as CI's environment may set), and the two processes' pieces interleaved
# ("STALLEDFORKED", then " 2198")
FORKING_WRITER = WRITER.replace(
    '        print("STALLED", flush=True)\n',
    '        if os.environ.get("FORK_AT_STALL") and (child := os.fork()) == 0:\n'
    '            os.write(1, b"FORKED\\n")\n'
    '            sys.stdin.readline()\n'
    '            os._exit(0)\n'
    '        os.write(1, f"STALLED {os.environ.get(\'FORK_AT_STALL\') and child}\\n".encode())\n')


def _stalled_writer(folder: Path, where: str, fork: bool) -> tuple[subprocess.Popen[str], int]:
    """A writer stalled in ``os.<where>`` (and the pid of the child it forked there, or 0)."""
    env = _env(FORK_AT_STALL="1") if fork else _env()
    writer = subprocess.Popen([sys.executable, "-c", FORKING_WRITER, str(folder), where, TARGET],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    assert writer.stdout is not None and writer.stderr is not None
    lines = [writer.stdout.readline().split() for _ in range(2 if fork else 1)]  # in either order
    stalled = [line for line in lines if line[:1] == ["STALLED"]]
    if not (stalled and (not fork or ["FORKED"] in lines)):
        # both (writer and child) killed first: their stderr's end comes only once neither holds it
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=120)
        raise AssertionError(f"stdout {lines}{writer.stdout.read()!r}, stderr {writer.stderr.read()!r}")
    return writer, int(stalled[0][1]) if fork else 0


def _age(tmp: Path, seconds: float) -> None:
    """The file's mtime ``seconds`` in the past: a write stalled that long, or a clock stepped."""
    then = time.time() - seconds
    os.utime(tmp, (then, then))


def test_a_whole_tmp_is_not_taken_between_its_writers_close_and_rename(tmp_path: Path) -> None:
    """Fails on e66d960: recover() renamed the file (1 handled) and the writer reported FAILED."""
    folder = tmp_path / "spill"
    writer, _ = _stalled_writer(folder, "replace", fork=False)
    try:
        (tmp,) = list(folder.glob("spill-*.tmp"))
        _age(tmp, 120)
        assert SpillStore(folder, TARGET).recover() == 0
        assert tmp.exists() and not list(folder.glob("spill-*.otlp"))
    except BaseException:
        _stop(writer)
        raise
    _finishes_whole(writer, folder)


def test_a_child_forked_mid_write_does_not_keep_a_dead_writers_file_locked(tmp_path: Path) -> None:
    """Fails on e66d960: recover() handled 0 files while the forked child lived."""
    folder = tmp_path / "spill"
    writer, child = _stalled_writer(folder, "fsync", fork=True)
    try:
        (tmp,) = list(folder.glob("spill-*.tmp"))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=120)
        assert SpillStore(folder, TARGET).recover() == 1
        assert not tmp.exists()
        (path,) = list(folder.glob("spill-*.otlp"))
        assert len(read_spill(path).spans) == 5
    finally:
        _stop(writer)
        writer.communicate(timeout=120)  # closes its stdin: the child reads the end and exits
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
