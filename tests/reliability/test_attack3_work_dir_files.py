"""The scan of a cmbagent run's work dir (its ``files`` rows) stays inside the work dir and bounded.

Found by the twenty-first campaign. ``integrations.cmbagent.work_dir_files`` walked cmbagent's output
folders with ``os.walk`` and ``os.stat``: an output folder that was a symbolic link (``data -> /proc``,
``codebase -> /etc``) was walked (its files listed as the run's, sizes and times of another tree),
a link to a file outside gave that file's size, FIFOs and sockets were listed as files, a folder of
a million entries was read whole before the entry bound was checked, and a name holding bytes that
are not UTF-8 went on the workflow span as a lone surrogate, which the OTLP encoder cannot encode:
the batch holding the run's workflow span failed to export. Now no link is followed, only regular
files are listed, a folder is read entry by entry up to the bound, and such a name shows ``\\xNN``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cmbagent_otel import semconv
from cmbagent_otel.dag.mapping import work_dir_files as stored_files
from cmbagent_otel.integrations import cmbagent as integration


def _paths(work_dir: Path) -> list[str]:
    return [entry.split("\t")[0] for entry in integration.work_dir_files(str(work_dir))]


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    work = tmp_path / "run"
    (work / "data").mkdir(parents=True)
    (work / "data" / "result.csv").write_text("a,b\n")
    (work / "codebase").mkdir()
    (work / "codebase" / "fit.py").write_text("print(1)\n")
    return work


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    other = tmp_path / "elsewhere"
    (other / "deep").mkdir(parents=True)
    (other / "private.key").write_text("x" * 1234)
    (other / "deep" / "notes.txt").write_text("y")
    return other


def test_attack3_an_output_folder_that_is_a_link_is_not_walked(work_dir: Path, outside: Path) -> None:
    (work_dir / "outputs").symlink_to(outside, target_is_directory=True)
    (work_dir / "chats").symlink_to("/etc", target_is_directory=True)
    assert _paths(work_dir) == ["data/result.csv", "codebase/fit.py"]


def test_attack3_links_inside_output_folders_are_not_followed(work_dir: Path, outside: Path) -> None:
    (work_dir / "data" / "key_copy").symlink_to(outside / "private.key")
    (work_dir / "data" / "tree").symlink_to(outside, target_is_directory=True)
    (work_dir / "data" / "loop").symlink_to(work_dir, target_is_directory=True)
    (work_dir / "codebase" / "passwd").symlink_to("/etc/passwd")
    (work_dir / "codebase" / "dangling").symlink_to(outside / "nothing")
    entries = integration.work_dir_files(str(work_dir))
    assert [e.split("\t")[0] for e in entries] == ["data/result.csv", "codebase/fit.py"]
    assert all(e.split("\t")[1] != "1234" for e in entries)


def test_attack3_fifos_and_sockets_are_not_files(work_dir: Path) -> None:
    os.mkfifo(work_dir / "data" / "pipe")  # opening it would block until a writer comes
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(work_dir / "data" / "sock"))
        assert _paths(work_dir) == ["data/result.csv", "codebase/fit.py"]
    finally:
        server.close()


def test_attack3_a_name_that_is_not_utf8_is_exportable(work_dir: Path) -> None:
    os.close(os.open(os.path.join(os.fsencode(work_dir / "data"), b"plot\xff\xfe.png"), os.O_CREAT | os.O_WRONLY))
    entries = integration.work_dir_files(str(work_dir))
    assert [e.split("\t")[0] for e in entries] == ["data/plot\\xff\\xfe.png", "data/result.csv", "codebase/fit.py"]
    # the OTLP exporters encode the workflow span carrying them (a lone surrogate failed the whole batch)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    span = provider.get_tracer("t").start_span("workflow")
    span.set_attribute(semconv.WORKFLOW_FILES, entries)
    span.end()
    encoded = encode_spans(memory.get_finished_spans()).SerializeToString()
    assert b"plot\\xff\\xfe.png" in encoded
    assert stored_files(entries)[0][0] == "data/plot\\xff\\xfe.png"


def test_attack3_names_with_newlines_and_invisible_characters_stay_one_entry(work_dir: Path) -> None:
    (work_dir / "data" / "a\nb.txt").write_text("1")
    (work_dir / "data" / "c\u200bd\u202e.txt").write_text("1")
    rows = stored_files(integration.work_dir_files(str(work_dir)))
    assert [row[0] for row in rows] == ["data/a\nb.txt", "data/c\u200bd\u202e.txt", "data/result.csv",
                                        "codebase/fit.py"]


@pytest.fixture
def counted_entries(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many directory entries were read (os.walk reads through os.scandir too)."""
    count = [0]
    real = os.scandir

    class Counting:
        def __init__(self, path: Any) -> None:
            self._it = real(path)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Counting:
            return self

        def __next__(self) -> os.DirEntry[str]:
            entry = next(self._it)
            count[0] += 1
            return entry

        def close(self) -> None:
            self._it.close()

    monkeypatch.setattr(os, "scandir", Counting)
    yield count


def test_attack3_a_huge_folder_is_read_only_up_to_the_bound(work_dir: Path, counted_entries: list[int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integration, "MAX_ENTRIES", 300)
    big = work_dir / "outputs"
    big.mkdir()
    for i in range(3000):  # as a million would be, at a test's cost
        os.close(os.open(big / f"f{i:05d}", os.O_CREAT | os.O_WRONLY))
    entries = integration.work_dir_files(str(work_dir))
    assert counted_entries[0] <= 300 + 10, counted_entries[0]
    assert entries[:2] == [e for e in entries if not e.startswith("outputs/")]  # the folders before it are whole
    assert 0 < len(entries) <= 300


def test_attack3_a_deep_tree_holds_no_descriptor_and_ends(work_dir: Path) -> None:
    path = work_dir / "data"
    for i in range(200):
        path = path / f"d{i}"
    path.mkdir(parents=True)
    (path / "bottom.txt").write_text("z")
    before = len(os.listdir("/proc/self/fd"))
    paths = _paths(work_dir)
    assert len(os.listdir("/proc/self/fd")) == before
    assert "data/result.csv" in paths and "codebase/fit.py" in paths


def test_attack3_files_gone_during_the_scan_are_skipped(work_dir: Path) -> None:
    # a file removed between listing and looking at it (the app still writing) is left out, no error
    for i in range(50):
        (work_dir / "data" / f"tmp{i}.txt").write_text("t")
    original = os.scandir

    class Removing:
        def __init__(self, path: Any) -> None:
            self._it = original(path)
            self._removed = False

        def __enter__(self) -> Removing:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Removing:
            return self

        def __next__(self) -> os.DirEntry[str]:
            entry = next(self._it)
            if entry.name.startswith("tmp"):
                os.unlink(os.path.join(work_dir, "data", entry.name))
            return entry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", Removing)
        paths = _paths(work_dir)
    assert paths == ["data/result.csv", "codebase/fit.py"]
