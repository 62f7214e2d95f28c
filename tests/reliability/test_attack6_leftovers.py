"""Leftovers of the twenty-sixth campaign: an ordinary-looking id holding an unregistered key of a
known shape, and credentials computed per request that a successful call sends.

Found by the twenty-seventh campaign (a hostile OpenAI-compatible server on loopback, real AG2
agents and the real ``openai`` client). A response or tool call id of letters and digits holding an
AWS access key id (``AKIA``/``ASIA`` + 16 upper-case letters and digits, a shape the redaction knows)
took ``redact_id``'s fast path and was recorded whole: ``_ORDINARY_ID`` only ruled out Google's
``AIza`` keys.
"""

from __future__ import annotations

import secrets
import string

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cmbagent_otel import redaction, semconv

from .test_attack5_server_response_fields import _attributes, _completion, _run, _tool_call, metrics  # noqa: F401
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _aws_key(prefix: str) -> str:
    return prefix + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))


@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
@pytest.mark.parametrize("prefix", ["AKIA", "ASIA"])
def test_ids_holding_an_unregistered_aws_key_are_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                          metrics: InMemoryMetricReader,  # noqa: F811
                                                          capture: bool, prefix: str) -> None:
    key = _aws_key(prefix)
    calls = _tool_call(f"call_{key}")

    def payloads(n: int) -> dict:
        payload = calls(n)
        payload["id"] = f"chatcmpl-{key}x{n}"  # letters and digits: an ordinary id's form
        return payload

    _run(sink, metrics, f"QZ{secrets.token_hex(16)}ZQ", payloads, capture, tool=True)
    attributes = [key_ for _, key_, _ in _attributes(sink)]
    assert semconv.GEN_AI_TOOL_CALL_ID in attributes and semconv.GEN_AI_RESPONSE_ID in attributes
    assert_clean(sink, caplog, key)


def test_ids_merely_holding_akia_stay_ordinary() -> None:
    """Only the whole shape leaves the fast path: an id with ``AKIA`` in it and no key is kept."""
    for value in ("chatcmpl-AKIAshort", "call_xAKIAabcdefghijklmnop", "chatcmpl-ASIA0123456789ABCDE"):
        assert redaction.redact_id(value) == value
    key = _aws_key("AKIA")
    assert key not in redaction.redact_id(f"call_{key}") and key not in redaction.redact_id(key)
    assert key not in redaction.redact_id(f"resp_x{key}y")
