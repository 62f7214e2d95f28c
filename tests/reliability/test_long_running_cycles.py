"""instrument() / uninstrument() and exporter lifecycles repeated in one long-lived process leave
nothing behind.

A service may re-instrument (configuration reloads, tests, a worker pool recycling its telemetry)
and create and shut down DAG exporters for as long as it runs. Each cycle must give back what it
took: threads, file descriptors, signal handlers, patched methods, and the objects it registered
with process-wide registries (the metrics API's global provider, fork hooks). Measured by counting
live objects (``gc.get_objects``), threads and descriptors: never by time or RSS.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import TracerProvider

import cmbagent_otel
from cmbagent_otel.processor import DurableBatchSpanProcessor

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: the metrics API's global provider is then the proxy that keeps
# every meter and instrument asked of it (once a test sets an SDK meter provider, it cannot be unset).
_METER_CYCLES = """
import gc, json, os, sys
import cmbagent_otel
from opentelemetry import metrics

def meters_and_instruments():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, (metrics.Meter, metrics.Instrument)))

def cycle():
    cmbagent_otel.instrument(exporters="none", instrument_cmbagent=False, instrument_threading=False,
                             metrics=True, set_global=False)
    with cmbagent_otel.workflow("request", mode="one-shot"):
        pass
    cmbagent_otel.uninstrument()

cycle()
first = meters_and_instruments()
for _ in range(int(sys.argv[1])):
    cycle()
print(json.dumps({"first": first, "last": meters_and_instruments(),
                  "proxy_meters": len(getattr(metrics.get_meter_provider(), "_meters", ()))}))
"""


def test_instrument_cycles_make_no_new_meters_or_instruments(tmp_path: Path) -> None:
    """Before: every instrument() asked the global meter provider for two new meters and seven new
    instruments; the API's proxy provider (the global one until an SDK provider is set, i.e. for
    every application that does not export metrics) keeps them all: 2 meters and 7 instruments more
    per cycle, for ever. Now the instruments of a provider are made once and reused."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "CMBAGENT_OTEL_WORK_DIR": str(tmp_path), "OTEL_METRICS_EXPORTER": "none"}
    env.pop("CMBAGENT_OTEL_METRICS", None)
    done = subprocess.run([sys.executable, "-c", _METER_CYCLES, "30"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["first"] > 0  # metrics were on: the instruments exist
    assert counts["last"] == counts["first"], counts
    assert counts["proxy_meters"] <= 2, counts


def _our_functions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if type(o).__name__ == "function" and getattr(o, "__module__", None) == "cmbagent_otel.processor")


def _batch_threads(before: set[threading.Thread] | None = None) -> list[str]:
    """Our threads alive now, other than those in ``before`` (an earlier test's idle-ending one)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("cmbagent-otel") and t not in (before or ())]


def test_dag_processors_made_and_shut_down_leave_no_hooks_threads_or_descriptors(tmp_path: Path) -> None:
    """Before: each DurableBatchSpanProcessor registered its own fork hook (os.register_at_fork
    cannot unregister), so every processor ever made (one per instrument() with the DAG exporter)
    left a closure behind, run at every later fork. Now one module-level hook restarts the
    workers of the processors still running."""
    url = f"sqlite:///{tmp_path}/dag.db"
    provider = TracerProvider()
    tracer = provider.get_tracer("cycles")
    before = set(threading.enumerate())

    def cycle(index: int) -> None:
        processor = DurableBatchSpanProcessor(DagSpanExporter(url, spill_dir=tmp_path / "spill"))
        with tracer.start_as_current_span(f"span {index}") as span:
            processor.on_start(span)  # type: ignore[arg-type]
        processor.on_end(span)  # type: ignore[arg-type]
        processor.force_flush()
        processor.shutdown()

    cycle(0)
    functions, fds = _our_functions(), len(os.listdir("/proc/self/fd"))
    for index in range(1, 31):
        cycle(index)
    assert _our_functions() == functions
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _batch_threads(before) == []
    assert not list(tmp_path.joinpath("spill").glob("*")) or all(
        p.is_dir() for p in tmp_path.joinpath("spill").iterdir())


def _handlers() -> tuple[Any, ...]:
    return tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP))


def test_instrument_cycles_give_back_threads_descriptors_handlers_and_methods(tmp_path: Path,
                                                                             monkeypatch: Any) -> None:
    """100 instrument() / uninstrument() cycles with the DAG exporter: no thread, descriptor, signal
    handler, patched method or object of ours is left from one cycle to the next."""
    from autogen import ConversableAgent
    from autogen.agentchat.groupchat import GroupChat
    from autogen.oai.client import OpenAIWrapper

    monkeypatch.setenv("CMBAGENT_OTEL_DATABASE_URL", f"sqlite:///{tmp_path}/dag.db")
    monkeypatch.setenv("CMBAGENT_OTEL_SPILL_DIR", str(tmp_path / "spill"))
    assert not cmbagent_otel.is_instrumented()
    classes = (ConversableAgent, GroupChat, OpenAIWrapper, threading.Thread)
    methods = [dict(vars(cls)) for cls in classes]
    handlers = _handlers()

    def cycle(index: int) -> None:
        cmbagent_otel.instrument(exporters="cmbagent_dag", set_global=False, instrument_cmbagent=False)
        with cmbagent_otel.workflow(f"request {index}", mode="planning-control"), \
                cmbagent_otel.phase("control"), cmbagent_otel.step(1, "fit"):
            pass
        cmbagent_otel.uninstrument()

    cycle(0)
    gc.collect()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    ours = _objects_of_ours()
    for index in range(1, 101):
        cycle(index)
    gc.collect()
    assert threading.active_count() == threads, _batch_threads()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _handlers() == handlers
    assert [dict(vars(cls)) for cls in classes] == methods  # every wrapper removed
    assert _objects_of_ours() == ours


def _objects_of_ours() -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in gc.get_objects():
        module = getattr(type(o), "__module__", None)
        if type(module) is str and module.startswith("cmbagent_otel"):
            name = f"{module}.{type(o).__qualname__}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_instruments_memo_keeps_no_meter_provider_alive() -> None:
    """The instruments made for a meter provider are reused while it lives, and do not keep it alive."""
    import weakref

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from cmbagent_otel import metrics

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    model, run = metrics.model_metrics(provider), metrics.run_metrics(provider)
    assert model is not None and run is not None
    assert metrics.model_metrics(provider) is model and metrics.run_metrics(provider) is run
    ref = weakref.ref(provider)
    provider.shutdown()
    del provider, model, run
    gc.collect()
    assert ref() is None
