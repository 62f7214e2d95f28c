"""Spill directories hold whatever a disk, a crash or another user left there.

A file named like a spill file may be damaged in any way: bytes that are not UTF-8, JSON
nested past the recursion limit, records of the wrong type, a FIFO (opening it blocks until
someone writes), a symlink to ``/dev/zero`` (a read that never ends). Each must be set aside
as ``*.bad``, with a log line, while every good file around it is written: one bad file must
not stop replay (it is read first on every later attempt, so that would be for ever), nor
hang it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cmbagent_otel.exporters.dag import DagSpanExporter

from cmbagent_otel import phase, workflow
from cmbagent_otel.dag.database import target_of
from cmbagent_otel.spill import SpillStore, target_key

from .conftest import expected_keys, stored_spans

HEADER = b'{"format":"cmbagent-otel-spill","version":2,"target":null,"encoding":"jsonl","spans":1}\n'
CONTENT = {
    "not-utf8": b"\xff\xfe\x00garbage\n",
    "header-then-not-utf8": HEADER + b"\xff\xfe\n",
    "deep-json": HEADER + b"[" * 100_000 + b"\n",
    "record-is-a-string": HEADER + b'"str"\n',
    "record-is-null": HEADER + b"null\n",
    "truncated-protobuf": HEADER.replace(b'"jsonl","spans":1', b'"otlp-protobuf","spans":1,"bytes":3') + b"\n\x01\n",
}


def plant(directory: Path, key: str | None) -> list[str]:
    """Hostile files named as spill files of ``key``, older than any real one (replayed first)."""
    directory.mkdir(parents=True, exist_ok=True)
    tail = f"-{key}" if key else ""
    names = []
    for seq, (_, data) in enumerate(CONTENT.items(), 1):
        suffix = ".otlp" if b"otlp-protobuf" in data else ".jsonl"
        name = f"spill-{seq:020d}-1-{seq:06d}{tail}{suffix}"
        (directory / name).write_bytes(data)
        names.append(name)
    fifo = directory / f"spill-{90:020d}-1-000090{tail}.otlp"
    os.mkfifo(fifo)
    link = directory / f"spill-{91:020d}-1-000091{tail}.jsonl"
    link.symlink_to("/dev/zero")
    (directory / f"spill-{92:020d}-1-000092{tail}.otlp").mkdir()
    return [*names, fifo.name, link.name, f"spill-{92:020d}-1-000092{tail}.otlp"]


def spans_of_a_run(provider) -> list:
    with workflow("spilled", mode="one_shot"), phase("control"):
        pass
    return list(provider.memory.get_finished_spans())


def test_cli_replay_sets_every_hostile_file_aside_and_writes_the_good_ones(tmp_path: Path, provider) -> None:
    spill_dir = tmp_path / "spill"
    url = f"sqlite:///{tmp_path}/db.sqlite"
    spans = spans_of_a_run(provider)
    hostile = plant(spill_dir, None)
    SpillStore(spill_dir, target_of(url)).append(spans)
    # a subprocess, as an operator runs it; its timeout only turns a hang into a failure
    done = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "replay", "--spill-dir", str(spill_dir),
                           "--to", url], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "not valid UTF-8" not in done.stderr
    assert stored_spans(url) == expected_keys(spans)
    left = sorted(p.name for p in spill_dir.iterdir())
    assert left == sorted(name + ".bad" for name in hostile)
    assert done.stderr.count("kept as .bad") == len(hostile)


def test_exporter_replay_is_not_stopped_by_a_bad_file(tmp_path: Path, provider) -> None:
    spill_dir = tmp_path / "spill"
    url = f"sqlite:///{tmp_path}/db.sqlite"
    target = target_of(url)
    first = spans_of_a_run(provider)
    provider.memory.clear()
    hostile = plant(spill_dir, target_key(target))
    SpillStore(spill_dir, target).append(first)  # left by an earlier process
    exporter = DagSpanExporter(url, spill_dir=spill_dir, timeout=5)
    try:
        second = spans_of_a_run(provider)
        exporter.export(second)  # writes, then replays what is pending for this database
        assert exporter.stats()["replayed"] == len(first)
    finally:
        exporter.shutdown()
    assert stored_spans(url) == expected_keys([*first, *second])
    assert sorted(p.name for p in spill_dir.iterdir()) == sorted(name + ".bad" for name in hostile)
