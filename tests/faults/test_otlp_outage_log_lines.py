"""An OTLP backend that is down: one line per outage, with the spans lost (fourteenth fault campaign).

The SDK's ``BatchSpanProcessor`` drops a batch its OTLP exporter could not send, and the exporter
logs every such batch (gRPC: a retry warning and an error; HTTP: a warning and an error), none
saying how many spans were lost: a collector down for an hour gave thousands of lines and no
total. The OTLP exporter ``instrument()`` builds now reports the first failed batch (the SDK's own
lines for it name the cause) with its span count, keeps quiet while the outage lasts, and says in
one line when exports work again (or at shutdown) how many spans in how many batches were lost.
Real exporters, a real receiver (``cmbagent-otel ingest``) started mid-test on the port.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cmbagent_otel.ingest import IngestServer
from cmbagent_otel.provider import build_tracer_provider


def _point_at(monkeypatch: pytest.MonkeyPatch, protocol: str, port: int) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    if protocol == "grpc":
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    else:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}/v1/traces")


def _batch(provider, label: str) -> None:  # type: ignore[no-untyped-def]
    tracer = provider.get_tracer("fault")
    for number in range(3):
        with tracer.start_as_current_span(f"{label}-{number}"):
            pass
    provider.force_flush()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_an_otlp_outage_logs_once_and_counts_the_spans_it_lost(tmp_path: Path, protocol: str,
                                                              caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              refused_port: int) -> None:
    port = refused_port  # the receiver started below takes it over
    _point_at(monkeypatch, protocol, port)
    caplog.set_level(logging.INFO)
    provider = build_tracer_provider("otlp")
    try:
        _batch(provider, "first")  # nobody listens
        ours = [line for line in _lines(caplog) if line.startswith("cmbagent_otel")]
        assert len(ours) == 1 and "its 3 spans are lost" in ours[0], _lines(caplog)
        caplog.clear()
        for number in range(4):
            _batch(provider, f"down{number}")
        assert _lines(caplog) == []  # was two lines or more per batch, none with a count
        http, grpc = (port, 0) if protocol != "grpc" else (0, port)
        with IngestServer(f"sqlite:///{tmp_path / 'received.db'}", host="127.0.0.1", port=http,
                          grpc_port=grpc) as server:
            # a gRPC channel refused for a while reconnects after its own backoff (a second or more),
            # so its first batches after the receiver is back may still fail: they count as lost too
            for attempt in range(30):
                _batch(provider, f"back{attempt}")
                if server.spans_written:
                    break
            written = server.spans_written
        back = _lines(caplog)
        # gRPC: the batch before may have reached the receiver after its client's 1 s deadline (a failure,
        # so lost as far as the exporter can tell, yet written): its 3 spans then come with the good batch's
        assert written == 3 or (protocol == "grpc" and written == 6), written
        lost = 5 + attempt
        assert len(back) == 1 and "works again after" in back[0], back
        assert f"{3 * lost} spans in {lost} batches" in back[0], back
        if protocol != "grpc":
            assert attempt == 0
    finally:
        provider.shutdown()


def test_an_otlp_backend_still_down_at_shutdown_says_what_was_lost(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   refused_port: int) -> None:
    _point_at(monkeypatch, "http/protobuf", refused_port)
    caplog.set_level(logging.INFO)
    provider = build_tracer_provider("otlp")
    try:
        _batch(provider, "first")
        _batch(provider, "second")
    finally:
        provider.shutdown()
    ours = [line for line in _lines(caplog) if line.startswith("cmbagent_otel")]
    assert len(ours) == 2 and "still failed at shutdown" in ours[1] and ": 6 spans in 2 batches" in ours[1], ours
