"""What every ``cmbagent-otel`` command shares: the error type, the ``--db`` option, output helpers."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console

DB_HELP = ("database URL (default: $CMBAGENT_OTEL_DATABASE_URL, $CMBAGENT_DATABASE_URL, "
           "or <$CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db)")


class CLIError(Exception):
    """A user-facing error: one line on stderr, no traceback, exit code 2."""


def add_db_option(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--db URL``, accepted before the subcommand (``top_level``) and after it.

    After the subcommand its default is SUPPRESS, so an absent ``--db`` there leaves the
    top-level value in place instead of overwriting it with ``None``.
    """
    parser.add_argument("--db", metavar="URL", default=None if top_level else argparse.SUPPRESS, help=DB_HELP)


def console() -> Console:
    # Piped output (files, CI logs, tests) keeps full ids instead of eliding to 80 columns.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def reading(db: str | None) -> Iterator[Any]:
    """A :class:`~cmbagent_otel.dag.query.DagReader` on ``db``; read failures become :class:`CLIError`."""
    from ..dag.database import BadDatabaseURL
    from ..dag.query import DagReader, ReadError

    try:
        with DagReader(db) as reader:
            yield reader
    except (BadDatabaseURL, ReadError) as exc:
        raise CLIError(str(exc)) from None


def fmt_ms(ms: Any) -> str:
    """``850ms`` / ``2.04s``; ``-`` when unknown."""
    if ms is None:
        return "-"
    ms = float(ms)
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def fmt_cost(cost: float) -> str:
    return f"${cost:.4f}"


STATUS_STYLE = {"completed": "green", "failed": "red", "executing": "yellow", "running": "yellow"}


def styled_status(status: str) -> str:
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{status}[/{style}]"
