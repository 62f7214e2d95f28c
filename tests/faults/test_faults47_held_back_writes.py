"""Ctrl-C as a pipelined batch of writes is entered or left (47th fault campaign; session 46's Left).

``Sql.batch`` (psycopg 3: blind writes held back in the connection's ``info``, sent with the next read or at the
block's end) was a ``contextlib`` context manager: a ``KeyboardInterrupt`` as the generator yielded to
``__enter__`` (``next()``'s return) or as ``__exit__`` was entered (a Ctrl-C during a flush from the main thread:
``force_flush``, the exit's) left the held-back list in the **pooled** connection's ``info`` for as long as the
interrupt's traceback was kept: every later write made outside a block on that connection was appended to it
and never sent (committed as nothing). The block is now a ``_varblock.CExit`` whose exit drops the list by a C
call.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel.dag import statements
from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.dag.statements import sql_for

from .test_faults47_gc_paused import points_left

pytestmark = pytest.mark.postgres


def test_ctrl_c_as_a_batch_is_entered_or_left_holds_back_no_later_write(pg_url: str) -> None:
    """Fails on main 96d5dc3: the list left after 3 of 17 points (``c_return batch``: the ``info.pop`` of the
    deadline's timeouts, ``c_return __enter__``: ``next()``, ``call __exit__``), and the write made after each of
    those never stored."""
    upgrade(pg_url)
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            sql = sql_for(conn)
            if not sql.pipelined:
                pytest.skip("psycopg 3 with pipeline support only")

            def write(_leaked: bool, n: int) -> None:
                # the application's next plain write on this connection, with the interrupt kept
                sql.write(conn, "INSERT INTO sessions (id, name, created_at, last_active_at, status) "
                                "VALUES (%(id)s, 'n', now(), now(), 'active')", {"id": f"after {n}"})
                conn.commit()
                conn.info.pop(statements._PENDING, None)

            left, points = points_left(lambda: sql.batch(conn), lambda: statements._PENDING in conn.info, write)
        with engine.connect() as other:
            stored = other.execute(text("SELECT id FROM sessions")).scalars().all()
    finally:
        engine.dispose()
    assert points >= 3
    assert left == []
    assert sorted(stored) == sorted(f"after {n}" for n in range(1, points + 1))


def test_a_batch_still_holds_back_and_sends(pg_url: str) -> None:
    """Held back until the block's flush; an error inside discards what is held back, and the list goes with the
    block either way."""
    upgrade(pg_url)
    engine = create_engine(pg_url)
    insert = ("INSERT INTO sessions (id, name, created_at, last_active_at, status) "
              "VALUES (%(id)s, 'n', now(), now(), 'active')")
    error = ValueError("the application's")
    try:
        with engine.connect() as conn:
            sql = sql_for(conn)
            if not sql.pipelined:
                pytest.skip("psycopg 3 with pipeline support only")
            with pytest.raises(ValueError) as caught, sql.batch(conn):
                sql.write(conn, insert, {"id": "discarded"})
                raise error
            assert caught.value is error and statements._PENDING not in conn.info
            with sql.batch(conn):
                sql.write(conn, insert, {"id": "sent"})
                assert conn.info[statements._PENDING]
                sql.flush(conn)
            assert statements._PENDING not in conn.info
            conn.commit()
            assert conn.execute(text("SELECT id FROM sessions")).scalars().all() == ["sent"]
    finally:
        engine.dispose()
