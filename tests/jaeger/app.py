"""One instrumented application process for the Jaeger tests.

``python app.py OUT.json TASK``: ``cmbagent_otel.instrument()`` configured only by the
``OTEL_*`` environment (the tests set ``OTEL_TRACES_EXPORTER=otlp`` and the protocol and
endpoint), plus an in-memory copy of every span; runs the offline demo workflow (real AG2
agents answering through cmbagent_otel.testing's offline model client: planning, three
steps in 4-agent group chats, a tool call, successful and failing code executions, two
redos); flushes by ``uninstrument()``; writes the copy to OUT.json as OTLP/JSON (hex ids,
as Jaeger's ``/api/v3`` answers) so the test can compare it with what Jaeger stored.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel.demo import run_demo


def otlp_json(exporter: InMemorySpanExporter) -> dict[str, Any]:
    """OTLP/JSON ``TracesData`` of the copied spans, with hex trace/span ids."""
    doc = json_format.MessageToDict(encode_spans(exporter.get_finished_spans()), use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:   # proto3 JSON writes bytes as base64; OTLP/JSON wants hex
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


def main(out: Path, task: str) -> None:
    logging.getLogger("autogen").setLevel(logging.WARNING)
    copy = InMemorySpanExporter()
    provider = cmbagent_otel.instrument(span_exporters=[copy], instrument_cmbagent=False)
    if provider is None:
        sys.exit("instrumentation is disabled (OTEL_SDK_DISABLED?)")
    with tempfile.TemporaryDirectory(prefix="jaeger-app-") as work, contextlib.redirect_stdout(io.StringIO()):
        run_demo(work, task=task)
    cmbagent_otel.uninstrument()   # flushes the OTLP exporter and the copy
    out.write_text(json.dumps(otlp_json(copy)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
