"""The DAG writer's SQL: statement text built once per dialect, run through the driver's executemany.

Compiling SQLAlchemy Core statements (upserts with many columns above all) for every batch
cost more than the database's own work. Here every statement the writer runs is plain SQL
text, built once per process for SQLite (``?`` parameters) and PostgreSQL (psycopg 3:
``%s`` parameters; its ``executemany`` sends all rows in one pipeline), and rows become
parameter tuples as SQLAlchemy's types would have converted them: JSON holding the values
``json.dumps`` writes, as compact ASCII text (``_jsontext.row_json_encoders``: orjson where it
writes them exactly; ``None`` stays SQL NULL: every JSON column is ``none_as_null``; PostgreSQL
casts the text with ``::json``), datetimes as SQLAlchemy's SQLite storage format or as is for
psycopg, booleans as 0/1 on SQLite. Reading back decodes the same way SQLAlchemy would (JSON
parsed, datetimes naive, booleans). ``tests/dag/test_reference_rows.py`` checks the rows
stored are byte for byte those of the SQLAlchemy Core statements the writer used before.
On SQLite, a column that is NULL in every row of an insert or update is written as a ``NULL``
literal instead of a parameter (binding a None costs the sqlite3 module ~4x a text).

Round trips (psycopg 3): inside :meth:`Sql.batch` every write whose result nobody reads
(updates, deletes, small inserts, advisory locks) is held back and sent in one pipeline with
the next statement that returns rows (or before the next ``COPY``, or at the end), in the
order the writer issued them, so each read still sees every earlier write. Reads run on the
driver's cursor, not through SQLAlchemy. Other drivers run each statement when it is issued.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Connection, DateTime, Integer, Table

from .._jsontext import (
    ORJSON_OPTION,
    has_non_finite,
    loads,
    orjson_default,
    orjson_dumps,
    row_json_encoders,
    strict_iterencode,
)
from .._varblock import CExit
from ._stamps import sqlite_text, text_of
from .database import DEFER_TIMEOUTS, TIMEOUTS, TIMEOUTS_SQL

__all__ = ["IN_CHUNK", "Sql", "chunks", "decode_json", "encode_json", "naive", "sql_for"]

IN_CHUNK = 500  # values per IN (...) list on SQLite (old builds allow at most 999 parameters)
# New rows per table below which psycopg 3 inserts by pipelined executemany, not COPY: a COPY
# is two round trips of its own and ends the pipeline of held-back writes.
COPY_MIN_ROWS = 32
_PENDING = "cmbagent_otel_pending"  # key of the held-back writes in the connection's info
_COPY_TYPES = "cmbagent_otel_copy_types"  # key of the binary COPY types per table in the connection's info

encode_json, _standard_json = row_json_encoders()
# encode_json's encoder itself, orjson's or else json's C encoder (None without the C
# accelerator): the row converters call it inline, without encode_json's Python frame per
# value, and convert a row again through encode_json when it raises
_iterencode = strict_iterencode(str, ensure_ascii=True, compact=True)


def decode_json(value: Any) -> Any:
    """A JSON column's value as read back: drivers return text (SQLite) or objects (PostgreSQL)."""
    if isinstance(value, str):
        try:
            return loads(value)
        except ValueError:  # RecursionError too: loads() refuses a document nested too deep
            return None
    return value


def decode_meta(value: Any) -> dict[str, Any]:
    """A ``meta`` column's value as read back, as an object: ``{}`` for none and for any other JSON
    value (another writer's row may hold ``5``, ``[1]`` or ``"text"`` there: the writer read such a
    run's or node's meta with ``.get`` and failed every later batch of that run)."""
    decoded = decode_json(value)
    return decoded if type(decoded) is dict else {}


def naive(value: Any) -> datetime | None:
    """A datetime column's value as a naive datetime (text from SQLite, objects from psycopg)."""
    # datetimes are immutable: a naive one is returned as it is (replace() with a keyword costs
    # more than the parsing)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    elif not isinstance(value, datetime):
        return None
    return value if value.tzinfo is None and type(value) is datetime else value.replace(tzinfo=None)


def chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """``values`` in slices of ``size``."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _sqlite_dt(value: datetime) -> str:
    # SQLAlchemy's own SQLite storage format, so reads come back naive
    return sqlite_text(value if value.tzinfo is None else value.replace(tzinfo=None))


def _kind(column: Any) -> str:
    kind = column.type
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, DateTime):
        return "dt"
    if isinstance(kind, Boolean):
        return "bool"
    return ""


# PostgreSQL column types a binary COPY writes, by type oid: the oid psycopg dumps the value
# as and the Python type the value must have (else the row goes by text COPY). JSON goes as
# its text (the binary form of ``json`` is the text itself); varchar as text (same form).
_BINARY_TYPES: dict[int, tuple[int, str]] = {
    25: (25, "str"), 1043: (25, "str"), 114: (25, "str"),  # text, varchar, json
    23: (23, "int"), 20: (20, "int"), 16: (16, "bool"), 1114: (1114, "dt"), 701: (701, "float"),
}
# The test of each check for a value ``{v}`` in the generated row converter (NULL always passes).
_CHECKS = {
    "": "", "str": "({v} is None or type({v}) is _str)", "int": "({v} is None or type({v}) is _int)",
    "bool": "({v} is None or type({v}) is _bool)", "float": "({v} is None or type({v}) is _float)",
    "dt": "({v} is None or (type({v}) is _datetime and {v}.tzinfo is None))",
}

_SQLITE_CONVERT: dict[str, Any] = {"json": encode_json, "dt": _sqlite_dt, "bool": int, "": None}
_PG_CONVERT: dict[str, Any] = {"json": encode_json, "dt": None, "bool": None, "": None}


def _row_converter(cols: Sequence[tuple[str, str]], convert: Mapping[str, Any],
                   checks: Sequence[str] | None = None, *, inline: bool = True) -> Any:
    """A function turning one row into its parameter tuple for ``cols``, written out per column.

    A loop over the columns per row cost more than the conversions themselves. A value that is
    the same object as an earlier column's of the same kind (an event's ``timestamp`` is its
    ``started_at``) reuses that column's converted text. ``checks`` (one of :data:`_CHECKS`'
    keys per column): the function returns None for a row with a converted value not of that
    type (NULL always passes). ``inline``: JSON columns call the C encoder directly (a row whose
    encoding raises goes through ``encode_json``) and naive datetimes are formatted in place,
    without a Python frame per value.
    """
    names = [name for name, _ in cols]
    env: dict[str, Any] = {"_names": names, "KeyError": KeyError, "_str": str, "_int": int, "_bool": bool,
                           "_float": float, "_datetime": datetime, "ValueError": ValueError, "_text_of": text_of}
    inline_json = (inline and (orjson_dumps is not None or _iterencode is not None)
                   and any(convert[kind] is encode_json for _, kind in cols))
    if inline_json:
        env.update(_join="".join, _ienc=_iterencode, _odumps=orjson_dumps, _odefault=orjson_default,
                   _ooption=ORJSON_OPTION, _std=_standard_json, _nonfinite=has_non_finite,
                   TypeError=TypeError)
        env["_slow"] = _row_converter(cols, convert, checks, inline=False)
    values = [f"v{i}" for i in range(len(cols))]
    unpack = ", ".join(values) + ("," if len(values) == 1 else "")
    out: list[str] = []
    seen: dict[str, list[int]] = {}
    # the last converted column of each kind is read by no later column: named only for the checks
    last = {kind: i for i, (_, kind) in enumerate(cols)}
    for i, (_, kind) in enumerate(cols):
        conv = convert[kind]
        if conv is None:
            out.append(f"v{i}")
            continue
        env[f"c{i}"] = conv
        if inline_json and conv is encode_json and orjson_dumps is not None:  # encode_json, written out
            expr = (f"None if v{i} is None else b{i}.decode() if (b{i} := _odumps(v{i}, _odefault, _ooption))"
                    f".isascii() and (b{i}.find(b'null') < 0 or not _nonfinite(v{i})) else _std(v{i})")
        elif inline_json and conv is encode_json:
            expr = f"None if v{i} is None else _join(_ienc(v{i}, 0))"
        elif inline and conv is _sqlite_dt:  # _sqlite_dt, written out: a span time's text made with it first
            expr = (f"None if v{i} is None else t{i} if type(v{i}) is _datetime and (t{i} := _text_of(v{i})) "
                    f"is not None else v{i}.isoformat(' ', 'microseconds') if v{i}.tzinfo is None else c{i}(v{i})")
        else:
            expr = f"None if v{i} is None else c{i}(v{i})"
        for j in reversed(seen.get(kind, [])):
            expr = f"o{j} if v{i} is v{j} else {expr}"
        seen.setdefault(kind, []).append(i)
        out.append(f"(o{i} := {expr})" if checks is not None or i != last[kind] else f"({expr})")
    getter = "v0 = _get(row)" if len(names) == 1 else f"{unpack} = _get(row)"  # itemgetter of one name: a value
    env["_get"] = operator.itemgetter(*names)
    if checks is not None:
        tests = [_CHECKS[check].format(v=f"o{i}" if out[i].startswith("(") else f"v{i}")
                 for i, check in enumerate(checks) if _CHECKS[check]]
        result = [f"out = ({', '.join(out)},)", f"return out if {' and '.join(tests) or 'True'} else None"]
    else:
        result = [f"return ({', '.join(out)},)"]
    if inline_json:
        result = ["try:", *(f"    {line}" for line in result),
                  "except (ValueError, TypeError):  # json: a non-finite float; orjson: a value it refuses",
                  "    return _slow(row)"]
    body = "".join(f"    {line}\n" for line in result)
    source = (f"def convert(row):\n"
              f"    try:\n        {getter}\n"
              f"    except KeyError:  # a row without some columns: those are NULL\n"
              f"        {unpack} = map(row.get, _names)\n"
              f"{body}")
    exec(source, env)  # the source holds column indexes only; names and converters are in env
    return env["convert"]


class Sql:
    """Statements and parameter conversion for one dialect (``sqlite`` or ``postgresql``) and driver
    (``COPY`` for new rows with psycopg 3 only; other PostgreSQL drivers, such as the psycopg2 of
    cmbagent's own URLs, insert through executemany)."""

    def __init__(self, dialect: str, driver: str = "") -> None:
        self.pg = dialect == "postgresql"
        self.can_copy = self.pg and driver == "psycopg"
        self.pipelined = self.can_copy and _pipeline_supported()
        self.mark = "%s" if self.pg else "?"
        self._convert = _PG_CONVERT if self.pg else _SQLITE_CONVERT
        self._cache: dict[tuple[Any, ...], Any] = {}

    # --- statement text ----------------------------------------------------------------------

    def _value(self, kind: str) -> str:
        return f"{self.mark}::json" if self.pg and kind == "json" else self.mark

    def columns(self, table: Table, *, with_autoincrement_id: bool = False) -> tuple[tuple[str, str], ...]:
        """``(name, kind)`` of the columns the writer sets (an autoincrement id left to the database)."""
        key = ("cols", table.name, with_autoincrement_id)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = tuple(
                (c.name, _kind(c)) for c in table.columns
                if with_autoincrement_id or not (c.name == "id" and isinstance(c.type, Integer)))
        return found  # type: ignore[no-any-return]

    def insert_sql(self, table: Table, on_conflict: str = "", nulls: tuple[int, ...] = ()) -> str:
        """``INSERT`` of every column; ``on_conflict``: ``""``, ``"nothing"`` or ``"update"`` (on id);
        ``nulls``: indexes of columns given as ``NULL`` literals instead of parameters."""
        key = ("insert", table.name, on_conflict, nulls)
        found = self._cache.get(key)
        if found is None:
            cols = self.columns(table)
            found = (f"INSERT INTO {table.name} ({', '.join(n for n, _ in cols)}) VALUES ("
                     f"{', '.join('NULL' if i in nulls else self._value(k) for i, (_, k) in enumerate(cols))})")
            if on_conflict == "nothing":
                found += " ON CONFLICT (id) DO NOTHING"
            elif on_conflict == "update":
                found += " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
                    f"{n} = excluded.{n}" for n, _ in cols if n != "id")
            self._cache[key] = found
        return found  # type: ignore[no-any-return]

    def update_sql(self, table: Table, names: Sequence[str] | None = None,
                   nulls: tuple[int, ...] = ()) -> tuple[str, tuple[tuple[str, str], ...]]:
        """``UPDATE table SET <names or every column> WHERE id = ?`` and the parameter columns (id last);
        ``nulls``: indexes (in those columns) of columns set to ``NULL`` literals instead of parameters."""
        key = ("update", table.name, tuple(names) if names is not None else None, nulls)
        found = self._cache.get(key)
        if found is None:
            kinds = dict(self.columns(table))
            cols = tuple((n, kinds[n]) for n in (names if names is not None else kinds) if n != "id")
            sets = ", ".join(f"{n} = {'NULL' if i in nulls else self._value(k)}" for i, (n, k) in enumerate(cols))
            found = self._cache[key] = (f"UPDATE {table.name} SET {sets} WHERE id = {self.mark}",
                                        (*cols, ("id", kinds["id"])))
        return found  # type: ignore[no-any-return]

    def _without_nulls(self, params: list[tuple[Any, ...]]) -> tuple[tuple[int, ...], list[tuple[Any, ...]]]:
        """The columns NULL in every one of ``params`` (SQLite) and the parameters without them.

        The sqlite3 module binds a None through its adapter protocol, whose failed attribute
        lookups build and drop an AttributeError per value (~0.4 µs, 4x a text's binding); a
        ``NULL`` literal in the statement costs nothing per row. The rows stored are the same.
        """
        if self.pg or not params:
            return (), params
        first = params[0]
        if None not in first:  # most node rows: no column to check
            return (), params
        count = len(params)
        nulls = tuple(i for i, value in enumerate(first) if value is None and (
            count == 1 or list(map(operator.itemgetter(i), params)).count(None) == count))
        if not nulls:
            return (), params
        key = ("kept", len(first), nulls)
        kept = self._cache.get(key)
        if kept is None:
            indexes = [i for i in range(len(first)) if i not in nulls]
            getter = operator.itemgetter(*indexes)
            kept = self._cache[key] = getter if len(indexes) > 1 else (lambda row: (getter(row),))
        return nulls, list(map(kept, params))

    def where_in(self, column: str, count: int) -> str:
        """``column IN (?, ...)`` for ``count`` values (SQLite), ``column = ANY(%s)`` (PostgreSQL: one list)."""
        if self.pg:
            return f"{column} = ANY({self.mark})"
        return f"{column} IN ({', '.join('?' * count)})"

    def in_params(self, values: Sequence[Any]) -> tuple[Any, ...]:
        return (list(values),) if self.pg else tuple(values)

    def in_chunks(self, values: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """IN-list slices: one for PostgreSQL (an array parameter), slices of 500 for SQLite."""
        if not values:
            return iter(())
        return iter((values,)) if self.pg else chunks(values)

    # --- parameters ----------------------------------------------------------------------------

    def params(self, rows: Iterable[Mapping[str, Any]], cols: Sequence[tuple[str, str]]) -> list[tuple[Any, ...]]:
        """Rows as parameter tuples in ``cols`` order, values converted as SQLAlchemy's types would."""
        return list(self.iter_params(rows, cols))

    def iter_params(self, rows: Iterable[Mapping[str, Any]],
                    cols: Sequence[tuple[str, str]]) -> Iterator[tuple[Any, ...]]:
        """:meth:`params`, one row at a time."""
        return map(self._converter(cols), rows)

    def _converter(self, cols: Sequence[tuple[str, str]]) -> Any:
        """The row converter of ``cols`` (generated and compiled on first use, then cached)."""
        key = ("params", tuple(cols))
        convert = self._cache.get(key)
        if convert is None:
            convert = self._cache[key] = _row_converter(cols, self._convert)
        return convert

    def prepare(self, conn: Connection, inserted: Iterable[Table],
                updated: Iterable[tuple[Table, Sequence[str] | None]] = ()) -> None:
        """Build now what a batch would build on first use: the statement texts and row converters
        of an insert into each ``inserted`` table (and, for a binary ``COPY``, its column types
        read from ``conn``'s database) and of each ``updated`` table's update by id (of every
        column, or of the names given). The same work, done once per process (the converters)
        and per connection (the types), before the first export rather than in it."""
        for table in inserted:
            self.columns(table, with_autoincrement_id=True)  # what reading its stored rows back decodes
            self._converter(self.columns(table))
            self.insert_sql(table)
            self.insert_sql(table, "nothing")
            if self.can_copy:
                self._binary(conn, table)
        for table, names in updated:
            self._converter(self.update_sql(table, names)[1])

    # --- execution -----------------------------------------------------------------------------

    def batch(self, conn: Connection) -> contextlib.AbstractContextManager[object]:
        """Hold back blind writes on ``conn`` inside the block (psycopg 3), sent with the next
        read or :meth:`flush`; the block ends with :meth:`flush` (what is still held back when it
        is left is discarded: an error's, or one the block forgot to send).

        A transaction begun with :meth:`defer_timeouts` set sends the deadline's lock and
        statement timeouts as its first held-back statement (with ``BEGIN``: no round trip).

        Nothing stays held back however the block is left (:class:`~cmbagent_otel._varblock.CExit`: with a
        ``contextlib`` generator, a Ctrl-C as the block was entered or left kept the list in the pooled
        connection's ``info``, and every later write outside a block on that connection was held back, never
        sent)."""
        if not self.pipelined:
            return contextlib.nullcontext()
        return _HeldBack(conn.info)

    def defer_timeouts(self, conn: Connection) -> None:
        """Call before ``conn.begin()``: that transaction's deadline timeouts wait for :meth:`batch`."""
        if self.pipelined:
            conn.info[DEFER_TIMEOUTS] = True

    def write(self, conn: Connection, statement: str, params: Any, *, many: bool = False) -> None:
        """Run a statement whose result nobody reads (``many``: once per parameter row);
        held back inside :meth:`batch` on psycopg 3."""
        if many and not params:
            return
        pending = conn.info.get(_PENDING) if self.pipelined else None
        if pending is not None:
            pending.append((statement, params, many))
        elif many:
            conn.exec_driver_sql(statement, params if isinstance(params, list) else list(params))
        else:
            conn.exec_driver_sql(statement, params)

    def rows(self, conn: Connection, statement: str, params: Any = ()) -> list[Any]:
        """The rows of a statement (tuples that also name their columns), after every held-back
        write (in the same pipeline on psycopg 3)."""
        if not self.pipelined:
            return conn.exec_driver_sql(statement, params).all()
        from psycopg.rows import namedtuple_row

        driver = conn.connection.driver_connection
        pending = conn.info.get(_PENDING)
        with driver.cursor(row_factory=namedtuple_row) as cursor:  # type: ignore[union-attr]
            if pending:
                with driver.pipeline():  # type: ignore[union-attr]
                    _send(driver, pending)
                    cursor.execute(statement, params)
            else:
                cursor.execute(statement, params)
            return cursor.fetchall()

    def rows_each(self, conn: Connection, statement: str, params: Sequence[Any]) -> list[Any]:
        """The rows ``statement`` returns for each parameter row of ``params``, all together; on
        psycopg 3 one executemany (the statement parsed once, not a long multi-row text whose
        parsing is never cached) in one pipeline with the held-back writes."""
        if not params:
            return []
        if not self.pipelined:
            return [row for one in params for row in self.rows(conn, statement, one)]
        driver = conn.connection.driver_connection
        pending = conn.info.get(_PENDING)
        with driver.cursor() as cursor:  # type: ignore[union-attr]
            with driver.pipeline():  # type: ignore[union-attr]
                if pending:
                    _send(driver, pending)
                cursor.executemany(statement, params, returning=True)
            out = list(cursor.fetchall())
            while cursor.nextset():
                out.extend(cursor.fetchall())
            return out

    def rows_many(self, conn: Connection, statements: Sequence[tuple[str, Any]]) -> list[list[Any]]:
        """The rows of each statement, as :meth:`rows` gives them; on psycopg 3 all in one pipeline
        (with the held-back writes first): one round trip. The statements must not depend on
        each other's effects."""
        if not self.pipelined or len(statements) < 2:
            return [self.rows(conn, statement, params) for statement, params in statements]
        from psycopg.rows import namedtuple_row

        driver = conn.connection.driver_connection
        pending = conn.info.get(_PENDING)
        cursors = [driver.cursor(row_factory=namedtuple_row) for _ in statements]  # type: ignore[union-attr]
        try:
            with driver.pipeline():  # type: ignore[union-attr]
                if pending:
                    _send(driver, pending)
                for cursor, (statement, params) in zip(cursors, statements, strict=True):
                    cursor.execute(statement, params)
            return [cursor.fetchall() for cursor in cursors]
        finally:
            for cursor in cursors:
                cursor.close()

    def flush(self, conn: Connection) -> None:
        """Send the held-back writes now (one pipeline)."""
        pending = conn.info.get(_PENDING) if self.pipelined else None
        if pending:
            driver = conn.connection.driver_connection
            with driver.pipeline():  # type: ignore[union-attr]
                _send(driver, pending)

    def insert(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], on_conflict: str = "") -> None:
        """Insert ``rows``: one executemany; on PostgreSQL without ``on_conflict``, many rows
        by one ``COPY`` (the rows must be new: the writer checked, holding the runs' advisory locks)."""
        if not rows:
            return
        if self.can_copy and not on_conflict and (len(rows) >= COPY_MIN_ROWS or not self.pipelined):
            self.copy(conn, table, rows)
            return
        nulls, params = self._without_nulls(self.params(rows, self.columns(table)))
        self.write(conn, self.insert_sql(table, on_conflict, nulls), params, many=True)

    def copy(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """PostgreSQL ``COPY ... FROM STDIN`` of ``rows`` (JSON stored as the same text).

        Binary format when every column's type is one of :data:`_BINARY_TYPES` (read from the
        database once per connection): no text to escape on this side, none to parse on the
        server's (timestamps above all). A row holding a value of another Python type than its
        column's binary form takes (an app's odd value) ends the binary ``COPY`` there; it and
        the rest go by text ``COPY``, as before. Rows are converted as they are sent: the server
        inserts the first ones (psycopg hands it 32 KiB at a time) while the later ones are
        still being encoded."""
        self.flush(conn)
        cols = self.columns(table)
        columns = ", ".join(n for n, _ in cols)
        binary = self._binary(conn, table)
        rest: Iterable[Mapping[str, Any]] = rows
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if binary is not None:
                oids, convert = binary
                rest = ()
                with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(oids)
                    remaining = iter(rows)
                    for row in remaining:
                        params = convert(row)
                        if params is None:
                            rest = [row, *remaining]
                            break
                        copy.write_row(params)
            if rest:
                with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
                    for params in self.iter_params(rest, cols):
                        copy.write_row(params)
        except BaseException:
            # the column types may have changed under this connection (a migration): read them again
            conn.info.pop(_COPY_TYPES, None)
            raise
        finally:
            cursor.close()

    def _binary(self, conn: Connection, table: Table) -> tuple[list[int], Any] | None:
        """The oids a binary ``COPY`` of ``table`` dumps its columns as, and the row converter that
        checks each value's type; None when a column's type has no binary form here."""
        types = conn.info.setdefault(_COPY_TYPES, {})
        if table.name not in types:
            stored = dict(self.rows(conn, "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = "
                                    "%s::regclass AND attnum > 0 AND NOT attisdropped", (table.name,)))
            oids = tuple(stored.get(name) for name, _ in self.columns(table))
            types[table.name] = oids if all(oid in _BINARY_TYPES for oid in oids) else None
        oids = types[table.name]
        if oids is None:
            return None
        key = ("binary", table.name, oids)
        found = self._cache.get(key)
        if found is None:
            cols = self.columns(table)
            # a JSON column's value is the encoder's text or NULL: nothing to check
            checks = ["" if kind == "json" else _BINARY_TYPES[oid][1]
                      for oid, (_, kind) in zip(oids, cols, strict=True)]
            found = self._cache[key] = ([_BINARY_TYPES[oid][0] for oid in oids],
                                        _row_converter(cols, self._convert, checks))
        return found  # type: ignore[no-any-return]

    def update(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]],
               names: Sequence[str] | None = None) -> None:
        """Update ``rows`` by id (every column, or ``names``)."""
        if rows:
            cols = self.update_sql(table, names)[1]
            nulls, params = self._without_nulls(self.params(rows, cols))
            self.write(conn, self.update_sql(table, names, nulls)[0], params, many=True)

    def existing_ids(self, conn: Connection, table: str, ids: Sequence[Any]) -> set[Any]:
        """Which of ``ids`` are stored in ``table``."""
        return self.existing_ids_many(conn, [(table, ids)])[0]

    def existing_ids_many(self, conn: Connection, asks: Sequence[tuple[str, Sequence[Any]]]) -> list[set[Any]]:
        """For each ``(table, ids)``, which of the ids are stored (one round trip on psycopg 3)."""
        return self.existing_ids_and_rows(conn, asks, ())[0]

    def existing_ids_and_rows(self, conn: Connection, asks: Sequence[tuple[str, Sequence[Any]]],
                              reads: Sequence[tuple[str, Any]]) -> tuple[list[set[Any]], list[list[Any]]]:
        """:meth:`existing_ids_many` of ``asks`` and the rows of each statement of ``reads``, all in
        one round trip on psycopg 3 (the statements must not depend on each other's effects)."""
        statements: list[tuple[str, Any]] = []
        owners: list[int] = []
        for index, (table, ids) in enumerate(asks):
            for part in self.in_chunks(ids):
                statements.append((f"SELECT id FROM {table} WHERE {self.where_in('id', len(part))}",
                                   self.in_params(part)))
                owners.append(index)
        results = self.rows_many(conn, [*statements, *reads])
        found: list[set[Any]] = [set() for _ in asks]
        for index, rows in zip(owners, results[:len(statements)], strict=True):
            found[index].update(r[0] for r in rows)
        return found, results[len(statements):]

    def delete_ids(self, conn: Connection, table: str, ids: Sequence[Any]) -> None:
        for part in self.in_chunks(ids):
            self.write(conn, f"DELETE FROM {table} WHERE {self.where_in('id', len(part))}", self.in_params(part))

    def select(self, conn: Connection, table: Table, column: str, values: Sequence[Any],
               extra: str = "", extra_params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of ``table`` whose ``column`` is in ``values`` (and ``extra`` holds), decoded."""
        statements = self.select_statements(table, column, values, extra, extra_params)
        return self.decoded(table, [raw for rows in self.rows_many(conn, statements) for raw in rows])

    def select_statements(self, table: Table, column: str, values: Sequence[Any], extra: str = "",
                          extra_params: tuple[Any, ...] = ()) -> list[tuple[str, Any]]:
        """The statements of :meth:`select` (to run with others through :meth:`rows_many`)."""
        names = [n for n, _ in self.columns(table, with_autoincrement_id=True)]
        head = f"SELECT {', '.join(names)} FROM {table.name} WHERE "
        return [(head + self.where_in(column, len(part)) + extra, self.in_params(part) + extra_params)
                for part in self.in_chunks(values)]

    def decoded(self, table: Table, raws: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        """Rows read by :meth:`select_statements`, decoded as SQLAlchemy would."""
        cols = self.columns(table, with_autoincrement_id=True)
        names = [n for n, _ in cols]
        kinds = [k for _, k in cols]
        out: list[dict[str, Any]] = []
        for raw in raws:
            row: dict[str, Any] = {}
            for name, kind, v in zip(names, kinds, raw, strict=True):
                if v is not None and kind:
                    v = decode_json(v) if kind == "json" else naive(v) if kind == "dt" else bool(v)
                row[name] = v
            out.append(row)
        return out


class _HeldBack(CExit):
    """:meth:`Sql.batch`'s block on a pipelined connection: its exit drops the held-back list from the
    connection's ``info`` (a C call)."""

    def __init__(self, info: dict[Any, Any]) -> None:
        super().__init__()
        self._info = info
        self.close = functools.partial(  # type: ignore[method-assign]
            collections.deque, map(info.pop, (_PENDING,), (None,)), 0)

    def __enter__(self) -> _HeldBack:
        info = self._info
        try:
            pending = info[_PENDING] = []
            timeouts = info.pop(TIMEOUTS, None)  # the deadline's timeouts go first (see database._pg_begin)
            if timeouts is not None:
                pending.append((TIMEOUTS_SQL, timeouts, False))
        except BaseException:  # Ctrl-C as a call returned: the block is not entered, its exit never runs
            self.close()
            raise
        return self


def _send(driver: Any, pending: list[tuple[str, Any, bool]]) -> None:
    """Queue ``pending`` writes on ``driver``'s open pipeline (in order) and forget them (the
    cursor stays open: the pipeline hands it its results when it syncs)."""
    cursor = driver.cursor()
    for statement, params, many in pending:
        if many:
            cursor.executemany(statement, params)
        else:
            cursor.execute(statement, params)
    pending.clear()


def _pipeline_supported() -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    return bool(psycopg.Pipeline.is_supported())


_BY_DIALECT: dict[tuple[str, str], Sql] = {}


def sql_for(conn: Connection) -> Sql:
    """The statements of ``conn``'s dialect and driver (built once per process)."""
    key = (conn.dialect.name, conn.dialect.driver)
    found = _BY_DIALECT.get(key)
    if found is None:
        found = _BY_DIALECT.setdefault(key, Sql(*key))
    return found
