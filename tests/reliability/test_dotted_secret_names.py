"""Secret-named attributes written the OpenTelemetry way, with dots between the words.

Key names counted as secret when ``api_key``, ``private_key``, ``access_key``... were written
with ``_`` or ``-`` and ``secret``/``credential``/``password`` were followed by word characters
only; OpenTelemetry attribute names join words with dots, so another instrumentation's (or the
workflow API's ``attributes=``) ``openai.api.key``, ``aws.secret.access.key``, ``private.key``
and the old semantic convention ``db.connection_string`` kept their values in the DAG rows,
stored by the exporter and by the ingest (values without a key shape: only the name tells).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from opentelemetry.trace import Span

from cmbagent_otel import redaction

from .test_foreign_arrays import rows_of_a_foreign_span

NAMES = ("openai.api.key", "aws.secret.access.key", "tls.private.key", "db.connection_string",
         "azure.storage.account.key", "http.request.header.x-client-secret-v2")


@pytest.mark.parametrize("name", NAMES)
def test_a_dotted_secret_name_is_secret(name: str) -> None:
    assert redaction.is_secret_key(name)
    assert redaction.scrub({name: "QZXWplainvalue"}) == {name: redaction.REDACTED}


def test_usage_counts_and_ordinary_names_are_kept() -> None:
    for name in ("gen_ai.usage.input_tokens", "service.name", "keyboard.layout", "gen_ai.tool.call.arguments",
                 "db.system", "http.request.method"):
        assert not redaction.is_secret_key(name), name


def test_dotted_secret_names_never_reach_rows(tmp_path: Path) -> None:
    values = {name: f"QZXW{secrets.token_hex(10)}WXZQ" for name in NAMES}  # no key shape
    own = {"openai.api.key": values["openai.api.key"]}  # the workflow API's attributes=

    def fill(span: Span) -> None:
        span.set_attributes(values)
        span.set_attribute("visible.note", "kept as written")

    stored = rows_of_a_foreign_span(tmp_path, "dotted names", own, fill)
    assert sum("kept as written" in row for row in stored) >= 2  # the span reached both databases
    leaks = [(name, row[:60]) for row in stored for name, value in values.items() if value in row]
    assert not leaks, leaks
