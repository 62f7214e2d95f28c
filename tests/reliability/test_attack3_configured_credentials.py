"""Credentials our own configuration holds are secrets wherever they show up.

Found by the twenty-first campaign. Secret-looking environment variables (``*_API_KEY``,
``*_TOKEN``, ``*_PASSWORD``...) are registered with redaction, so their values are hidden in any
text. The credentials inside the configuration variables of the exporters are not named so:
an OTLP header (``OTEL_EXPORTER_OTLP_HEADERS=x-honeycomb-team=<key>``, a tracing vendor's API key),
a token in an OTLP endpoint's user info (``https://<token>@api.uptrace.dev``, a DSN) or query, the
password of the DAG database's URL. Code or a tool that printed its environment (``env``,
``print(os.environ)``, a config dump) put them whole into spans, events and rows; only the forms
that looked like ``key=value`` of a secret-looking key were caught by shape. They are now
registered like the secret-named variables' values (at import, and again when the environment
changes), so they are redacted in every form and every place.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import pytest

from cmbagent_otel import redaction

from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _token(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@needs_custom_client
def test_attack3_printed_configuration_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    honeycomb, uptrace, query_key, db_password, basic = (_token(p) for p in ("hc", "up", "qk", "Pg", "QmFz"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-honeycomb-team={honeycomb},x-honeycomb-dataset=cmbagent-runs")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_HEADERS", f"Authorization=Basic%20{basic}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"https://{uptrace}@api.uptrace.dev/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"https://otlp.example/v1/metrics?code={query_key}")
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", f"postgresql://tracker:{db_password}@db.internal/cmbagent")
    instrument(sink)
    names = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "CMBAGENT_DATABASE_URL")
    printed = "\n".join(f"{name}={os.environ[name]}" for name in names)  # what `env` prints
    dumped = json.dumps({name: os.environ[name] for name in names})

    def tool(multipole: int, note: str = "") -> str:
        return f"peak {multipole}\n{printed}\nheaders: {honeycomb} / {basic}"

    script = [{"tool_calls": [{"id": "call_cfg_1", "name": "peak_position",
                               "arguments": {"multipole": 2, "note": dumped}}]},
              f"```python\nprint({printed!r})\n```"]
    group_chat(tmp_path / "chat", message=f"the config:\n{printed}", engineer_script=script, tool=tool)
    assert_clean(sink, caplog, honeycomb, uptrace, query_key, db_password, basic)
    assert "cmbagent-runs" in redaction.redact("dataset cmbagent-runs")  # a non-credential header stays


def test_attack3_credentials_set_after_import_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    key = _token("hcaik_")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"x-honeycomb-team={key}")
    redaction.register_new_environment()  # what a code execution or tool result triggers
    assert key not in redaction.redact(f"team key is {key}")


@pytest.mark.parametrize("header", ["x-honeycomb-dataset=cmbagent-runs", "x-scope-orgid=tenant-lab",
                                    "x-tenant=cmbagent", "content-type=application/x-protobuf"])
def test_attack3_headers_that_are_no_credentials_stay_visible(monkeypatch: pytest.MonkeyPatch, header: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", header)
    redaction.register_new_environment()
    value = header.partition("=")[2]
    assert redaction.redact(f"running {value} now") == f"running {value} now"
