"""Thirtieth fault campaign: the metric series bound (``metrics.SERIES_MAX``) under threads and re-instrumenting.

The bound is one set of attribute sets per instrument, checked then added without a lock ("a bound, not
an exact count"): threads racing at the cap may each add one, never more, and no recording is lost.
The instruments (and so their sets) are made once per meter provider: ``uninstrument()`` then
``instrument()`` with the same provider does not start a fresh allowance of series.
"""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import cmbagent_otel
from cmbagent_otel import metrics
from cmbagent_otel.instrumentation.ag2 import AG2Instrumentor

from .test_faults29_metric_series import OVERFLOW, _points, meters  # noqa: F401 (a fixture)


def test_threads_racing_at_the_cap_add_at_most_one_series_each(
        meters: tuple[MeterProvider, InMemoryMetricReader]) -> None:  # noqa: F811
    provider, reader = meters
    model = metrics.model_metrics(provider)
    assert model is not None
    threads, per_thread = 8, 400  # 3,200 attribute sets for 2,000 places, all threads near the cap at once
    start = threading.Barrier(threads)

    def record(label: int) -> None:
        start.wait()
        for n in range(per_thread):
            model.code_failure(f"lang{n}-{label}", "nonzero_exit_code")
            model.code_failure("python", "nonzero_exit_code")  # one set shared by all threads

    pool = [threading.Thread(target=record, args=(k,)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    points = _points(reader)[metrics.CODE_EXECUTION_FAILURES]
    kept = [p for p in points if OVERFLOW not in p.attributes]
    assert len(kept) <= metrics.SERIES_MAX + threads - 1, len(kept)
    assert sum(p.value for p in points) == 2 * threads * per_thread  # every failure counted somewhere
    shared = [p for p in kept if p.attributes.get("cmbagent.code.language") == "python"]
    assert len(shared) == 1 and shared[0].value == threads * per_thread  # in the first hundreds: kept whole
    assert next(p for p in points if OVERFLOW in p.attributes).value > 0


def test_instrumenting_again_with_the_same_meter_provider_keeps_its_bound(
        meters: tuple[MeterProvider, InMemoryMetricReader]) -> None:  # noqa: F811
    """Three instrument/uninstrument cycles, each recording 1,000 new attribute sets: 3,000 in all."""
    provider, reader = meters
    tracers = TracerProvider()
    used = []
    try:
        for cycle in range(3):
            cmbagent_otel.instrument(tracer_provider=tracers, meter_provider=provider, instrument_cmbagent=False)
            try:
                model = AG2Instrumentor()._state.metrics
                assert model is not None
                used.append(model)
                for n in range(1000):
                    model.code_failure(f"lang{cycle}-{n}", "nonzero_exit_code")
            finally:
                cmbagent_otel.uninstrument()
    finally:
        tracers.shutdown()
    assert all(model is used[0] for model in used)
    points = _points(reader)[metrics.CODE_EXECUTION_FAILURES]
    assert len(points) == metrics.SERIES_MAX + 1
    assert sum(p.value for p in points) == 3000
    assert [p.value for p in points if OVERFLOW in p.attributes] == [1000]

