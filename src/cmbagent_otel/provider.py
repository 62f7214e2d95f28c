"""Build a TracerProvider from the standard ``OTEL_*`` environment variables.

Honoured: ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_BSP_*`` (batch processor), every
``OTEL_EXPORTER_OTLP_*`` variable (read by the OTLP exporters themselves) and
``OTEL_TRACES_EXPORTER``: a comma list of ``otlp`` (protocol from
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc``, the
default as with ``opentelemetry-instrument``, or ``http/protobuf``), ``console``,
``none``, ``cmbagent_dag`` (the relational DAG exporter) or any other name registered
under the ``opentelemetry_traces_exporter`` entry point group. Default: ``cmbagent_dag``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib.metadata import entry_points

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

logger = logging.getLogger("cmbagent_otel")

DEFAULT_EXPORTERS = "cmbagent_dag"
DEFAULT_SERVICE_NAME = "cmbagent"


class ConfigurationError(ValueError):
    """An ``OTEL_*`` setting or an ``instrument()`` option cannot be honoured."""


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def exporter_names(value: str | Sequence[str] | None = None) -> list[str]:
    """Exporter names: argument > ``OTEL_TRACES_EXPORTER`` > ``cmbagent_dag``."""
    if value is None:
        value = os.environ.get("OTEL_TRACES_EXPORTER") or DEFAULT_EXPORTERS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip().lower() for name in items if name and name.strip()]
    return [name for name in names if name != "none"]


def _otlp_protocol() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip().lower()


def create_exporter(name: str) -> SpanExporter:
    """Instantiate one span exporter by its ``OTEL_TRACES_EXPORTER`` name."""
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = _otlp_protocol()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        if protocol in ("http/protobuf", "http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

            return HTTPExporter()
        raise ConfigurationError(f"unsupported OTLP protocol {protocol!r} (use grpc or http/protobuf)")
    if name == "cmbagent_dag":
        from .exporters.dag import DagSpanExporter

        return DagSpanExporter()
    for entry in entry_points(group="opentelemetry_traces_exporter"):
        if entry.name == name:
            return entry.load()()  # type: ignore[no-any-return]
    raise ConfigurationError(
        f"unknown traces exporter {name!r} in OTEL_TRACES_EXPORTER (known: otlp, console, none, cmbagent_dag)"
    )


def build_tracer_provider(
    exporters: str | Sequence[str] | None = None,
    *,
    service_name: str | None = None,
    span_exporters: Sequence[SpanExporter] = (),
) -> TracerProvider:
    """A TracerProvider with one ``BatchSpanProcessor`` per configured exporter.

    ``exporters`` overrides ``OTEL_TRACES_EXPORTER``; ``span_exporters`` adds exporter
    instances (each behind its own batch processor); ``service_name`` is used only when
    neither ``OTEL_SERVICE_NAME`` nor ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` is set.
    """
    attributes = {}
    env_has_name = bool(os.environ.get("OTEL_SERVICE_NAME")) or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not env_has_name:
        attributes[SERVICE_NAME] = service_name or DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    instances = [create_exporter(name) for name in exporter_names(exporters)]
    instances.extend(span_exporters)
    for exporter in instances:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
