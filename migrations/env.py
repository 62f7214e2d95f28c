"""Alembic environment for cmbagent-otel's tracking tables (driven from code, see dag.database)."""

from __future__ import annotations

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
            context.configure(
                connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
