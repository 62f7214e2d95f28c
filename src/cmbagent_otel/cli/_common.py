"""What every ``cmbagent-otel`` command shares: the error type, the ``--db`` option, output helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..redaction import REDACTED, RedactionCache, is_secret_key

DB_HELP = ("database URL (default: $CMBAGENT_OTEL_DATABASE_URL, $CMBAGENT_DATABASE_URL, "
           "or <$CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db)")


class CLIError(Exception):
    """A user-facing error: one line on stderr, no traceback, exit code 2."""


def shown(value: Any, display: bool = False) -> Any:
    """``value`` (rows read for display) with every string redacted and secret-named keys'
    text hidden, other values as they are: rows our writer stored are scrubbed already, but
    rows another writer stored (cmbagent's own tracking) or an older version stored (before a
    key shape was known) were printed as they were. ``display``: for a table, tree or picture,
    which show :data:`FIELD_CHARS` of a field: only a prefix of a longer string is redacted."""
    if type(value) is str:
        if display and len(value) > _DISPLAY_PREFIX:
            value = value[:_DISPLAY_PREFIX]
        return _shown_memo.redact(value)
    if isinstance(value, dict):
        return {key: REDACTED if type(item) is str and type(key) is str and is_secret_key(key)
                else shown(item, display) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [shown(item, display) for item in value]
    return value


#: the characters of one field (a name, an id, a mode) a table, tree or picture shows: another writer's
#: row may hold megabytes there (a 2 MB agent name on each event of a demo run made ``events`` print
#: 569 MB in 7 minutes, 3.5 GB of memory)
FIELD_CHARS = 256
_DISPLAY_PREFIX = 1 << 16  # redacted whole, so no secret is cut before the field's cut


_shown_memo = RedactionCache(max_len=8192, max_chars=4_000_000)


def json_text(value: Any) -> str:
    """``value`` (rows read for display) as JSON text. A non-finite number another writer stored (a
    cost of 1e999, ``NaN`` inside a row's JSON meta) is ``null``: ``json.dumps`` wrote ``NaN`` and
    ``Infinity``, which strict JSON readers (``jq``, JavaScript) refuse."""
    try:
        return json.dumps(value, indent=2, default=str, allow_nan=False)  # another writer's bytes: str
    except ValueError:
        return json.dumps(_finite(value), indent=2, default=str)


def _finite(value: Any) -> Any:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value

#: the largest count an option takes (SQLite's INTEGER and PostgreSQL's BIGINT hold it)
MAX_COUNT = 2**63 - 1


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a bad one is argparse's usage error, exit 2).
    A larger one than :data:`MAX_COUNT` means "all" and is cut to it (``--limit 10**20`` made the
    database driver raise ``OverflowError``: a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return min(value, MAX_COUNT)


def one_line(value: Any) -> str:
    """:func:`plain` on one line: a driver's message (libpq's ``\n\tIs the server running...``)
    or a row quoted in it must not break the one-line error the CLI promises."""
    return " ".join(plain(value).split())


def add_db_option(parser: argparse.ArgumentParser, *, top_level: bool = False, help: str | None = None) -> None:
    """``--db URL``, accepted before the subcommand (``top_level``) and after it; ``help``: what
    it means for a command that does not simply read or write that database (``replay``).

    After the subcommand its default is SUPPRESS, so an absent ``--db`` there leaves the
    top-level value in place instead of overwriting it with ``None``.
    """
    parser.add_argument("--db", metavar="URL", default=None if top_level else argparse.SUPPRESS,
                        help=help or DB_HELP)


# C0 and C1 control characters (ESC starts terminal escape sequences: retitle the window, clear the
# screen, rewrite earlier lines; U+009B is a one-character CSI) and bidirectional overrides, which
# reorder what a reader sees, with the directional marks (ALM, LRM, RLM) and the line and paragraph
# separators (U+2028, U+2029) as the ingest's log lines escape them; tab and newline are layout, kept
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}
_CONTROL.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))})
# invisible characters: zero-width space, joiners and word joiner, BOM, soft hyphen, Hangul fillers,
# Mongolian vowel separator, invisible operators, interlinear annotations (two names that look the
# same, "engineer" and "engi\u200bneer", or text a reader cannot see), and Unicode tags (U+E0000-E007F:
# ASCII written invisibly, "ASCII smuggling")
_CONTROL.update({c: f"\\u{c:04x}" for c in (0x00AD, 0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E,
                                             *range(0x200B, 0x200E), *range(0x2060, 0x2066),
                                             *range(0x206A, 0x2070), 0x3164, 0xFEFF, 0xFFA0,
                                             *range(0xFFF9, 0xFFFC))})
_CONTROL.update({c: f"\\U{c:08x}" for c in range(0xE0000, 0xE0080)})
# one field (a name, an id, a status): a newline in it would print as a line of its own, a forged tree
# line or table row ("engineer\n└── step_9 (step) completed")
_FIELD = {**_CONTROL, 0x0A: "\\x0a"}


def plain(value: Any) -> str:
    """``str(value)`` with control characters shown as ``\\xNN`` escapes: text read from a database
    (another writer's, an ingest client's) must not drive the terminal it is printed on."""
    return str(value).translate(_CONTROL)


def field(value: Any) -> str:
    """:func:`plain` for one field (a name, an id, a status): its newlines escaped too, cut to
    :data:`FIELD_CHARS`."""
    return cut(value).translate(_FIELD)


def cut(value: Any) -> str:
    """``str(value)``, cut to :data:`FIELD_CHARS` characters (the last one an ellipsis)."""
    text = str(value)
    return text if len(text) <= FIELD_CHARS else text[:FIELD_CHARS - 1] + "…"


def markup(value: Any) -> str:
    """``value`` (one field) as literal text inside rich markup: :func:`field`, with markup brackets
    escaped."""
    return escape(field(value))


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
            odd = list(dict.fromkeys(reader.odd_values))
            if odd:  # another writer's values shown as stored: said once, on stderr, not in the output
                more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
                print(f"warning: {one_line(shown(reader.where))}: {len(odd)} stored value(s) of another writer "
                      f"could not be read as their column's type: {one_line(shown('; '.join(odd[:3])))}{more}",
                      file=sys.stderr)
    except (BadDatabaseURL, ReadError) as exc:
        raise CLIError(str(exc)) from None


def fmt_ms(ms: Any) -> str:
    """``850ms`` / ``2.04s``; ``-`` when unknown (or not a number)."""
    try:
        ms = float(ms)
    except (TypeError, ValueError):  # None, or another writer's text in an INTEGER column
        return "-"
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def fmt_cost(cost: float) -> str:
    return f"${cost:.4f}"


STATUS_STYLE = {"completed": "green", "failed": "red", "executing": "yellow", "running": "yellow"}


def styled_status(status: str) -> str:
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{markup(status)}[/{style}]"
