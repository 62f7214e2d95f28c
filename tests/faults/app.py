"""Child process of the fault-injection suite: a traced workflow exported to the DAG database.

argv: DB_URL SPILL_DIR RECORD_FILE. Settings come from the environment:

* ``FAULT_SESSION`` (session id), ``FAULT_STEPS``, ``FAULT_CALLS`` (llm spans per step),
  ``FAULT_PAYLOAD`` (an attribute of that many characters on the llm spans of even steps);
* ``FAULT_BATCH``, ``FAULT_QUEUE``, ``FAULT_DELAY_MS`` (the DAG processor), ``FAULT_TIMEOUT``
  (export deadline);
* ``FAULT_SYNC=1``: after each step, flush, print ``FLUSHED <n> <stats>`` and wait for a line on
  stdin; ``FAULT_START=1``: wait for a line on stdin before the first span;
  ``FAULT_SIGNAL_AT=n``: print ``AT n`` after step n and carry on;
* ``FAULT_FSIZE``: RLIMIT_FSIZE in bytes (every file this process writes stops growing there,
  as on a full disk; the record goes to a pipe or an already-open file and is exempt only
  when it is stdout).

The independent record: every span this process ends is written, before the DAG processor
sees it, as one JSON line (``cmbagent_otel.spill.span_to_record``) to RECORD_FILE (``-`` for
stdout) with an unbuffered ``write`` (survives ``kill -9``: it is in the kernel at once).
``{"flushed": n}`` lines mark the points where everything before was flushed. At the end
``DONE <exporter stats> <processor stats>`` is printed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from typing import Any

from cmbagent_otel.exporters.dag import DagSpanExporter
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

import cmbagent_otel
from cmbagent_otel import phase, step, workflow
from cmbagent_otel._spans import TracedSpan
from cmbagent_otel.processor import DurableBatchSpanProcessor
from cmbagent_otel.spill import span_to_record


class Recorder(SpanProcessor):
    """Writes every ended span to the record before any other processor sees it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def line(self, obj: Any) -> None:
        data = (json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii")
        while data:
            data = data[os.write(self.fd, data):]

    def on_end(self, span: ReadableSpan) -> None:
        self.line(span_to_record(span))


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main() -> None:
    db_url, spill_dir, record = sys.argv[1:4]
    fd = sys.stdout.fileno() if record == "-" else os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    out = sys.stderr if record == "-" else sys.stdout  # protocol lines
    if os.environ.get("FAULT_FSIZE"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        limit = int(os.environ["FAULT_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    recorder = Recorder(fd)
    exporter = DagSpanExporter(db_url, timeout=float(os.environ.get("FAULT_TIMEOUT", "2")), spill_dir=spill_dir)
    processor = DurableBatchSpanProcessor(exporter, max_export_batch_size=env_int("FAULT_BATCH", 64),
                                          max_queue_size=env_int("FAULT_QUEUE", 2048),
                                          schedule_delay_millis=env_int("FAULT_DELAY_MS", 50))
    provider = TracerProvider()
    provider.add_span_processor(recorder)  # first: a span is recorded before it can be exported
    provider.add_span_processor(processor)
    cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    foreign = trace.get_tracer("some.other.library", tracer_provider=provider)
    sync = os.environ.get("FAULT_SYNC") == "1"
    print("READY", flush=True, file=out)
    if os.environ.get("FAULT_START") == "1":
        sys.stdin.readline()
    session = os.environ.get("FAULT_SESSION") or None
    with workflow(f"fault run {os.getpid()}", mode="planning-control", session_id=session, task="fault injection"), \
            phase("control"):
        for number in range(1, env_int("FAULT_STEPS", 3) + 1):
            with step(number, f"step {number}"):
                for call in range(env_int("FAULT_CALLS", 4)):
                    attrs = {"gen_ai.usage.input_tokens": 10 + call, "gen_ai.usage.output_tokens": 2,
                             "gen_ai.request.model": "m"}
                    if number % 2 == 0 and env_int("FAULT_PAYLOAD", 0):
                        attrs["payload"] = "x" * env_int("FAULT_PAYLOAD", 0)
                    with TracedSpan(f"chat m{call}", "llm", attrs), foreign.start_as_current_span(f"http {call}"):
                        pass
            if sync:
                provider.force_flush()
                recorder.line({"flushed": number})
                print(f"FLUSHED {number} {compact(exporter.stats())}", flush=True, file=out)
                sys.stdin.readline()
            if number == env_int("FAULT_SIGNAL_AT", 0):
                print(f"AT {number}", flush=True, file=out)  # and go on: the parent kills us mid-run
    provider.force_flush()
    recorder.line({"flushed": "end"})
    stats = exporter.stats()
    queue = processor.stats()
    provider.shutdown()
    print(f"DONE {compact(stats)} {compact(queue)}", flush=True, file=out)


if __name__ == "__main__":
    main()
