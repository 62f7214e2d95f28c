"""instrument() and opentelemetry-instrument configured from OTEL_* variables (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import cmbagent_otel
from cmbagent_otel.provider import ConfigurationError, build_tracer_provider, exporter_names, span_processors

APP = Path(__file__).with_name("app.py")
BIN = Path(sys.executable).parent


def run_app(env: dict[str, str], *, auto: bool = False) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update(env)
    cmd = [str(BIN / "opentelemetry-instrument"), sys.executable, str(APP)] if auto else [sys.executable, str(APP)]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120, check=False)


def test_console_exporter_and_resource_from_env():
    proc = run_app({
        "APP_CALLS_INSTRUMENT": "1", "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc-under-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci", "OTEL_BSP_SCHEDULE_DELAY": "50",
    })
    assert proc.returncode == 0, proc.stderr
    assert "PROVIDER TracerProvider" in proc.stdout and "RESULT pong" in proc.stdout
    for name in ('"name": "conversation alice"', '"name": "invoke_agent alice"', '"name": "chat scripted"'):
        assert name in proc.stdout
    assert '"service.name": "svc-under-test"' in proc.stdout
    assert '"deployment.environment": "ci"' in proc.stdout


def test_sampler_from_env_drops_everything():
    proc = run_app({"APP_CALLS_INSTRUMENT": "1", "OTEL_TRACES_EXPORTER": "console",
                    "OTEL_TRACES_SAMPLER": "always_off"})
    assert proc.returncode == 0, proc.stderr
    assert "RESULT pong" in proc.stdout and '"name":' not in proc.stdout


def test_sdk_disabled_patches_nothing():
    proc = run_app({"APP_CALLS_INSTRUMENT": "1", "OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
    assert proc.returncode == 0, proc.stderr
    assert "PROVIDER None" in proc.stdout and "RESULT pong" in proc.stdout and '"name":' not in proc.stdout


def test_opentelemetry_instrument_auto_instrumentation():
    proc = run_app({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "auto-svc"}, auto=True)
    assert proc.returncode == 0, proc.stderr
    assert '"name": "invoke_agent alice"' in proc.stdout
    assert '"service.name": "auto-svc"' in proc.stdout


def test_metrics_from_env_console_and_none_by_default():
    """OTEL_METRICS_EXPORTER=console: instrument() builds and installs a MeterProvider, flushed by
    uninstrument(); unset: none is built and nothing is printed."""
    proc = run_app({"APP_CALLS_INSTRUMENT": "1", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "console",
                    "OTEL_SERVICE_NAME": "metrics-svc", "OTEL_METRIC_EXPORT_INTERVAL": "600000"})
    assert proc.returncode == 0, proc.stderr
    for name in ('"name": "gen_ai.client.token.usage"', '"name": "gen_ai.client.operation.duration"',
                 '"unit": "{token}"', '"gen_ai.token.type": "input"', '"service.name": "metrics-svc"'):
        assert name in proc.stdout, name
    quiet = run_app({"APP_CALLS_INSTRUMENT": "1", "OTEL_TRACES_EXPORTER": "none"})
    assert quiet.returncode == 0, quiet.stderr
    assert "RESULT pong" in quiet.stdout and "gen_ai.client" not in quiet.stdout


def test_opentelemetry_instrument_metrics_from_env():
    proc = run_app({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "console"}, auto=True)
    assert proc.returncode == 0, proc.stderr
    assert '"name": "gen_ai.client.operation.duration"' in proc.stdout  # exported when the process exits


def test_unknown_exporter_argument_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    with pytest.raises(ConfigurationError, match="unknown traces exporter 'zipkin-typo'"):
        build_tracer_provider(["console", "zipkin-typo"])


def test_bad_exporter_settings_in_the_environment_fall_back_with_a_warning(monkeypatch, caplog):
    """The environment's one policy (docs/configuration.md): warn once, use the default."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,zipkin-typ0")
    with caplog.at_level("WARNING", logger="cmbagent_otel"):
        assert exporter_names() == ["cmbagent_dag"]
    assert "OTEL_TRACES_EXPORTER='console,zipkin-typ0'" in caplog.text and "zipkin-typ0" in caplog.text
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with caplog.at_level("WARNING", logger="cmbagent_otel"):
        processors = span_processors()
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'" in caplog.text
    try:
        assert type(processors[0].span_exporter.exporter).__module__.endswith("proto.grpc.trace_exporter")  # default
    finally:
        for processor in processors:
            processor.shutdown()


