"""Alembic environment for cmbagent-otel's tracking tables (driven from code, see dag.database)."""

from __future__ import annotations

import contextlib

from alembic import context

from cmbagent_otel.dag.database import VERSION_TABLE, make_engine
from cmbagent_otel.dag.schema import metadata

config = context.config
url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=metadata, literal_binds=True, version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # Batch mode on SQLite recreates tables; with foreign keys ON the DROP of the old
    # table would cascade-delete child rows, so migrations run with them OFF.
    engine = make_engine(url, foreign_keys=False)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            # Alembic gives each SQLite migration a transaction of its own (no transactional DDL
            # there), after reading the version once: another process upgrading meanwhile made the
            # next step's version update match no row. One transaction, begun (BEGIN IMMEDIATE)
            # before the version is read, makes concurrent upgrades take turns as on PostgreSQL.
            with connection.begin() if sqlite else contextlib.nullcontext():
                context.configure(
                    connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                    render_as_batch=sqlite,
                )
                with context.begin_transaction():
                    context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
