"""Find the spans a database refuses: write a refused batch in halves.

One span the writer cannot map, or the database refuses (a value out of range, a role without a
grant), fails the transaction of its whole batch. Both writers of the DAG (the exporter and the
ingest server) then find the spans that cause it with :func:`write_in_halves` and give up only
those, each with its own log line, instead of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["write_in_halves"]

T = TypeVar("T")


def write_in_halves(items: Sequence[T], write: Callable[[list[T]], bool], refuse: Callable[[T], None]) -> None:
    """After ``items`` failed to be written together, write them in halves, each half that fails
    again in halves, down to single items: each item that fails alone goes to ``refuse``.

    ``write(piece)`` returns True when the piece is done with (written, or kept elsewhere, as a
    spill file), False when it failed because of something in it (it is split again). What
    ``write`` raises propagates (the ingest's "database unavailable": its client retries the
    request). A single item given is refused at once: it failed already. The pieces are kept on a
    stack, not recursed into, so no batch size reaches the recursion limit."""
    pending = [list(items)]
    while pending:
        part = pending.pop()
        if len(part) == 1:
            refuse(part[0])
            continue
        half = len(part) // 2
        for piece in (part[:half], part[half:]):
            if not write(piece):
                pending.append(piece)
