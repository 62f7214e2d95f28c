"""Thirty-first campaign (attacks): the demo's ``python`` shim in a work dir another user can write.

Where this interpreter has no ``python`` beside it (only ``python3``), the demo's code executor runs
a shim that execs it. It was written to ``<work_dir>/.interpreter/python`` with ``write_text`` and
``chmod(0o755)``, following whatever that name already was: another user of a shared work dir
(``cmbagent-otel demo --work-dir /tmp/shared``) who planted it as a link had the shim written over
the link's target (a file of the user running the demo: its content replaced, made executable), and
one who planted a folder they can write could swap the shim for their own program, which the demo
then runs as the user. The shim is now made in a new folder of the demo's own (``mkdtemp``: 0700),
created new (``O_EXCL | O_NOFOLLOW``), whatever the work dir holds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cmbagent_otel import demo


@pytest.fixture
def python3_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This interpreter as a ``python3`` with no ``python`` beside it (the case that needs the shim)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "python3"
    exe.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(exe))
    return exe


def _planted(work: Path) -> Path:
    """``<work>/.interpreter`` as another user leaves it: a folder every user can write, its ``python``
    a link to a file of the victim's."""
    victim = work.parent / "victim-profile"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    planted = work / ".interpreter"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    (planted / "python").symlink_to(victim)
    return victim


def test_the_shim_is_made_in_a_new_private_folder(tmp_path: Path, python3_only: Path) -> None:
    work = tmp_path / "shared"
    victim = _planted(work)
    context = demo.interpreter_context(str(work))
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    shim_dir = Path(context.bin_path)
    assert shim_dir.parent == work and shim_dir.name != ".interpreter"
    assert stat.S_IMODE(shim_dir.lstat().st_mode) == 0o700 and shim_dir.lstat().st_uid == os.geteuid()
    shim = shim_dir / "python"
    assert stat.S_ISREG(shim.lstat().st_mode) and not stat.S_IMODE(shim.lstat().st_mode) & 0o077
    ran = subprocess.run([str(shim), "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert ran.stdout.strip() == str(sys.version_info[:2])
    assert demo.interpreter_context(str(work)).bin_path == context.bin_path  # one per work dir, not per chat
