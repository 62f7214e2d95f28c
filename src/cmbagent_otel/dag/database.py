"""Database URL resolution, engines and the programmatic Alembic driver.

URL precedence: explicit argument > ``CMBAGENT_OTEL_DATABASE_URL`` > ``CMBAGENT_DATABASE_URL``
(cmbagent's own variable) > ``sqlite:///<work>/database/cmbagent.db`` where ``<work>`` is
``CMBAGENT_DEFAULT_WORK_DIR`` (so the file is the one cmbagent uses) or ``~/.cmbagent-otel``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import functools
import hashlib
import itertools
import logging
import math
import operator
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, set_value
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from .. import environment_variables
from .._context import attach, detach
from .._forksafe import closer, hold_fd, open_into, reset_in_child
from .._varblock import CExit, VarSet
from ..redaction import is_secret_key
from ._watchdog import WATCHED, watchdog

VERSION_TABLE = "cmbagent_otel_alembic_version"
SQLITE_BUSY_TIMEOUT_MS = 30_000
BUSY_TIMEOUT_ENV = "CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS"
PG_CONNECT_TIMEOUT_S = 10  # libpq's own default is to wait as long as the OS does
# Bytes a SQLite WAL is cut back to when a writer starts it over (PRAGMA journal_size_limit). A reader
# holding one snapshot for long (a backup, a shell or UI left in a transaction) keeps every commit
# meanwhile in the WAL; SQLite reuses that file from its start afterwards but never shrinks it, so a
# 4 MB database kept a 42 MB WAL for as long as a writer's connection stayed open (an ingest server:
# days). Normal use never reaches this (the WAL is checkpointed at ~4 MB), so nothing is cut then.
WAL_SIZE_LIMIT = 16 << 20
# Credentials that may sit in a URL's query string; never written into a spill file.
_SECRET_QUERY_KEYS = frozenset({"password", "passfile", "sslpassword", "sslkey", "token", "auth_token", "api_key"})

_SCHEME = re.compile(r"[A-Za-z][\w+.-]{0,40}")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("cmbagent_otel_db_deadline", default=None)


def deadline(seconds: float | None) -> contextlib.AbstractContextManager[Any]:
    """Bound every database wait inside the block to ``seconds`` from now (``None``: no bound).

    Read when a connection is opened and when a transaction begins: SQLite's busy timeout,
    PostgreSQL's ``connect_timeout``, ``lock_timeout`` and ``statement_timeout`` are set to
    the time left (a nested block never extends an outer one). Reset however the block is left
    (:class:`~cmbagent_otel._varblock.VarSet`: a Ctrl-C as it was entered or left kept a passed
    deadline on the thread, every later write of ours there timed out at once).
    """
    if seconds is None:
        return contextlib.nullcontext()
    end = time.monotonic() + max(0.0, seconds)
    outer = _deadline.get()
    return VarSet(_deadline.set, _deadline.reset, end if outer is None else min(outer, end))


def time_left_ms() -> int | None:
    """Milliseconds left before the current :func:`deadline` (0 when passed), or ``None``."""
    end = _deadline.get()
    if end is None:
        return None
    return max(0, int((end - time.monotonic()) * 1000))


def sqlite_busy_timeout_ms() -> int:
    """How long a SQLite write waits for a lock: ``CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS`` or 30000."""
    return int(environment_variables.get(BUSY_TIMEOUT_ENV))


class BadDatabaseURL(ValueError):
    """The database URL cannot be parsed or names an unsupported backend."""


def default_sqlite_path() -> Path:
    """``<CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db``."""
    return environment_variables.default_sqlite_path()


def _raw_credentials(url: str) -> str:
    """``url`` with a password that holds a raw ``@`` (``postgresql://u:p@ss/w0rd@db/x``) percent-encoded.

    SQLAlchemy ends the password at the first ``@``: it connected to host ``ss``, database
    ``w0rd@db/x``, and every message and spill header naming the database showed ``ss/w0rd``.
    The credentials are what comes before the last ``@`` of the URL's address (before any
    ``?``), unless that would make a host, port and path part of them: a database name holding
    a raw ``@`` after a port (``postgres@db:5432/lab@x``), or after a host when there is no
    password (``postgres@db/lab@x``), is the database's. Without a port, a password and such a
    database name (``u:pw@db/lab@x``) cannot be told from a password holding ``@`` and ``/``:
    it reads as part of the password (fails to connect, shows nothing)."""
    scheme, sep, rest = url.partition("://")
    address, qmark, query = rest.partition("?")
    if not sep or address.startswith("/") or address.count("@") < 2:
        return url
    at = address.rindex("@")
    while not _credentials_at(address, at):  # an "@" in the database name (postgres@host:5432/lab@x)
        earlier = address.rfind("@", 0, at)
        if earlier < 0:
            at = address.rindex("@")
            break
        at = earlier
    userinfo, host = address[:at], address[at + 1:]
    user, colon, password = userinfo.partition(":")  # a user name has no ":", a password may
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if colon else "")
    # SQLAlchemy would take the database name's "@" for the credentials' end: escaped, it reads it back
    return f"{scheme}://{credentials}@{host.replace('@', '%40')}{qmark}{query}"


# a host and port followed by a path: "127.0.0.1:5432/" read as part of a password or user name
_EMBEDDED_HOST_PORT = re.compile(r"@[^@/:]+:\d{1,5}/")


def _credentials_at(address: str, at: int) -> bool:
    """Whether ``address[:at]`` can be the credentials: not when it is a user name holding a
    "/" (no user name does: a host and path), nor when it holds a host, port and path
    (``postgres@127.0.0.1:5432/lab``, ``u:pw@db:5432/lab``) and what follows is no host and
    path of its own: then the "@" is the database name's."""
    userinfo = address[:at]
    if "/" in userinfo.partition(":")[0]:
        return False
    return "/" in address[at + 1:] or _EMBEDDED_HOST_PORT.search(userinfo) is None


