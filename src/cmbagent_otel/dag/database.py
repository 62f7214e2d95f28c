"""Database URL resolution, engines and the programmatic Alembic driver.

URL precedence: explicit argument > ``CMBAGENT_OTEL_DATABASE_URL`` > ``CMBAGENT_DATABASE_URL``
(cmbagent's own variable) > ``sqlite:///<work>/database/cmbagent.db`` where ``<work>`` is
``CMBAGENT_DEFAULT_WORK_DIR`` (so the file is the one cmbagent uses) or ``~/.cmbagent-otel``.
"""

from __future__ import annotations

import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

URL_ENV = "CMBAGENT_OTEL_DATABASE_URL"
CMBAGENT_URL_ENV = "CMBAGENT_DATABASE_URL"
WORK_DIR_ENV = "CMBAGENT_DEFAULT_WORK_DIR"
DEFAULT_WORK_DIR = "~/.cmbagent-otel"
VERSION_TABLE = "cmbagent_otel_alembic_version"
SQLITE_BUSY_TIMEOUT_MS = 30_000
BUSY_TIMEOUT_ENV = "CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS"


def sqlite_busy_timeout_ms() -> int:
    """How long a SQLite write waits for a lock: ``CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS`` or 30000."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV)
    if raw:
        try:
            return max(0, int(raw))
        except ValueError:
            pass
    return SQLITE_BUSY_TIMEOUT_MS


class BadDatabaseURL(ValueError):
    """The database URL cannot be parsed or names an unsupported backend."""


def default_sqlite_path() -> Path:
    """``<CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db``."""
    work = os.environ.get(WORK_DIR_ENV) or DEFAULT_WORK_DIR
    return Path(work).expanduser() / "database" / "cmbagent.db"


def resolve_url(url: str | None = None) -> str:
    """Resolve the database URL (argument > env > default) and normalise its driver."""
    chosen = url or os.environ.get(URL_ENV) or os.environ.get(CMBAGENT_URL_ENV)
    if not chosen:
        chosen = f"sqlite:///{default_sqlite_path()}"
    try:
        parsed = make_url(chosen)
    except ArgumentError as exc:
        raise BadDatabaseURL(f"invalid database URL {chosen!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BadDatabaseURL(f"unsupported database backend {backend!r} in {parsed.render_as_string()!r}")
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg (v3) is our tested driver; cmbagent's plain URLs would pick psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"


def _sqlite_pragmas(foreign_keys: bool, busy_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA cache_size=-16384")
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cur.close()
        # pysqlite's implicit BEGIN is deferred; take the write lock up front (see on_begin)
        # so a read-then-write transaction never fails to upgrade its lock.
        dbapi_conn.isolation_level = None

    return on_connect


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | None = None, *, foreign_keys: bool = True) -> Engine:
    """Create an engine for ``url`` (resolved). SQLite gets WAL, busy_timeout and FK pragmas."""
    resolved = resolve_url(url)
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        busy_ms = sqlite_busy_timeout_ms()
        engine = create_engine(
            resolved,
            connect_args={"check_same_thread": False, "timeout": busy_ms / 1000},
            poolclass=NullPool if db in (None, "", ":memory:") else None,
        )
        event.listen(engine, "connect", _sqlite_pragmas(foreign_keys, busy_ms))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(resolved, pool_pre_ping=True, pool_size=5, max_overflow=10)


# --- Alembic --------------------------------------------------------------------------

def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` built in code: script location inside the installed package."""
    from alembic.config import Config

    cfg = Config()
    location = resources.files("cmbagent_otel.migrations")
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["url"] = resolve_url(url)
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (idempotent; a no-op at head)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    """Downgrade the schema to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision recorded in ``cmbagent_otel_alembic_version`` (None if never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return ctx.get_current_revision()
    finally:
        engine.dispose()


def head_revisions() -> tuple[str, ...]:
    """The head revision(s) of the packaged migration scripts."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


_migrated: set[str] = set()
_migrate_lock = threading.Lock()


def ensure_schema(url: str | None = None) -> None:
    """Run ``upgrade head`` once per URL per process."""
    resolved = resolve_url(url)
    with _migrate_lock:
        if resolved in _migrated:
            return
        upgrade(resolved)
        _migrated.add(resolved)
