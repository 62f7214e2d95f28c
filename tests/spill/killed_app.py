"""Child process for the kill test: exports a run step by step, then waits to be killed.

argv: DB_URL SPILL_DIR RECORD_FILE. Every finished span is also appended (fsynced) to
RECORD_FILE, so the test knows exactly which spans the process produced (and every workflow
or DAG-node span when it starts, as ``{"started": record}``: what the live DAG writes). The parent
synchronises through stdin/stdout: ``FLUSHED n`` after each step's batch is exported.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import cmbagent_otel
from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.spill import span_to_record


class Recorder(SpanExporter):
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._file.write(json.dumps(span_to_record(span)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return SpanExportResult.SUCCESS


class StartRecorder(SimpleSpanProcessor):
    """Records the started records the live DAG sends (workflow and DAG-node spans) as well."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(recorder)
        self.recorder = recorder

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        attrs = span.attributes or {}
        if "cmbagent.dag.node_type" in attrs or attrs.get("cmbagent.span.kind") == "workflow":
            file = self.recorder._file
            file.write(json.dumps({"started": span_to_record(span)}) + "\n")
            file.flush()
            os.fsync(file.fileno())


def main() -> None:
    db_url, spill_dir, record = sys.argv[1:4]
    exporter = DagSpanExporter(db_url, timeout=0.3, spill_dir=spill_dir)
    provider = cmbagent_otel.instrument(exporters="none", span_exporters=[exporter], instrument_cmbagent=False)
    provider.add_span_processor(StartRecorder(Recorder(record)))
    with workflow("killed", mode="planning-control"), phase("control"):
        for number in (1, 2, 3):
            with step(number, f"step {number}"):
                for call in range(3):
                    with TracedSpan(f"chat m{call}", "llm", {"gen_ai.usage.input_tokens": 10 + call,
                                                             "gen_ai.request.model": "m"}):
                        pass
            provider.force_flush()
            print(f"FLUSHED {number} {exporter.stats()['spilled']}", flush=True)
            sys.stdin.readline()  # the parent answers when it is ready; it kills us after step 2


if __name__ == "__main__":
    main()