def resolve_url(url: str | None = None) -> str:
    """Resolve the database URL (argument > env > default) and normalise its driver."""
    chosen = _raw_credentials(environment_variables.database_url(url))
    try:
        parsed = make_url(chosen)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        # the text may hold a password, and so may the error's: a password without its "@"
        # (postgresql://user:<password>/db) is read as the port, quoted by int()'s ValueError
        scheme = chosen.partition("://")[0] if "://" in chosen else ""
        scheme = scheme if _SCHEME.fullmatch(scheme) else "?"
        reason = "what follows the host's ':' is not a port number (a password without its '@'?)" \
            if isinstance(exc, ValueError) else "not a URL"
        raise BadDatabaseURL(f"invalid database URL ({scheme}://...): {reason}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BadDatabaseURL(f"unsupported database backend {backend!r} in {redacted(parsed)!r}")
    if parsed.drivername not in ("postgresql", "sqlite"):
        try:
            parsed.get_dialect()
        except NoSuchModuleError:
            raise BadDatabaseURL(f"unknown database driver {parsed.drivername!r} in {redacted(parsed)!r}") from None
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg (v3) is our tested driver; cmbagent's plain URLs would pick psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite" and parsed.database and parsed.database.startswith("~"):
        # SQLite would open a file under a folder literally named "~" of the working directory
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    return parsed.render_as_string(hide_password=False)


def pinned_url(url: str | None = None) -> str:
    """:func:`resolve_url` with a relative SQLite file path made absolute now.

    SQLite opens a relative path in the working directory of the moment: an exporter built
    before the application changed directory (cmbagent's work dirs, a job's scratch folder)
    took the change for its file being deleted, made a new database in the new directory and
    wrote the rest of the run there, apart from its spill store's target. A writer names the
    file once, when it is made."""
    resolved = resolve_url(url)
    path = sqlite_file(resolved)
    if path is None or path.is_absolute():
        return resolved
    return make_url(resolved).set(database=_absolute(str(path))).render_as_string(hide_password=False)


def _absolute(path: str) -> str:
    try:
        return str(Path(path).expanduser().absolute())
    except OSError as exc:  # os.getcwd() of a deleted working directory
        raise BadDatabaseURL(f"the SQLite file {path!r} is relative to a working directory that no longer "
                             f"exists ({exc.strerror or exc}); name it by an absolute path") from None


def redacted(url: str | URL) -> str:
    """``url`` with its password and secret query parameters (``sslpassword=``...) hidden, for messages."""
    try:
        parsed = make_url(_raw_credentials(url) if isinstance(url, str) else url)
        secret = [k for k in parsed.query if _secret_query_key(k)]
        return parsed.difference_update_query(secret).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<invalid url>"


def _secret_query_key(key: str) -> bool:
    """A query parameter whose value is a credential: libpq's (``password``, ``sslpassword``...) or any
    secret-named one (``pwd=``, ``client_secret=``: a driver or proxy of another's)."""
    return key.lower() in _SECRET_QUERY_KEYS or is_secret_key(key)


def storable_url(url: str | None = None) -> str:
    """:func:`resolve_url`, refusing an in-memory SQLite database (``sqlite://``,
    ``sqlite:///:memory:``, ``file:…?mode=memory``) with :class:`BadDatabaseURL`: each
    connection would get its own empty database, so every batch would find no schema and go
    to the spill store for ever, bound to a database no process could replay it into."""
    resolved = resolve_url(url)
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite" and environment_variables.in_memory_sqlite(parsed.database, parsed.query):
        raise BadDatabaseURL(f"{redacted(parsed)!r} is an in-memory SQLite database: nothing written to it "
                             "could be read back; name a file (sqlite:///path/to/file.db)")
    return resolved


def target_of(url: str | None = None) -> str:
    """The database ``url`` names, without credentials: resolved, password and secret query
    parameters removed, a SQLite file path made absolute. Two URLs of one database give the
    same text, so it identifies where spilled spans belong. An in-memory SQLite database is
    no target (:func:`storable_url`)."""
    parsed = make_url(storable_url(url))
    query = {k: v for k, v in parsed.query.items() if not _secret_query_key(k)}
    # URL.set() cannot remove a password (None means "unchanged"): build the URL again
    parsed = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, query)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:"):
        parsed = parsed.set(database=_absolute(parsed.database))
    return parsed.render_as_string(hide_password=False)