def test_exporter_names_resolution(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert exporter_names() == ["cmbagent_dag"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " OTLP , none,console ")
    assert exporter_names() == ["otlp", "console"]
    assert exporter_names("none") == []
    assert exporter_names(["console"]) == ["console"]


def test_entry_points_are_registered():
    instrumentors = {e.name: e.value for e in entry_points(group="opentelemetry_instrumentor")}
    assert instrumentors["cmbagent_ag2"] == "cmbagent_otel.instrumentation.ag2:AG2Instrumentor"
    exporters = {e.name: e.value for e in entry_points(group="opentelemetry_traces_exporter")}
    assert exporters["cmbagent_dag"] == "cmbagent_otel.exporters.dag:DagSpanExporter"
    configurators = {e.name for e in entry_points(group="opentelemetry_configurator")}
    assert "cmbagent_otel" in configurators


def test_distribution_declares_the_instruments_extra():
    """opentelemetry-instrument 0.48b0 and older ask every instrumentor's distribution for its
    ``instruments`` extra through pkg_resources; undeclared, it raised UnknownExtra and no
    instrumentation at all was loaded ("Failed to auto initialize opentelemetry"). pyproject no
    longer allows those releases, but an environment may hold one anyway. Checked on the installed
    metadata, which is what that version reads."""
    from importlib.metadata import metadata

    assert "instruments" in (metadata("cmbagent-otel").get_all("Provides-Extra") or [])


def test_no_allowed_opentelemetry_release_needs_pkg_resources():
    """opentelemetry-instrumentation before 0.49b0 imports pkg_resources with ``BaseInstrumentor``,
    and setuptools 81+ has none. While pyproject allowed 0.48b0, pip paired it with SDK 1.45.2 in a
    fresh Python 3.12/3.13 venv (no instrumentation release matched that SDK's semantic conventions)
    and ``import cmbagent_otel`` failed there. The SDK and exporters floor is the release paired with
    0.49b0. ``opentelemetry-instrumentation`` itself comes pinned by ``-threading``: named beside it,
    pip 23.1-25.0 reported a false ResolutionImpossible in such a venv."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {req.name: req.specifier for req in map(Requirement, project["dependencies"])}
    threading_spec = required["opentelemetry-instrumentation-threading"]
    assert not threading_spec.contains("0.48b0", prereleases=True)
    assert threading_spec.contains("0.49b0", prereleases=True)
    assert "opentelemetry-instrumentation" not in required
    for name in ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-common",
                 "opentelemetry-exporter-otlp-proto-grpc", "opentelemetry-exporter-otlp-proto-http"):
        assert not required[name].contains("1.27.0") and required[name].contains("1.28.0"), name


def test_app_provider_is_never_replaced():
    script = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "import cmbagent_otel\n"
        "mine = TracerProvider()\n"
        "trace.set_tracer_provider(mine)\n"
        "got = cmbagent_otel.instrument()\n"
        "assert got is mine and trace.get_tracer_provider() is mine\n"
        "assert cmbagent_otel.instrument() is mine\n"
        "cmbagent_otel.uninstrument()\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_explicit_provider_wins(capture):
    provider = cmbagent_otel.instrument(tracer_provider=capture.provider)
    try:
        assert provider is capture.provider
        assert not isinstance(trace.get_tracer_provider(), type(None))
    finally:
        cmbagent_otel.uninstrument()
    assert isinstance(capture.provider, TracerProvider)


def test_service_name_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """argument > environment > default, as for every setting (and as ``Resource.create`` merges)."""
    from opentelemetry.sdk.resources import SERVICE_NAME

    from cmbagent_otel.provider import resource

    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert resource("from-code").attributes[SERVICE_NAME] == "from-code"
    assert resource().attributes[SERVICE_NAME] == "from-env"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,team=cmb")
    assert resource("from-code").attributes[SERVICE_NAME] == "from-code"
    assert resource().attributes[SERVICE_NAME] == "from-attrs"
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    assert resource().attributes[SERVICE_NAME] == "cmbagent"


POOL_APP = """
from multiprocessing.pool import ThreadPool
from opentelemetry import trace
from cmbagent_otel import workflow

def trace_id():
    return trace.get_current_span().get_span_context().trace_id

with workflow("a"):
    pool = ThreadPool(1)  # its worker thread starts in run a's context, and keeps it
    pool.apply(trace_id)
with workflow("b"):
    print("POOL", "SAME" if pool.apply(trace_id) == trace_id() else "OTHER", flush=True)
pool.close()
pool.join()
"""


def test_opentelemetry_instrument_runs_thread_pool_tasks_in_the_callers_context():
    """Under ``opentelemetry-instrument`` (no ``instrument()`` call), a ``ThreadPool`` task submitted in run b
    runs in run b's context, as with ``instrument()``: not in run a's, where the pool was made (the pool's
    context binding was only installed by ``instrument()``; on e0732e2 this printed ``POOL OTHER``)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update({"OTEL_TRACES_EXPORTER": "none"})
    proc = subprocess.run([str(BIN / "opentelemetry-instrument"), sys.executable, "-c", POOL_APP], env=full,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "POOL SAME" in proc.stdout, (proc.stdout, proc.stderr)
