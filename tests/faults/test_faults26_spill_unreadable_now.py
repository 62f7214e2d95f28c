"""A spill file that cannot be read *now* is kept, not set aside as damaged (twenty-sixth fault campaign).

Replay took every failure to open or read a spill file for damaged content: an application at
its descriptor limit (``EMFILE``: a server with many clients, a leak), the system's file table
full (``ENFILE``), a disk I/O error, a permission not yet granted. On main c543977 the whole
backlog replayed at such a moment was renamed ``*.bad`` (never replayed again, counted neither
stored nor dropped: a log line calling each file "unreadable" and nothing else), and a complete
``.tmp`` file a dead process left was deleted as "incomplete". Now such a file stays where it is
for the next replay; only what its content or kind makes unreadable (cut, corrupt, a FIFO, a
link) is set aside, as before (``test_hostile_spill.py``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan

from cmbagent_otel.dag.database import target_of
from cmbagent_otel.spill import SpillStore

from .conftest import dump, plan_run_spans, reference


@contextlib.contextmanager
def _no_free_descriptor() -> Iterator[None]:
    """Every descriptor number the process may use is taken (EMFILE), as at an application's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, highest + 64), hard))
    taken: list[int] = []
    try:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_faults26_spill_files_unreadable_for_want_of_descriptors_are_replayed_later(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    spill_dir = tmp_path / "spill"
    first, spilled, left_behind = plan_run_spans("first"), plan_run_spans("spilled"), plan_run_spans("left behind")
    store = SpillStore(spill_dir, target_of(url))
    store.append(spilled)  # an earlier outage's backlog
    (path,) = store.append(left_behind)
    # the same batch as a complete .tmp file of a writer that died before renaming it
    pid = path.name.split("-")[2]
    path.rename(path.with_name(path.name.replace(f"-{pid}-", f"-{_dead_pid()}-") + ".tmp"))

    exporter = DagSpanExporter(url, spill_dir=spill_dir)
    exporter.replay_after_export = False
    try:
        assert exporter.export(first).name == "SUCCESS"  # the database's descriptors are open
        with _no_free_descriptor():
            exporter.replay()
        assert not list(spill_dir.glob("*.bad")), "files set aside as damaged"
        assert exporter.replay() == (len(spilled) + len(left_behind), 0)
    finally:
        exporter.shutdown()
    assert exporter.stats()["dropped"] == 0
    assert not list(spill_dir.iterdir())
    assert dump(url) == reference([*first, *spilled, *left_behind], f"sqlite:///{tmp_path}/ref.db")


def test_faults26_cli_replay_keeps_files_it_cannot_read_now(tmp_path: Path, monkeypatch: Any) -> None:
    """``cmbagent-otel replay`` (the operator's path) keeps them too, and says they are left."""
    from cmbagent_otel.replay import replay

    url = f"sqlite:///{tmp_path}/cmbagent.db"
    spill_dir = tmp_path / "spill"
    spans = plan_run_spans("spilled")
    SpillStore(spill_dir, target_of(url)).append(spans)
    said: list[str] = []
    with _no_free_descriptor():
        problems = replay(spill_dir, db=url, say=said.append)
    assert problems, said
    assert not list(spill_dir.glob("*.bad")), said
    assert replay(spill_dir, db=url, say=said.append) == [], said
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/ref.db")


def test_faults26_a_listed_file_unreadable_now_is_kept_not_set_aside(tmp_path: Path) -> None:
    """The folder was listed, then its file cannot be opened (the descriptors ran out meanwhile):
    on main the whole file went to ``.bad`` and replay reported nothing left."""
    store = SpillStore(tmp_path / "spill", target_of(f"sqlite:///{tmp_path}/cmbagent.db"))
    spans = plan_run_spans("spilled")
    store.append(spans)
    files = store.pending()
    written: list[ReadableSpan] = []
    with _no_free_descriptor():
        assert store.replay(lambda batch: written.extend(batch) is None, files=files) == (0, len(files))
    assert store.pending() == files and not list(store.directory.glob("*.bad"))
    assert store.replay(lambda batch: written.extend(batch) is None) == (len(spans), 0)
    assert len(written) == len(spans)
