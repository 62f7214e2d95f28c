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
            # a database that is not there is not created to be downgraded; one never migrated has nothing
            # to go down from (Alembic said "Relative revision -1 didn't produce 1 migrations")
            if DagReader.revision(args.db) is None:
                raise CLIError(f"nothing to downgrade: {database.redacted(database.resolve_url(args.db))} "
                               "has no cmbagent-otel schema revision")
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
