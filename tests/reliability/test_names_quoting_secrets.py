"""Span names that quote a key never carry it into telemetry or rows.

Found by the seventh campaign: a tool's name is the model's text, and it went into the tool span's
name and ``gen_ai.tool.name`` as given; a model that names a tool after a key it saw (or after the
password in the same call's arguments) had it stored whole, capture on or off. Another
instrumentation's span name (``GET https://user:pw@host/…``) went into ``execution_events``,
``dag_nodes`` and run rows as given: the DAG mapping scrubbed attributes and statuses, not names.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

import cmbagent_otel

from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)


@needs_custom_client
@pytest.mark.parametrize("capture_content", [False, True], ids=["capture-off", "capture-on"])
def test_a_tool_named_after_a_key_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                              tmp_path: Path, capture_content: bool) -> None:
    key, password = "sk-proj-" + secrets.token_hex(16), "pw" + secrets.token_hex(8)
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture_content,
                             instrument_cmbagent=False)
    script = [{"tool_calls": [{"id": "call_name_1", "name": f"fetch_{key}", "arguments": {"multipole": 2}},
                              {"id": "call_name_2", "name": f"login_{password}",
                               "arguments": {"password": password}}]}, "done"]
    group_chat(tmp_path / "chat", engineer_script=script)
    assert_clean(sink, caplog, key[8:], password)


def test_another_instrumentations_span_name_is_scrubbed_in_rows(sink: Sink,  # noqa: F811
                                                                caplog: pytest.LogCaptureFixture) -> None:
    password, token = "pw" + secrets.token_hex(8), "ghp_" + secrets.token_hex(12)
    tracer = sink.provider.get_tracer("other.instrumentation")
    cmbagent_otel.instrument(tracer_provider=sink.provider, instrument_cmbagent=False)
    with cmbagent_otel.workflow("foreign names"), cmbagent_otel.phase("control"), \
            cmbagent_otel.step(1, "fetch", agent="engineer"):
        with tracer.start_as_current_span(f"GET https://astro:{password}@data.example.org/maps"):
            pass
        with tracer.start_as_current_span(f"clone with {token}"):
            pass
    with tracer.start_as_current_span(f"root GET https://astro:{password}@data.example.org/"):  # a run of its own
        pass
    sink.provider.force_flush()
    leaks = [where for where, text in sink.texts() if where.startswith("db ") and (password in text or token in text)]
    assert not leaks, leaks
    assert any("data.example.org/maps" in text for where, text in sink.texts() if where.startswith("db "))
