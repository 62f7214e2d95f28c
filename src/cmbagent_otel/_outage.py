"""The outage an exporter's destination is in: when it began and what it has cost since.

Both span exporters that can lose their destination (the DAG exporter, which spills while its
database is away, and the OTLP exporter wrapper, whose batches are lost) log one line when an
outage starts and one when it ends, instead of one per batch; this is their shared tally.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ._forksafe import reset_in_child


@dataclass
class Outage:
    """One outage: when its first failed batch came, and the spans and batches it cost since."""

    since: float
    spans: int
    batches: int = 1

    def seconds(self) -> float:
        """How long the outage has lasted."""
        return time.monotonic() - self.since


class OutageTally:
    """The outage in progress, if any, counted batch by batch; thread-safe."""

    def __init__(self) -> None:
        self._current: Outage | None = None
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")

    @property
    def ongoing(self) -> bool:
        """Whether a failed batch has come since the last export that worked."""
        return self._current is not None

    def failed(self, spans: int) -> bool:
        """Count a failed batch of ``spans`` spans; ``True`` when it is the outage's first."""
        with self._lock:
            current = self._current
            if current is None:
                self._current = Outage(time.monotonic(), spans)
                return True
            current.spans += spans
            current.batches += 1
            return False

    def recovered(self) -> Outage | None:
        """End the outage in progress (an export worked, or the exporter shuts down) and return it."""
        with self._lock:
            outage, self._current = self._current, None
        return outage
