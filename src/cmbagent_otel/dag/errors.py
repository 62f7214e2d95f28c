"""Which database errors a write may retry, classified by the drivers' own error codes.

SQLite (``sqlite3.Error.sqlite_errorcode``, primary code = low byte):

* retry: ``SQLITE_BUSY``/``SQLITE_LOCKED`` (another writer), ``SQLITE_FULL`` (disk or
  ``max_page_count`` full: space may come back), ``SQLITE_IOERR``, ``SQLITE_PROTOCOL``,
  ``SQLITE_NOLFS``, ``SQLITE_CANTOPEN``, ``SQLITE_READONLY``, ``SQLITE_CORRUPT``,
  ``SQLITE_NOTADB``, ``SQLITE_PERM``, ``SQLITE_AUTH`` (the file is gone, unwritable, refused or
  not a database right now: keeping the batch in the spill store beats dropping it);
* ``SQLITE_READONLY_DBMOVED`` and ``SQLITE_CANTOPEN``: the file was moved or deleted, the
  connection must be reopened;
* ``SQLITE_ERROR`` saying ``no such table``/``no such column``: the schema is missing
  (re-migrate);
* anything else (constraint, misuse, a bug of ours): not retryable.

:class:`~cmbagent_otel.dag.database.SchemaBusy` (another thread of this process is still
migrating past the caller's deadline) and :class:`SchemaIncompatible` (a schema this version
cannot migrate): retry.

PostgreSQL (SQLSTATE of psycopg's exception):

* retry: class ``08`` (connection), ``53`` (insufficient resources), ``57P`` (server
  shutting down / restarting), ``57014`` (statement timeout), ``55P03`` (lock timeout),
  ``58`` (system I/O), ``40001`` (serialization failure), ``40P01`` (deadlock); a driver
  error without SQLSTATE (connection refused, connection closed) too; and refusals of the
  role or session rather than of the spans: ``42501`` (insufficient privilege), ``25006``
  (read-only transaction: a standby, ``default_transaction_read_only``), class ``28``
  (login refused), ``3D000`` (no such database);
* ``42P01`` undefined table, ``42703`` undefined column, ``3F000`` missing schema:
  re-migrate;
* anything else: not retryable.
"""

from __future__ import annotations

import enum
import sqlite3
from typing import Any

from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .database import SchemaBusy

__all__ = ["Fault", "SchemaIncompatible", "classify", "foreign_key_failed"]


class SchemaIncompatible(RuntimeError):
    """The schema could not be checked or migrated for a reason no driver error code explains:
    a revision newer than this version's scripts (written by a later cmbagent-otel), tables
    of the same names shaped otherwise. Nothing about the spans: retried, so they are
    spilled, never dropped, until the database is fixed (``cmbagent-otel db upgrade``)."""


class Fault(enum.Enum):
    """What to do about a failed write."""

    RETRY = "retry"  # transient: try again until the deadline, then spill
    REOPEN = "reopen"  # the SQLite file was moved or deleted: reconnect (and re-migrate), then retry
    SCHEMA = "schema"  # tables or columns are missing: re-migrate, then retry
    FATAL = "fatal"  # retrying cannot help


_SQLITE_RETRY = frozenset({
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    11,  # SQLITE_CORRUPT
    13,  # SQLITE_FULL
    15,  # SQLITE_PROTOCOL
    22,  # SQLITE_NOLFS
    26,  # SQLITE_NOTADB
    3,  # SQLITE_PERM
    23,  # SQLITE_AUTH
})
_SQLITE_ERROR = 1
_SQLITE_CANTOPEN = 14
_SQLITE_READONLY_DBMOVED = 8 | (4 << 8)
_SQLITE_SCHEMA_MESSAGES = ("no such table", "no such column", "has no column named")

_PG_RETRY_PREFIXES = ("08", "28", "53", "57P", "58")
# the last four: the database refuses this role or session whatever the spans (no privilege, a
# read-only transaction or standby, a login refused, no such database): every span would be
# dropped one by one, while a fixed grant or setting lets the spill store write them all later
_PG_RETRY_CODES = frozenset({"57014", "55P03", "40001", "40P01", "42501", "25006", "3D000"})
_PG_SCHEMA_CODES = frozenset({"42P01", "42703", "3F000"})


def _driver_error(exc: BaseException) -> BaseException:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def _sqlite(error: sqlite3.Error) -> Fault:
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        # only sqlite3's own misuse errors (closed connection, bad parameter) lack a code
        return Fault.FATAL
    if code == _SQLITE_READONLY_DBMOVED or code & 0xFF == _SQLITE_CANTOPEN:
        return Fault.REOPEN
    if code & 0xFF in _SQLITE_RETRY:
        return Fault.RETRY
    if code & 0xFF == _SQLITE_ERROR and any(m in str(error) for m in _SQLITE_SCHEMA_MESSAGES):
        return Fault.SCHEMA
    return Fault.FATAL


def _postgres(error: Any) -> Fault:
    state = getattr(error, "sqlstate", None)
    if not state:
        # psycopg raises connection failures (refused, reset, closed) without a SQLSTATE
        import psycopg

        return Fault.RETRY if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) else Fault.FATAL
    if state in _PG_SCHEMA_CODES:
        return Fault.SCHEMA
    if state in _PG_RETRY_CODES or state.startswith(_PG_RETRY_PREFIXES):
        return Fault.RETRY
    return Fault.FATAL


def classify(exc: BaseException) -> Fault:
    """How a write that raised ``exc`` should proceed (see the module docstring)."""
    if isinstance(exc, (SchemaBusy, SchemaIncompatible)):
        return Fault.RETRY  # another thread of this process is still migrating; a schema to fix
    if isinstance(exc, (DisconnectionError, PoolTimeoutError)):
        return Fault.RETRY
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return Fault.RETRY
    error = _driver_error(exc)
    if isinstance(error, sqlite3.Error):
        return _sqlite(error)
    module = type(error).__module__ or ""
    if module.startswith("psycopg"):
        return _postgres(error)
    if isinstance(error, OSError):
        # creating the database directory or file failed (disk full, permissions): may pass
        return Fault.RETRY
    return Fault.FATAL


_SQLITE_CONSTRAINT_FOREIGNKEY = 19 | (3 << 8)
_PG_FOREIGN_KEY_VIOLATION = "23503"


def foreign_key_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a foreign key violation (SQLite's extended code, PostgreSQL's SQLSTATE),
    raised through SQLAlchemy or by the driver itself (the writer's psycopg pipeline)."""
    error = _driver_error(exc)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == _SQLITE_CONSTRAINT_FOREIGNKEY
    return (type(error).__module__ or "").startswith("psycopg") and \
        getattr(error, "sqlstate", None) == _PG_FOREIGN_KEY_VIOLATION
