"""The language of a code block is the model's text: redacted and bounded like a name.

Found by the twenty-fifth campaign. AG2 takes a code block's language from its fence's info
string (```` ```<word> ````, any run of word characters), which the model writes. It went as
given into the ``execute_code <language>`` span name, ``cmbagent.code.language`` and the code
metrics' ``code.language`` attribute (the failure count: AG2 refuses an unknown language), with
content capture off too: a key written there (a GitHub ``ghp_`` token, a registered key, both
word characters only) reached every span exporter and metric reader. It is now redacted and
bounded (``bounded_name(redact_name(...))``); ``python``/``bash`` are unchanged.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import cmbagent_otel
from cmbagent_otel import redaction

from .conftest import ON_CMBAGENT_AUTOGEN, group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = [pytest.mark.usefixtures("isolated_secrets"), needs_custom_client,
              pytest.mark.skipif(ON_CMBAGENT_AUTOGEN, reason="cmbagent_autogen's code extractor takes only untagged "
                                 "and python blocks (bash for its installer, markdown for its researcher's formatter): "
                                 "no model-written language tag reaches its executor")]


def _run(where: Sink, work_dir: Path, code_message: str, capture: bool) -> tuple[list[Any], str]:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cmbagent_otel.instrument(tracer_provider=where.provider, meter_provider=meters, capture_content=capture,
                             instrument_cmbagent=False)
    script = [{"tool_calls": [{"id": "call_lang_1", "name": "peak_position", "arguments": {"multipole": 2}}]},
              code_message]
    group_chat(work_dir, engineer_script=script)
    where.provider.force_flush()
    metrics = reader.get_metrics_data().to_json()
    meters.shutdown()
    return [s for s in where.memory.get_finished_spans() if s.name.startswith("execute_code")], metrics


@pytest.mark.parametrize("capture", [False, True], ids=["content-off", "content-on"])
def test_attack4_code_language_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                           tmp_path: Path, capture: bool) -> None:
    github = "ghp_" + secrets.token_hex(18)  # caught by its shape
    registered = "QZ" + secrets.token_hex(16)
    redaction.register_secret(registered)
    spans, metrics = _run(sink, tmp_path / "chat", f"```{github}\nprint(1)\n```\n\n```{registered}\nprint(2)\n```",
                          capture)
    assert spans, "no code execution span"
    assert all(redaction.REDACTED in str(s.attributes.get("cmbagent.code.language")) for s in spans)
    assert github not in metrics and registered not in metrics
    assert_clean(sink, caplog, github, registered)


def test_attack4_code_language_is_bounded_and_plain_kept(sink: Sink, tmp_path: Path) -> None:  # noqa: F811
    spans, _ = _run(sink, tmp_path / "chat", "```" + "x" * 50_000 + "\nprint(1)\n```", False)
    assert spans and all(len(s.name) <= 300 and len(str(s.attributes["cmbagent.code.language"])) <= 256
                         for s in spans)
    cmbagent_otel.uninstrument()
    sink.memory.clear()
    spans, _ = _run(sink, tmp_path / "chat2", "```python\nprint(1)\n```", False)
    assert [(s.name, s.attributes["cmbagent.code.language"]) for s in spans] == [("execute_code python", "python")]
