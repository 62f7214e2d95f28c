"""``cmbagent-otel db upgrade|current|downgrade``: the tracking schema (Alembic)."""

from __future__ import annotations

import argparse

from ._common import CLIError

NAME = "db"
HELP = "manage the tracking schema (Alembic)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "current", "downgrade"),
                        help="upgrade (creates the database if needed), current, downgrade")
    parser.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: -1)")


def run(args: argparse.Namespace) -> int:
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from ..dag import database
    from ..dag.query import DagReader, ReadError

    try:
        if args.action == "upgrade":
            database.upgrade(args.db, args.revision or "head")  # creates the database: the one writing command
        elif args.action == "downgrade":
            DagReader.revision(args.db)  # a database that is not there is not created to be downgraded
            database.downgrade(args.db, args.revision or "-1")
        current = DagReader.revision(args.db)
        print(f"{database.redacted(database.resolve_url(args.db))}: "
              f"{current or '<none>'} (head: {', '.join(database.head_revisions())})")
    except (database.BadDatabaseURL, database.ForeignTables, ReadError) as exc:
        raise CLIError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise CLIError(f"database error: {getattr(exc, 'orig', None) or exc}") from None
    except CommandError as exc:  # a revision the scripts do not know (a newer cmbagent-otel's, a typo)
        raise CLIError(f"{exc} (this cmbagent-otel knows up to {', '.join(database.head_revisions())})") from None
    return 0
