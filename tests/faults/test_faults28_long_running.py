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


def test_workflows_named_per_request_keep_the_run_metrics_series_bounded() -> None:
    """A service that names each run after its request (``workflow(f"request {id}")``) made a new series
    of each run-level histogram per run: the SDK (1.45, no cardinality limit) keeps every attribute set it
    was given for the life of the provider, ~1 KiB each, i.e. hundreds of MiB a day at a run a second.
    Past :data:`metrics.SERIES_MAX` attribute sets per instrument, a run is counted in one overflow series
    (``otel.metric.overflow=true``, the specification's), not lost. Real workflows, the SDK's reader."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    import cmbagent_otel
    from cmbagent_otel import metrics

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cmbagent_otel.instrument(tracer_provider=TracerProvider(), meter_provider=meters, set_global=False,
                             instrument_cmbagent=False, instrument_threading=False)
    runs = metrics.SERIES_MAX + 150
    try:
        for index in range(runs):
            with cmbagent_otel.workflow(f"request {index}", mode="one_shot"), cmbagent_otel.phase("control"), \
                    cmbagent_otel.step(1, "answer"):
                pass
    finally:
        cmbagent_otel.uninstrument()
    found = {metric.name: list(metric.data.data_points) for resource in reader.get_metrics_data().resource_metrics
             for scope in resource.scope_metrics for metric in scope.metrics}
    meters.shutdown()
    for name in (metrics.WORKFLOW_DURATION, metrics.GEN_AI_WORKFLOW_DURATION, metrics.STEP_DURATION):
        points = found[name]
        assert len(points) <= metrics.SERIES_MAX + 1, (name, len(points))
        assert sum(point.count for point in points) == runs  # every run counted
        overflow = [point for point in points if point.attributes.get("otel.metric.overflow") is True]
        assert len(overflow) == 1 and overflow[0].count == runs - metrics.SERIES_MAX, name
