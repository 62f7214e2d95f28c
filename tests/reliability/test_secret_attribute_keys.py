"""Attribute keys that quote a secret, and attribute names that only look secret.

Found by the eleventh campaign. Keys: only attribute *values* were redacted; a key that quotes a key
(an instrumentation naming a header or a cache entry by a token, ``custom.<registered key>``, the
workflow API's ``attributes={"note sk-...": 1}``) reached the DAG rows written by the exporter and
by the ingest (``meta.attributes``), the spill files on disk and, for ``attributes=``, the span
itself. Keys are now redacted like values where attributes are copied (the DAG mapping, the spill
scrub, the workflow API); a key that quotes a secret is stored with ``[REDACTED]`` in it.

Names: ``aws.secretsmanager.secret.arn`` (an ARN: an identifier) counted as a secret name since the
ninth campaign, and an ARN in a text lost its resource part (``secretsmanager:`` and ``:secret:``
read as secret-named keys). A name ending in ``.arn``/``_arn``/``-arn`` is no secret name now, and
ARNs are skipped by the key/value scan; a secret value put under such a name is still caught by
its value.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span

import cmbagent_otel as c
from cmbagent_otel import redaction, spill

from .test_foreign_arrays import rows_of_a_foreign_span

pytestmark = pytest.mark.usefixtures("isolated_secrets")

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/planck-db-a1B2c3"


def _markers() -> tuple[str, str]:
    shaped, registered = f"sk-proj-QZ{secrets.token_hex(16)}", f"QZXW{secrets.token_hex(10)}WXZQ"
    redaction.register_secret(registered)
    return shaped, registered


def test_attribute_keys_quoting_a_secret_never_reach_rows(tmp_path: Path) -> None:
    shaped, registered = _markers()

    def fill(span: Span) -> None:
        span.set_attribute(f"http.request.header.x-{shaped}", "seen")
        span.set_attribute(f"cache.{registered}.hits", 3)
        span.set_attribute("visible.note", "kept as written")

    stored = rows_of_a_foreign_span(tmp_path, "keys", {f"note {shaped}": "v", f"k-{registered}": 2}, fill)
    assert sum("kept as written" in row for row in stored) >= 2  # the span reached both databases
    leaks = [row[:80] for row in stored if shaped[8:] in row or registered in row]
    assert not leaks, leaks
    assert any("http.request.header.x-[REDACTED]" in row for row in stored)  # the key, redacted


def test_attribute_keys_quoting_a_secret_never_reach_spans_or_spill_files() -> None:
    shaped, registered = _markers()
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    c.instrument(tracer_provider=provider, instrument_cmbagent=False, instrument_threading=False)
    try:
        tracer = provider.get_tracer("other.instrumentation")
        with c.workflow("keys", attributes={f"note {shaped}": "v", f"k-{registered}": 2, "password": "x"}), \
                tracer.start_as_current_span("client call") as span:
            span.set_attribute(f"cache.{registered}", 1)
            span.add_event("lookup", {f"header {shaped}": "x"})
    finally:
        c.uninstrument()
        provider.shutdown()
    spans = memory.get_finished_spans()
    spilled = spill.without_secrets(spans)  # what a spill file holds
    # ours as recorded; the other instrumentation's as the spill store writes it (its span is its own)
    kept = [s for s in spans if s.name != "client call"] + [s for s in spilled if s.name == "client call"]
    keys = [key for s in kept for key in [*(s.attributes or {}), *(k for e in s.events for k in (e.attributes or {}))]]
    assert any(key.startswith("cmbagent.attr.note") or "note " in key for key in keys), keys
    leaks = [key for key in keys if shaped[8:] in key or registered in key]
    assert not leaks, leaks


def test_an_arn_is_no_secret_but_a_secret_under_its_name_is(tmp_path: Path) -> None:
    _, registered = _markers()
    assert not redaction.is_secret_key("aws.secretsmanager.secret.arn")
    assert redaction.redact(f"fetching {ARN} failed") == f"fetching {ARN} failed"
    assert redaction.scrub({"aws.secretsmanager.secret.arn": ARN}) == {"aws.secretsmanager.secret.arn": ARN}
    redacted = redaction.redact(f"secret: {registered}, password={registered[:8]}")
    assert redacted == "secret: [REDACTED], password=[REDACTED]"

    def fill(span: Span) -> None:
        span.set_attribute("aws.secretsmanager.secret.arn", ARN)
        span.set_attribute("cloud.resource.arn", registered)  # a secret value, whatever the name

    stored = rows_of_a_foreign_span(tmp_path, "arn", {}, fill)
    assert sum(ARN in row for row in stored) >= 2  # kept, in both databases
    leaks = [row[:80] for row in stored if registered in row]
    assert not leaks, leaks
