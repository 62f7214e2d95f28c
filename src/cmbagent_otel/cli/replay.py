"""``cmbagent-otel replay``: write spilled span batches into the database each was recorded for."""

from __future__ import annotations

import argparse

from ._common import CLIError, one_line

NAME = "replay"
HELP = "write spilled span batches into the database each was recorded for"
DESCRIPTION = """\
Every spill file records its database (the URL without credentials). Without options each
file goes to its own database; --db URL replays only the files recorded for that database
(and supplies its password); --to URL writes every file, whatever it records, into URL.
Files from before spill files recorded their database are written only with --to. Every
line of output says which database was written."""


DB_HELP = ("replay only the files recorded for this database, with its password (default: every file into the "
           "database it records; $CMBAGENT_OTEL_DATABASE_URL or $CMBAGENT_DATABASE_URL, when they name that "
           "database, only supply its password)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spill-dir", default=None,
                        help="spill directory (default: $CMBAGENT_OTEL_SPILL_DIR or <work dir>/spill)")
    parser.add_argument("--to", default=None, metavar="URL",
                        help="write every spill file into this database instead of the one it records")


def run(args: argparse.Namespace) -> int:
    from ..dag.database import BadDatabaseURL
    from ..replay import replay

    try:
        problems = replay(args.spill_dir, args.db, args.to, say=_say)
    except BadDatabaseURL as exc:
        raise CLIError(str(exc)) from None
    if problems:
        raise CLIError("; ".join(problems))
    return 0


def _say(text: str) -> None:
    # a line may quote a spill file's recorded database (text from a file, not from the user) or a
    # driver's message: control characters escaped, one line each, its indent kept
    print(" " * (len(text) - len(text.lstrip(" "))) + one_line(text))
