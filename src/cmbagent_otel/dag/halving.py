"""Find the spans a database refuses: write a refused batch in halves.

One span the writer cannot map, or the database refuses (a value out of range, a role without a
grant), fails the transaction of its whole batch. Both writers of the DAG (the exporter and the
ingest server) then find the spans that cause it with :func:`write_in_halves` and give up only
those, each with its own log line, instead of the batch. The ingest server keeps a search its
deadline cut short (:class:`Halving`) for its client's retry, which continues it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Halving", "write_in_halves"]

T = TypeVar("T")


class Halving(Generic[T]):
    """A search for the items of ``items`` (which failed to be written together) that fail alone.

    ``pending`` holds what is left, the next on top: ``(piece, failed)``, a piece to write, or one that
    failed and is to be split. When ``write`` raises, the piece being written stays on top, so
    :meth:`run` called again later continues the search where it stopped: nothing written is written
    again, nothing found is searched for again."""

    __slots__ = ("pending",)

    def __init__(self, items: Sequence[T]) -> None:
        self.pending: list[tuple[list[T], bool]] = [(list(items), True)]

    def run(self, write: Callable[[list[T]], bool], refuse: Callable[[T], None]) -> None:
        """Write the pieces left: each that fails is split again, down to single items, each of which goes
        to ``refuse``. ``write(piece)`` returns True when the piece is done with (written, or kept
        elsewhere, as a spill file), False when it failed because of something in it. What ``write``
        raises propagates (the ingest's "database unavailable": its client retries the request) and
        leaves the search as it stood. A single item failed already: it is refused without a write. The
        pieces are kept on a stack, not recursed into, so no batch size reaches the recursion limit."""
        pending = self.pending
        while pending:
            piece, failed = pending[-1]
            if not failed:
                if write(piece):
                    pending.pop()
                else:
                    pending[-1] = (piece, True)
                continue
            pending.pop()
            if len(piece) == 1:
                refuse(piece[0])
                continue
            half = len(piece) // 2
            pending.append((piece[half:], False))
            pending.append((piece[:half], False))  # on top: the first half is written first


def write_in_halves(items: Sequence[T], write: Callable[[list[T]], bool], refuse: Callable[[T], None]) -> None:
    """After ``items`` failed to be written together, write them in halves, each half that fails
    again in halves, down to single items: each item that fails alone goes to ``refuse`` (see
    :meth:`Halving.run`)."""
    Halving(items).run(write, refuse)
