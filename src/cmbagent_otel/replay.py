"""``cmbagent-otel replay``: write spilled span batches into the database each was meant for.

Every spill file records its database (the URL without credentials). Without options each
file goes to its own database; ``--db URL`` replays only the files recorded for that
database (and supplies its password); ``--to URL`` writes every file, whatever it
records, into ``URL``. Files from before spill files recorded their database are written
only with ``--to``. Every line of output says which database was written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


def _writer_call(writer: Any, timeout: float) -> Any:
    from .dag.writer import DatabaseUnavailable
    from .spill import PermanentFailure

    def write(spans: Sequence[ReadableSpan]) -> bool:
        try:
            writer.write(spans, timeout=timeout)
        except DatabaseUnavailable:
            return False
        except Exception as exc:
            print(f"  cannot write a spilled batch: {exc}")
            raise PermanentFailure(str(exc)) from exc
        return True

    return write


def _replay_into(url: str, files: list[Path], target: str | None, timeout: float) -> tuple[int, int, int]:
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
        replayed, left = store.replay(_writer_call(writer, timeout), files=files, on_rejected=rejected)
    finally:
        writer.close()
    return replayed, left, bad


def _cmd_replay(args: argparse.Namespace) -> int:
    from .cli import CLIError
    from .dag.database import BadDatabaseURL, redacted, resolve_url, target_of, with_credentials
    from .exporters.dag import _timeout, default_spill_dir
    from .spill import SpillStore, file_target

    spill_dir = Path(args.spill_dir or default_spill_dir())
    store = SpillStore(spill_dir)
    store.recover()
    timeout = _timeout(None)
    try:
        only = target_of(args.db) if args.db else None
        to = resolve_url(args.to) if args.to else None
    except BadDatabaseURL as exc:
        raise CLIError(str(exc)) from None

    groups: dict[str | None, list[Path]] = {}
    for path in store.pending():
        groups.setdefault(file_target(path), []).append(path)
    left = 0
    problems: list[str] = []
    for target, files in sorted(groups.items(), key=lambda item: item[0] or ""):
        if to is not None:
            url = to
        elif target is None:
            left += len(files)
            problems.append(f"{len(files)} spill files do not record their database: pass --to URL to write them")
            continue
        elif only is not None and target != only:
            continue  # another database's files: not asked for
        else:
            url = with_credentials(target, args.db or os.environ.get("CMBAGENT_OTEL_DATABASE_URL")
                                   or os.environ.get("CMBAGENT_DATABASE_URL"))
        recorded = "no recorded database" if target is None else f"recorded for {target}"
        replayed, files_left, bad = _replay_into(url, files, target if to is None else None, timeout)
        left += files_left
        print(f"replayed {replayed} spans from {spill_dir} ({len(files)} files, {recorded}) into {redacted(url)}"
              + (f"; {bad} spans could not be written, files kept as .bad" if bad else ""))
        if files_left:
            problems.append(f"database {redacted(url)} is unavailable; {files_left} of its spill files are kept")
    if not groups:
        print(f"no spill files in {spill_dir}")
    print(f"{left} spill files left")
    if problems:
        raise CLIError("; ".join(problems))
    return 0


def add_replay_parser(subparsers: Any) -> None:
    """Register ``cmbagent-otel replay``."""
    parser = subparsers.add_parser(
        "replay", help="write spilled span batches into the database each was recorded for",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spill-dir", default=None,
                        help="spill directory (default: $CMBAGENT_OTEL_SPILL_DIR or <work dir>/spill)")
    parser.add_argument("--to", default=None, metavar="URL",
                        help="write every spill file into this database instead of the one it records")
    parser.set_defaults(func=_cmd_replay)
