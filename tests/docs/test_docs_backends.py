"""The numbers docs/backends.md gives for `cmbagent-otel ingest` are the code's (twenty-fourth
campaign: they held; this keeps them from drifting apart)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cmbagent_otel import _ingest_core, _ingest_grpc, ingest, otlp_decode
from cmbagent_otel import environment_variables as env

from ._read import number

ROOT = Path(__file__).resolve().parents[2]
DOC = " ".join((ROOT / "docs" / "backends.md").read_text().split())


def _number(pattern: str) -> float:
    return number(DOC, pattern)


def _default(name: str) -> float:
    return float(env.SETTINGS[name].default_value())


def test_docs_ingest_numbers_are_the_codes() -> None:
    assert _number(r"commit within (\d+) s of the request") == _ingest_core.WRITE_WAIT
    assert _number(r"committed \(every chunk of (\d+)\)") == _ingest_core.CHUNK_SPANS
    assert _number(r"more than ([\d,]+) unreadable spans") == otlp_decode.MAX_REJECTED
    assert _number(r"Retry-After \((\d+) s\)") == ingest.DEFAULT_RETRY_AFTER
    assert _number(r"At (\d+) HTTP connections in all") == ingest.MAX_CONNECTIONS
    assert _number(r"grpcio takes up to (\d+) calls") == ingest.MAX_GRPC_REQUESTS
    assert _number(r"idle connections close after (\d+) minutes") * 60_000 == _ingest_grpc.IDLE_CONNECTION_MS
    per_client = _default(env.INGEST_MAX_REQUESTS_PER_CLIENT)
    assert _number(r"One client address may have (\d+) requests in flight") == per_client
    assert _number(r"and (\d+) HTTP connections open") == per_client * ingest.CONNECTIONS_PER_CLIENT_REQUEST
    assert _number(r"plus 1 s per (\d+) KiB received") * 1024 == _default(env.INGEST_MIN_RATE)
    assert _number(r"request timeout \((\d+) s, from connecting") == _default(env.INGEST_REQUEST_TIMEOUT)
    assert _number(r"cut to `CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH` \((\d+)\)") == _default(env.MAX_ATTRIBUTE_LENGTH)


def test_docs_ingest_numbers_added_since_session_34() -> None:
    """Session 41 (third pass): the numbers docs/backends.md gained since the twenty-ninth campaign held;
    locked here as the others are."""
    assert _number(r"That search has one deadline, (\d+(?:\.\d+)?) s from") == _ingest_core.HALVING_WAIT
    assert _number(r"\(`IngestServer.start\(\)`, for at most (\d+) s;") == _ingest_core.STARTUP_PREPARE_S
    assert _number(r"nested deeper than (\d+) AnyValue levels") == otlp_decode.MAX_ANY_VALUE_DEPTH
    assert _number(r"past protobuf's limit of (\d+) counted") == otlp_decode._GROUP_DEPTH
    limits = otlp_decode.Limits()
    assert _number(r"holds at most (\d+) elements") == limits.max_array_length
    assert _number(r"a span keeps its first (\d+) attributes, events and links") == limits.max_attributes \
        == limits.max_events == limits.max_links


def test_docs_the_otlp_exporters_default_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 42: examples/cmbagent_offline/README.md sent `otlp` to a Jaeger on localhost:4318, but with no
    OTLP variable set the exporter `instrument()` builds speaks OTLP/gRPC to localhost:4317 (4318 is
    OTLP/HTTP's). The ports the example states, per protocol, are the exporters' defaults."""
    from cmbagent_otel import provider

    for name in list(os.environ):
        if name.startswith("OTEL_EXPORTER_OTLP"):
            monkeypatch.delenv(name)
    readme = " ".join((ROOT / "examples" / "cmbagent_offline" / "README.md").read_text().split())
    grpc = number(readme, r"OTLP/gRPC to port (\d+) by default")
    http = number(readme, r"by default, (\d+) with `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`")
    endpoints = {}
    for protocol in ("grpc", "http/protobuf"):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        exporter = provider.create_exporter("otlp")
        try:
            endpoints[protocol] = urlsplit("//" + exporter.exporter._endpoint.split("://")[-1])  # type: ignore[attr-defined]
        finally:
            exporter.shutdown()
    assert (endpoints["grpc"].hostname, endpoints["grpc"].port) == ("localhost", grpc)
    assert (endpoints["http/protobuf"].hostname, endpoints["http/protobuf"].port) == ("localhost", http)
    assert endpoints["http/protobuf"].path == "/v1/traces"
    assert f"With `grpc`, the endpoint is `host:{grpc:.0f}`; with `http/protobuf` the exporter appends" in DOC
