"""Eighteenth campaign (attacks): who can read and plant spill files.

Spill files hold the spans the database refused (prompts, answers, code and its output, with
content capture on). They were created with ``open(path, "wb")``: mode 0644 under the usual umask
(every local user could read them) and through whatever the temporary name already was (a
symlink another user of a shared spill folder planted: the batch was written into its target,
and the symlink moved into place). The folder the store creates was 0755.

Now a spill file is created new (``O_EXCL | O_NOFOLLOW``) with mode 0600, a name already there
fails that batch and is left alone, and a folder the store creates is 0700.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmbagent_otel import phase, step, workflow
from cmbagent_otel.spill import SpillStore


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _spans(capture):
    with workflow("spill-modes", mode="one-shot"), phase("p"), step(1, "goal"):
        pass
    return capture.spans


def test_spill_files_and_their_folder_are_their_owners_alone(tmp_path: Path, capture, usual_umask) -> None:
    store = SpillStore(tmp_path / "work" / "spill", "sqlite:///x.db")
    paths = store.append(_spans(capture))
    assert paths
    assert stat.S_IMODE((tmp_path / "work" / "spill").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {0o600}
    assert [s.name for s in store.read(paths[0])]  # still read back


def test_a_name_planted_in_the_spill_folder_is_never_written_through(tmp_path: Path, usual_umask) -> None:
    folder = tmp_path / "spill"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    final = folder / "spill-00000000000000000001-1-000001-0123456789ab.otlp"
    planted = final.with_name(final.name + ".tmp")
    planted.symlink_to(victim)
    store = SpillStore(folder, "sqlite:///x.db")
    with pytest.raises(OSError):
        store._write(final, b"spans")
    assert victim.read_text() == "the user's own file\n"
    assert planted.is_symlink() and not final.exists()