def with_credentials(target: str, url: str | None) -> str:
    """``target`` (from :func:`target_of`) with the password of ``url`` when ``url`` names the
    same database; otherwise ``target`` itself (libpq still reads ``PGPASSWORD``/``~/.pgpass``)."""
    if url is not None:
        try:
            if target_of(url) == target:
                return resolve_url(url)
        except BadDatabaseURL:
            pass
    return target


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` (``None`` for PostgreSQL and in-memory databases)."""
    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser()


def _attempt_busy_ms(configured: int) -> int:
    left = time_left_ms()
    return configured if left is None else min(configured, left)


def _sqlite_pragmas(foreign_keys: bool, busy_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={_attempt_busy_ms(busy_ms)}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA cache_size=-8192")
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cur.close()
        # pysqlite's implicit BEGIN is deferred; take the write lock up front (see on_begin)
        # so a read-then-write transaction never fails to upgrade its lock.
        dbapi_conn.isolation_level = None

    return on_connect


def _sqlite_begin(busy_ms: int) -> Any:
    def on_begin(conn: Any) -> None:
        # Each transaction waits for the write lock at most the time left before the
        # caller's deadline (see ``deadline``); a pooled connection keeps its last value.
        wait = _attempt_busy_ms(busy_ms)
        info = conn.connection.info
        if info.get("busy_ms") != wait:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={wait}")
            info["busy_ms"] = wait
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return on_begin


def _pg_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    left = time_left_ms()
    if left is not None:
        # libpq counts whole seconds and treats 1 as 2
        cparams["connect_timeout"] = max(2, math.ceil(left / 1000))
    else:
        cparams.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)


TIMEOUTS_SQL = "SELECT set_config('lock_timeout', %(w)s, true), set_config('statement_timeout', %(w)s, true)"
# Connection-info keys: a caller that sends the timeouts itself as its transaction's first
# statement (the DAG writer's pipeline, :meth:`cmbagent_otel.dag.statements.Sql.batch`) sets
# DEFER_TIMEOUTS before beginning; the begin hook then leaves their parameters in TIMEOUTS.
DEFER_TIMEOUTS = "cmbagent_otel_defer_timeouts"
TIMEOUTS = "cmbagent_otel_timeouts"


def _pg_begin(conn: Any) -> None:
    info = conn.info
    defer = info.pop(DEFER_TIMEOUTS, False)
    info.pop(TIMEOUTS, None)
    left = time_left_ms()
    if left is None:
        return
    params = {"w": str(max(1, left))}  # 0 would mean "no timeout"
    if defer:
        info[TIMEOUTS] = params
    else:
        conn.exec_driver_sql(TIMEOUTS_SQL, params)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def creation_lock(path: Path) -> contextlib.AbstractContextManager[Any]:
    """Hold an exclusive ``flock`` on the folder of the SQLite file ``path`` (other processes and
    threads wait): creating the file and removing the ``-wal``/``-shm`` a deleted file left take
    turns. A writer that found the file gone and then removed those names removed the live files
    of a database another writer had created meanwhile ("disk I/O error" for every other
    connection). Nothing slow runs under it, and a child forked while it is held closes its copy
    (:func:`~cmbagent_otel._forksafe.hold_fd`): it kept the lock for its whole life. Without
    ``flock`` (Windows, a file system refusing it) the block runs unlocked, as before.

    The wait is bounded as a database lock's is (the :func:`deadline`'s time left, at most the
    SQLite busy timeout): past it ``TimeoutError`` (an ``OSError``: retryable, the batch is
    spilled). Reading a folder is enough to ``flock`` it, so any process that can list a shared
    folder held this wait, and with it the export thread and the application's exit, for as long
    as it kept the lock.

    Let go however the block is left (:class:`~cmbagent_otel._varblock.CExit`: a Ctrl-C as the block was
    entered or left kept the descriptor and its lock while the interrupt's traceback was kept)."""
    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()
    return _FolderLock(path, fcntl)


class _FolderLock(CExit):
    """:func:`creation_lock`'s block: its exit closes the folder's descriptor (:func:`~cmbagent_otel._forksafe.closer`:
    forgotten after the close, so a child forked before it closes its copy)."""

    def __init__(self, path: Path, fcntl: Any) -> None:
        super().__init__()
        self._path = path
        self._fcntl = fcntl
        self._opened: list[int] = []
        self.close = closer(self._opened)  # type: ignore[method-assign]

    def __enter__(self) -> _FolderLock:
        try:  # from the descriptor's opening: a Ctrl-C as os.open returned (or at hold_fd's call) leaked it
            try:
                fd = open_into(self._opened, self._path.parent,
                               os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return self  # unlocked, as without flock
            hold_fd(fd)  # a child forked meanwhile (another thread's multiprocessing worker) must not keep it
            _flock_within(fd, self._path, self._fcntl)
        except BaseException:  # the block is not entered: its exit never runs
            self.close()
            raise
        return self


def _flock_within(fd: int, path: Path, fcntl: Any) -> None:
    """``flock(fd, LOCK_EX)``, tried again until :func:`creation_lock`'s bound; a file system
    refusing ``flock`` is let through unlocked."""
    left = time_left_ms()
    end = time.monotonic() + min(sqlite_busy_timeout_ms(), left if left is not None else math.inf) / 1000
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:
            return
        left_s = end - time.monotonic()
        if left_s <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "another process holds the lock of the SQLite database's folder",
                               str(path.parent))
        time.sleep(min(pause, left_s))  # flock has no timeout of its own
        pause = min(pause * 2, 0.05)


def _create_private(path: Path) -> None:
    """Create the SQLite file ``path`` readable by its owner alone (0600) when there is none, before
    SQLite does: SQLite gives a new file the umask's mode (0644 usually), and its ``-wal``, ``-shm``
    and ``-journal`` files copy the database file's, while they hold prompts, answers and code
    output. A file already there keeps its mode (never changed); a symbolic link to nothing is
    refused (SQLite would create the file wherever it points: a link planted in a shared folder).
    Created under :func:`creation_lock`."""
    if not os.path.lexists(path):  # most calls (a connection to a file that is there): no lock
        with creation_lock(path):
            opened: list[int] = []
            close = closer(opened)
            try:
                open_into(opened, path, _CREATE_FLAGS, 0o600)
                return
            except FileExistsError:
                pass
            finally:
                close()  # a Ctrl-C as the open returned leaked it, and the folder's lock
    if path.is_symlink() and not path.exists():
        raise PermissionError(errno.ELOOP, "refusing to create the SQLite database through a symbolic link "
                              "to nothing", str(path))


def make_engine(url: str | None = None, *, foreign_keys: bool = True) -> Engine:
    """Create an engine for ``url`` (resolved). SQLite gets WAL, busy_timeout and FK pragmas."""
    resolved = resolve_url(url)
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        busy_ms = sqlite_busy_timeout_ms()
        engine = create_engine(
            resolved,
            connect_args={"check_same_thread": False, "timeout": busy_ms / 1000},
            poolclass=NullPool if db in (None, "", ":memory:") else None,
        )
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db).expanduser()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(path)
            event.listen(engine, "do_connect", lambda *_args: _create_private(path))  # made again if deleted
        event.listen(engine, "connect", _sqlite_pragmas(foreign_keys, busy_ms))
        event.listen(engine, "begin", _sqlite_begin(busy_ms))
        return engine
    # no pool_pre_ping: its ping runs before any hook could bound it; _pg_checkout pings instead
    engine = create_engine(resolved, pool_size=5, max_overflow=10)
    event.listen(engine, "do_connect", _pg_connect)
    event.listen(engine, "begin", _pg_begin)
    event.listen(engine, "connect", _pg_fresh)
    event.listen(engine, "checkout", _pg_checkout(engine.dialect, redacted(parsed)))
    for name in ("checkin", "close", "detach", "invalidate", "soft_invalidate"):
        event.listen(engine, name, _pg_disarm)
    return engine


_FRESH = "cmbagent_otel_fresh"


def _pg_fresh(_dbapi_conn: Any, record: Any) -> None:
    record.info[_FRESH] = True


def _pg_checkout(dialect: Any, label: str) -> Any:
    def on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        """Arm the deadline watchdog for the time the connection is out (a server that stops
        answering runs no ``statement_timeout``), then ping a pooled connection, as
        ``pool_pre_ping`` would: a dead one raises ``DisconnectionError``, and the pool connects
        anew (unless the deadline has passed: then the ping's own error ends the attempt)."""
        _pg_disarm(dbapi_conn, record)
        end = _deadline.get()
        if end is not None:
            with contextlib.suppress(Exception):
                watchdog.arm(dbapi_conn.fileno(), end, label, record.info)  # holds the token as it arms
        if record.info.pop(_FRESH, False):
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            if end is not None and time.monotonic() >= end:
                raise
            raise DisconnectionError(str(exc)) from exc

    return on_checkout


def _pg_disarm(_dbapi_conn: Any, record: Any = None, *_args: Any) -> None:
    info = getattr(record, "info", None)
    if info is not None:
        watchdog.disarm(info.pop(WATCHED, None))


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
    """Upgrade the schema to ``revision`` (idempotent; a no-op at head).

    On PostgreSQL concurrent upgrades of one database (several processes starting at
    once) take turns on an advisory lock; on SQLite the migration's ``BEGIN IMMEDIATE``
    already makes them take turns.
    """
    from alembic import command

    cfg = alembic_config(url)
    with _migration_lock(cfg.attributes["url"]):
        command.upgrade(cfg, revision)
    if revision == "head":
        _check_columns(cfg.attributes["url"])


class ForeignTables(RuntimeError):
    """A table of our schema's names lacks columns the writer fills: it belongs to another
    application (the migration keeps every table it finds, cmbagent's own included)."""


def _check_columns(url: str) -> None:
    """Raise :class:`ForeignTables` when a table the exporter writes lacks a column of the
    schema: the migration stamped head, but every write would fail (``no column named ...``).
    cmbagent's other tables are left as found (the exporter never writes them)."""
    from sqlalchemy import inspect

    from .schema import TRACKING_TABLES, metadata

    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        existing = set(inspector.get_table_names())
        lacking = {name: sorted(set(table.columns.keys()) - {c["name"] for c in inspector.get_columns(name)})
                   for name, table in metadata.tables.items() if name in existing and name in TRACKING_TABLES}
    finally:
        engine.dispose()
    lacking = {name: columns for name, columns in lacking.items() if columns}
    if lacking:
        raise ForeignTables(
            f"{redacted(url)}: " + "; ".join(f"table {name} lacks {', '.join(columns)}"
                                            for name, columns in sorted(lacking.items()))
            + " (another application's tables of the same names?): cmbagent-otel cannot write there")


def create_if_empty(url: str | None = None) -> bool:
    """On a database without any table (a new SQLite file, an empty PostgreSQL schema): create
    the head schema from the models and record the head revision in the version table, in one
    transaction, without importing Alembic (~0.2 s of CPU, ~25,000 objects, and its migration
    scripts' work). The result is what ``upgrade head`` makes (``tests/dag/test_migrations.py``
    compares both with the models). Returns False, having changed nothing, when the database
    holds any table: Alembic's ``upgrade`` then decides (an older schema, cmbagent's own tables).

    Concurrent first starts take turns as :func:`upgrade`'s do (PostgreSQL: the advisory lock;
    SQLite: ``BEGIN IMMEDIATE``); the later ones find the tables and return False.
    """
    from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect

    from .schema import metadata

    heads = script_heads()
    if len(heads) != 1:
        return False
    resolved = resolve_url(url)
    with _migration_lock(resolved):
        engine = make_engine(resolved)
        try:
            with engine.begin() as conn:
                if inspect(conn).get_table_names():
                    return False
                metadata.create_all(conn)
                # Alembic's own definition of its version table (alembic.ddl.impl)
                version = Table(VERSION_TABLE, MetaData(), Column("version_num", String(32), nullable=False),
                                PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"))
                version.create(conn)
                conn.execute(version.insert().values(version_num=next(iter(heads))))
        finally:
            engine.dispose()
    return True


def _migration_lock(url: str) -> contextlib.AbstractContextManager[object]:
    """PostgreSQL: a session-level advisory lock on ``url``'s schema held inside the block (concurrent
    migrations take turns), let go however the block is left (:class:`_MigrationLock`)."""
    if make_url(url).get_backend_name() != "postgresql":
        return contextlib.nullcontext()
    return _MigrationLock(url)


def _migration_key(url: str) -> int:
    """The advisory lock key concurrent migrations of ``url``'s schema take turns on."""
    return int.from_bytes(hashlib.blake2b(f"cmbagent-otel migrate {target_of(url)}".encode(),
                                          digest_size=8).digest(), "big", signed=True)


# the held connection-ending method called by C code: psycopg 3's ``pgconn.finish`` (libpq's PQfinish; C with
# psycopg's C or binary implementation) or psycopg2's ``connection.close`` (C)
_FINISH = operator.methodcaller("__call__")


class _MigrationLock(CExit):
    """:func:`_migration_lock`'s block. The lock is let go with its session: the exit ends the connection by
    ``PQfinish`` (a C call: with a ``contextlib`` generator, a Ctrl-C as the block was entered or left kept the
    lock, and every later migration of the schema, in any process, waited on it, for as long as the
    interrupt's traceback was kept), and the server ends the session, its lock with it; then the engine is let go
    (Python, after the lock). Ended within the block's deadline (``lock_timeout``)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._engine: Engine | None = None
        self._conn: Any = None
        held: list[Any] = []  # the lock connection's C method that ends it, once there is one
        self._held = held
        # the maps read the list when they run, once
        self.close = functools.partial(  # type: ignore[method-assign]
            collections.deque, itertools.chain(map(_FINISH, held), map(self._let_go, held)), 0)

    def __enter__(self) -> _MigrationLock:
        try:
            self._engine = make_engine(self._url)
            conn = self._conn = self._engine.connect()
            driver = conn.connection.driver_connection
            pgconn = getattr(driver, "pgconn", None)  # psycopg 3; psycopg2 has none
            self._held.append(pgconn.finish if pgconn is not None else driver.close)
            left = time_left_ms()
            if left is not None:
                conn.exec_driver_sql("SELECT set_config('lock_timeout', %(w)s, false)", {"w": str(max(1, left))})
            conn.exec_driver_sql("SELECT pg_advisory_lock(%(k)s)", {"k": _migration_key(self._url)})
            conn.commit()
        except BaseException:  # the block is not entered: its exit never runs
            self.close()
            if not self._held:  # Ctrl-C before the connection was held (or it failed): nothing to end
                self._let_go(None)
            raise
        return self

    def _let_go(self, _finished: Any) -> None:
        """The ended connection invalidated (SQLAlchemy resets nothing on it) and the engine disposed."""
        conn, self._conn = self._conn, None
        engine, self._engine = self._engine, None
        try:
            if conn is not None:
                conn.invalidate()
                conn.close()
        finally:
            if engine is not None:
                engine.dispose()


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


# --- schema preparation: a cheap version check, Alembic only when something must change ------

_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")
_heads: frozenset[str] | None = None


def script_heads() -> frozenset[str]:
    """The head revision(s) of the packaged migration scripts, read from each script's
    ``revision``/``down_revision`` lines (importing Alembic costs ~0.2 s of CPU; this ~1 ms).

    :func:`head_revisions` asks Alembic itself; a test keeps the two equal.
    """
    global _heads
    if _heads is None:
        revisions: set[str] = set()
        parents: set[str] = set()
        versions = resources.files("cmbagent_otel.migrations").joinpath("versions")
        for entry in versions.iterdir():
            if not entry.name.endswith(".py") or entry.name.startswith("__"):
                continue
            for key, value in _REVISION_LINE.findall(entry.read_text(encoding="utf-8")):
                names = _QUOTED.findall(value)
                (revisions if key == "revision" else parents).update(names[:1] if key == "revision" else names)
        _heads = frozenset(revisions - parents)
    return _heads


def schema_current(engine: Engine) -> bool:
    """Whether the database behind ``engine`` records exactly the packaged head revision(s):
    one query on the version table, no Alembic. A missing version table (or any error
    reading it) means no.

    SQLite reads through the bare driver connection (autocommit: the engine's transactions
    take the write lock, which a read does not need); PostgreSQL in a transaction bounded by
    the current :func:`deadline`.
    """
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                rows = cursor.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
            except Exception:
                return False
            finally:
                cursor.close()
        finally:
            raw.close()
    else:
        with engine.connect() as conn:
            try:
                rows = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
            except Exception:
                return False
            finally:
                conn.rollback()
    return {row[0] for row in rows} == script_heads()


class SchemaBusy(TimeoutError):
    """The schema is being checked or migrated by another thread of this process and the
    caller's deadline passed while waiting for it (retry later)."""


_migrated: set[str] = set()
_migrate_lock = threading.Lock()
_background: dict[str, threading.Thread] = {}
_background_lock = threading.Lock()  # never _migrate_lock: instrument() must not wait for a migration
reset_in_child(sys.modules[__name__], "_migrate_lock", "_background_lock")
BACKGROUND_PREPARE_S = 120.0  # then the export path takes over (and retries within its own deadlines)
logger = logging.getLogger("cmbagent_otel.dag")


def untraced() -> VarSet:
    """Instrumentation suppressed (the OpenTelemetry context key every instrumentation checks)
    inside the block: our own statements must not come back as spans of the application's
    SQLAlchemy, sqlite3 or psycopg instrumentation, to be exported, stored and sent again.
    Undone however the block is left (:class:`~cmbagent_otel._varblock.VarSet`: a Ctrl-C as it
    was entered or left kept the application's thread suppressed, none of its spans made)."""
    return VarSet(attach, detach, set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))


def ensure_schema(url: str | None = None, *, repair: bool = False, engine: Engine | None = None) -> None:
    """Bring the schema to head at most once per URL per process.

    The check is one query on the version table (:func:`schema_current`); only a database
    that is not at head (new, older, or ``repair``) runs Alembic's ``upgrade head``. Waits
    for another thread doing the same (the background step :func:`prepare_in_background`)
    no longer than the current :func:`deadline`, then raises :class:`SchemaBusy`.
    ``engine``: an engine for ``url`` to run the check on (else a short-lived one).

    ``repair``: the schema was found missing (a table is gone, or the SQLite file was
    deleted and is created again): upgrade again, then create any table of the current
    schema that is still missing (a database whose version table says head but lost a
    table).
    """
    resolved = resolve_url(url)
    if resolved in _migrated and not repair:
        return
    with untraced():
        _ensure_schema(resolved, repair, engine)


def _ensure_schema(resolved: str, repair: bool, engine: Engine | None) -> None:
    left = time_left_ms()
    if not _migrate_lock.acquire(timeout=-1 if left is None else left / 1000):
        raise SchemaBusy(f"the schema of {redacted(resolved)} is being prepared by another thread")
    try:
        if resolved in _migrated and not repair:
            return
        _migrated.discard(resolved)
        if not repair and _check(resolved, engine):
            _migrated.add(resolved)
            return
        if not repair and create_if_empty(resolved):
            logger.info("cmbagent_otel: created the schema of %s", redacted(resolved))
            _migrated.add(resolved)
            return
        logger.info("cmbagent_otel: %s the schema of %s", "repairing" if repair else "migrating", redacted(resolved))
        upgrade(resolved)
        if repair:
            from .schema import metadata

            owned = make_engine(resolved)
            try:
                metadata.create_all(owned, checkfirst=True)
            finally:
                owned.dispose()
        _migrated.add(resolved)
    finally:
        _migrate_lock.release()


def _check(url: str, engine: Engine | None) -> bool:
    if engine is not None:
        return schema_current(engine)
    engine = make_engine(url)
    try:
        return schema_current(engine)
    finally:
        engine.dispose()


def schema_ready(url: str | None = None) -> bool:
    """Whether this process has already found (or made) the schema of ``url`` current."""
    return resolve_url(url) in _migrated


def prepare_in_background(prepare: Callable[[], Any], url: str) -> threading.Thread | None:
    """Run ``prepare`` (which calls :func:`ensure_schema` for ``url``) in a daemon thread,
    once per URL per process, unless the schema is already known to be current.

    What ``instrument()`` starts (through the DAG exporter's batch processor) so neither
    the application's threads nor the export thread check or migrate the schema while a
    run is going: the first export finds it done. A failure is only logged at debug level;
    the export path retries (and reports) on its own.
    """
    resolved = resolve_url(url)
    with _background_lock:
        if resolved in _migrated:
            return None
        running = _background.get(resolved)
        if running is not None and running.is_alive():
            return running

        def run() -> None:
            try:
                with deadline(BACKGROUND_PREPARE_S):  # a lock held elsewhere is not waited out forever
                    prepare()
            except Exception:
                logger.debug("cmbagent_otel: background schema preparation of %s failed", redacted(resolved),
                             exc_info=True)

        thread = threading.Thread(target=run, name="cmbagent-otel-schema", daemon=True)
        _background[resolved] = thread
    thread.start()
    return thread
