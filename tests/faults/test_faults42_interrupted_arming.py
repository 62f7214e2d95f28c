"""Ctrl-C as the deadline watchdog arms a PostgreSQL connection (fortieth fault campaign: a descriptor or a
number taken but not yet held by our code).

``Watchdog.arm`` duplicates the connection's socket descriptor and returns a token the pool record keeps for the
disarm at checkin. A ``KeyboardInterrupt`` (a signal handler runs when a call returns) as ``os.dup`` returned
leaked the duplicate; as ``arm`` returned, the token was lost with the return value: the connection stayed
armed and the watchdog cut it at that deadline (+1 s) while the pool had lent it again. The duplicate now goes
into a list in the call that makes it, and the record's ``info`` holds the token as it is armed. Real
PostgreSQL (a pooled connection checked out again under a deadline), forced with ``conftest.interrupt_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from sqlalchemy import text

from cmbagent_otel.dag._watchdog import Watchdog, watchdog
from cmbagent_otel.dag.database import deadline, make_engine

from .conftest import FDS, Hit, descriptors_on, interrupt_at, opened_on

pytestmark = pytest.mark.skipif(not FDS.is_dir(), reason="needs /proc/self/fd")


def _socket(link: str) -> bool:
    return link.startswith("socket:")


def _arm_returns(frame: FrameType, event: str, arg: Any) -> bool:
    return event == "return" and frame.f_code is Watchdog.arm.__code__


_POINTS: dict[str, Callable[[], Hit]] = {  # made when the test's sockets are open
    "dup-returns": lambda: opened_on(_socket),
    "arm-returns": lambda: _arm_returns,
}


@pytest.fixture
def engine(pg_url: str) -> Iterator[object]:
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:  # the pool keeps it: the next checkout opens no socket
            conn.execute(text("SELECT 1"))
        yield engine
    finally:
        engine.dispose()


@pytest.mark.parametrize("point", list(_POINTS))
def test_ctrl_c_as_a_connection_is_armed_leaves_nothing_armed_nor_open(engine: object, point: str) -> None:
    """Fails on 4a0d79e: a duplicate socket stays open (dup-returns), the connection stays armed (arm-returns)."""
    sockets = descriptors_on(_socket)
    with deadline(3600), interrupt_at(_POINTS[point]()):
        engine.connect()  # type: ignore[attr-defined]
    assert watchdog._armed == {}, "the connection stays armed: cut at its deadline, lent again meanwhile"
    assert descriptors_on(_socket) <= sockets, "a duplicate of the socket stays open"
    with deadline(3600), engine.connect() as conn:  # type: ignore[attr-defined]
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert watchdog._armed == {}
