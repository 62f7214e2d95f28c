"""Credentials of other providers never reach telemetry, even when nobody registered them.

Keys from ``llm_config`` and secret-named environment variables are registered; a
credential that arrives any other way (read from a file, returned by a vault, quoted by a
provider's error or a tool's traceback) is caught only by its shape. The shapes were
OpenAI's/Anthropic's ``sk-``, Google's ``AIza``, GitHub's and Slack's; those of other
providers an AG2/cmbagent application talks to went through whole into exception events,
statuses, message content and DB rows: Hugging Face ``hf_``, Groq ``gsk_`` (its ``sk_``
part was caught, leaving ``g``), xAI ``xai-``, Perplexity ``pplx-``, AWS access key ids
(``AKIA``/``ASIA``), JWTs (``eyJ….eyJ….sig``, e.g. an Azure AD token), PEM private keys (also
when cut before their END line), and the value of Azure API Management's
``Ocp-Apim-Subscription-Key`` header (its name did not count as secret).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)


def _alnum(n: int) -> str:
    return secrets.token_hex(n)[:n]


def credentials() -> dict[str, str]:
    """A fresh credential of each shape (the part that must disappear)."""
    upper = "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiI" + _alnum(24) + "In0." + _alnum(40)
    pem_body = _alnum(60)
    return {
        "hugging face": "hf_" + _alnum(34), "groq": "gsk_" + _alnum(48), "xai": "xai-" + _alnum(60),
        "perplexity": "pplx-" + _alnum(48), "aws": "AKIA" + upper, "jwt": jwt,
        "pem": f"-----BEGIN RSA PRIVATE KEY-----\nMIIE{pem_body}\n-----END RSA PRIVATE KEY-----",
        "pem cut": f"-----BEGIN PRIVATE KEY-----\nMIIE{_alnum(60)}",
        "azure apim": _alnum(32),
    }


def markers(found: dict[str, str]) -> list[str]:
    """What may not appear anywhere: each credential's secret part (a PEM's body)."""
    out = []
    for name, value in found.items():
        out.append(value.splitlines()[1] if name.startswith("pem") else value)
        if name == "groq":
            out.append(value[1:])  # what the sk_ shape left behind
    return out


class ProviderRejected(Exception):
    pass


def test_the_shapes_are_redacted() -> None:
    found = credentials()
    for name, value in found.items():
        text = f"-H 'Ocp-Apim-Subscription-Key: {value}'" if name == "azure apim" else f"rejected: {value} (retry)"
        redacted = redaction.redact(text)
        assert redacted is not None
        assert not any(m in redacted for m in markers({name: value})), (name, redacted)
        assert redaction.REDACTED in redacted
    assert redaction.scrub({"Ocp-Apim-Subscription-Key": found["azure apim"]}) == {
        "Ocp-Apim-Subscription-Key": redaction.REDACTED}


@needs_custom_client
def test_unregistered_provider_credentials_never_reach_telemetry(sink: Sink,  # noqa: F811
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 tmp_path: Path) -> None:
    found = credentials()
    quoted = "; ".join(f"{name}={value}" if name != "azure apim" else f"Ocp-Apim-Subscription-Key: {value}"
                       for name, value in found.items())

    class Rejecting(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise ProviderRejected(f"upstream refused the request ({quoted})")

    instrument(sink)  # content capture on: the message carries them too
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Rejecting"}], "cache_seed": None}, human_input_mode="NEVER")
    assistant.register_model_client(Rejecting)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(ProviderRejected) as info:
        user.initiate_chat(assistant, message=f"use these: {quoted}", max_turns=1, silent=True)
    assert found["xai"] in str(info.value)  # the application's exception is its own
    assert_clean(sink, caplog, *markers(found))
