"""``cmbagent-otel replay``: write spilled span batches into the database each was meant for.

Every spill file records its database (the URL without credentials). Without options each
file goes to its own database; ``--db URL`` replays only the files recorded for that
database (and supplies its password); ``--to URL`` writes every file, whatever it
records, into ``URL``. Files from before spill files recorded their database are written
only with ``--to``. Every line of output says which database was written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


def _writer_call(writer: Any, timeout: float, say: Callable[[str], None]) -> Any:
    from .dag.writer import DatabaseUnavailable
    from .spill import PermanentFailure

    def write(spans: Sequence[ReadableSpan]) -> bool:
        try:
            writer.write(spans, timeout=timeout)
        except DatabaseUnavailable:
            return False
        except Exception as exc:
            say(f"  cannot write a spilled batch: {exc}")
            raise PermanentFailure(str(exc)) from exc
        return True

    return write


def _replay_into(url: str, files: list[Path], target: str | None, timeout: float,
                 say: Callable[[str], None]) -> tuple[int, int, int]:
    """Write ``files`` into ``url``: ``(spans replayed, files left, spans set aside as .bad)``."""
    from .dag.writer import DagWriter
    from .spill import SpillStore

    bad = 0

    def rejected(_path: Path, count: int) -> None:
        nonlocal bad
        bad += count

    store = SpillStore(files[0].parent, target)
    writer = DagWriter(url)
    try:
        replayed, left = store.replay(_writer_call(writer, timeout, say), files=files, on_rejected=rejected)
    finally:
        writer.close()
    return replayed, left, bad


def replay(spill_dir: str | os.PathLike[str] | None = None, db: str | None = None, to: str | None = None,
           say: Callable[[str], None] = print) -> list[str]:
    """Write the spill files of ``spill_dir`` (default: ``CMBAGENT_OTEL_SPILL_DIR``) into the
    database each records (``db``: only the files recorded for that database; ``to``: every
    file into that database instead). Reports each database written through ``say``;
    returns the problems left (files kept), empty when everything was written.

    Raises :class:`~cmbagent_otel.dag.database.BadDatabaseURL` for an invalid ``db`` or ``to``.
    """
    from . import environment_variables
    from .dag.database import redacted, storable_url, target_of, with_credentials
    from .spill import SpillStore, SpillUnreadable, file_target

    directory = Path(spill_dir or environment_variables.get(environment_variables.SPILL_DIR))
    store = SpillStore(directory)
    timeout = float(environment_variables.get(environment_variables.EXPORT_TIMEOUT))
    only = target_of(db) if db else None
    into = storable_url(to) if to else None

    groups: dict[str | None, list[Path]] = {}
    try:
        store.recover()
        for path in store.pending():
            target = file_target(path)
            if target is None and not os.path.lexists(path):
                continue  # replayed meanwhile by another process: not one that records no database
            groups.setdefault(target, []).append(path)
    except SpillUnreadable as exc:
        return [f"{directory} cannot be read now ({exc.strerror or exc}); its spill files are kept"]
    left = 0
    problems: list[str] = []
    for target, files in sorted(groups.items(), key=lambda item: item[0] or ""):
        if into is not None:
            url = into
        elif target is None:
            left += len(files)
            problems.append(f"{len(files)} spill files do not record their database: pass --to URL to write them")
            continue
        elif only is not None and target != only:
            continue  # another database's files: not asked for
        else:
            url = with_credentials(target, environment_variables.database_url(db))
        recorded = "no recorded database" if target is None else f"recorded for {target}"
        replayed, files_left, bad = _replay_into(url, files, target if into is None else None, timeout, say)
        left += files_left
        say(f"replayed {replayed} spans from {directory} ({len(files)} files, {recorded}) into {redacted(url)}"
            + (f"; {bad} spans could not be written, files kept as .bad" if bad else ""))
        if files_left:
            problems.append(f"database {redacted(url)} is unavailable; {files_left} of its spill files are kept")
    if not groups:
        say(f"no spill files in {directory}")
    say(f"{left} spill files left")
    return problems
