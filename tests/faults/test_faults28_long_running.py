"""Twenty-eighth fault campaign, part B: what a process that runs for days keeps per request.

The PostgreSQL connection watchdog (``dag/_watchdog.py``) arms each connection checked out under a
deadline and disarms it when it is given back. A disarmed entry stayed in its heap until it reached
the front: while another connection stayed armed (an ingest server writing several requests at once,
a long write beside short ones), one entry per checkout of the last deadline's worth of time, the
class the ingest's gRPC watchdog was fixed for in session 29. On f5cad67 2,000 checkouts beside one
held connection left 2,001 entries; disarmed ones are now dropped once they are most of the heap.
Real sockets (a socketpair per checkout), the real class.
"""

from __future__ import annotations

import socket
import time

from cmbagent_otel.dag._watchdog import Watchdog


def test_watchdog_keeps_no_entry_of_connections_given_back() -> None:
    watchdog = Watchdog()
    held, peer = socket.socketpair()
    try:
        kept = watchdog.arm(held.fileno(), time.monotonic() + 3600, "held")
        assert kept is not None
        for _ in range(2000):
            a, b = socket.socketpair()
            with a, b:
                token = watchdog.arm(a.fileno(), time.monotonic() + 3600, "short")
                watchdog.disarm(token)
        assert len(watchdog._due) <= 130, len(watchdog._due)  # what is armed, plus the slack before a rebuild
        assert list(watchdog._armed) == [kept]
        # still cuts what is due: a connection past its deadline (and the grace) is shut down
        late, late_peer = socket.socketpair()
        with late, late_peer:
            watchdog.arm(late.fileno(), time.monotonic() - 10, "late")
            late_peer.settimeout(60)
            assert late_peer.recv(1) == b""  # the cut: end of stream, not a timeout
        watchdog.disarm(kept)
    finally:
        held.close()
        peer.close()
