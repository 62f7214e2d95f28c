"""The OpenTelemetry SDK's own log records carry no secret either.

Found by the fifteenth campaign. The eleventh redacted the records of our loggers; the SDK's
exporters and processors log on theirs, into the same handlers (and an OTLP log exporter): the
gRPC OTLP exporter writes its endpoint into every failure (``Failed to export traces to
svc:<password>@collector:4317``, then gRPC's own ``errors resolving svc:<password>@…: …``), and the
batch and simple span processors log the traceback of an exception an exporter raised (a driver's
``could not connect to postgresql://app:<password>@db``). A password in
``OTEL_EXPORTER_OTLP_ENDPOINT``, or quoted by another exporter's exception, went into those records
whole. The redacting filter now sits on those SDK loggers too; and a scheme-less
``user:password@host:port`` followed by ``:`` (a log line's "host:9: reason") is recognised.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _leaks(caplog: pytest.LogCaptureFixture, secret: str) -> list[str]:
    return [f"{record.name}: {caplog.handler.format(record)[:200]}" for record in caplog.records
            if secret in caplog.handler.format(record)]


def test_the_grpc_exporter_does_not_log_the_endpoints_password(caplog: pytest.LogCaptureFixture) -> None:
    password = f"Pw{secrets.token_hex(8)}"
    caplog.set_level(logging.DEBUG)
    provider = TracerProvider()
    # gRPC takes no user:password in its target: the export fails and is logged, quoting it
    exporter = OTLPSpanExporter(endpoint=f"http://svc:{password}@127.0.0.1:9", insecure=True, timeout=2)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("s").end()
    provider.shutdown()
    failures = [caplog.handler.format(r) for r in caplog.records
                if r.name.startswith("opentelemetry.exporter") and r.levelno >= logging.WARNING]
    assert failures, [r.getMessage() for r in caplog.records]  # the failure is still logged, host and all
    assert all("svc:[REDACTED]@127.0.0.1:9" in failure for failure in failures), failures
    assert not _leaks(caplog, password)


class _Refused(SpanExporter):
    """Another exporter (a database's), failing with its driver's message."""

    def __init__(self, password: str) -> None:
        self.password = password

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError(f"could not connect to postgresql://app:{self.password}@db.internal/traces "
                              f"(dsn app:{self.password}@db.internal:5432: timeout)")

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("processor", [SimpleSpanProcessor, BatchSpanProcessor])
def test_processors_do_not_log_an_exporters_secret(caplog: pytest.LogCaptureFixture, processor: type,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    password = f"Pw{secrets.token_hex(8)}"
    caplog.set_level(logging.DEBUG)
    # the SDK's DuplicateFilter drops a record equal to the last one within the same 20 s: an earlier
    # test's failing exporter under a BatchSpanProcessor would hide this one's
    for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export"):
        for found in logging.getLogger(name).filters:
            if hasattr(found, "last_log"):
                monkeypatch.delattr(found, "last_log")
    provider = TracerProvider()
    provider.add_span_processor(processor(_Refused(password)))
    provider.get_tracer("t").start_span("s").end()
    provider.force_flush()
    provider.shutdown()
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("opentelemetry.sdk")]
    assert tracebacks, [r.getMessage() for r in caplog.records]
    assert "ConnectionError" in caplog.handler.format(tracebacks[0])
    assert redaction.REDACTED in caplog.handler.format(tracebacks[0])
    assert not _leaks(caplog, password)
