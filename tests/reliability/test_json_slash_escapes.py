"""A key whose "/" is written "\\/" (JSON's optional escape) never reaches telemetry.

The seventh campaign decoded ``\\u00XX`` and ``%XX`` escapes for the search, not JSON's
``\\/``: PHP's ``json_encode`` and other encoders escape every "/", so a registered base64
key holding "/" (an Azure storage account key, a service's key echoed by a PHP backend) went
whole into exception events, statuses, content and rows. ``\\/`` is decoded for the search
too; a text whose escapes hide no secret is kept as written.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _key() -> str:
    return f"QZXW{secrets.token_hex(8)}/{secrets.token_hex(6)}+{secrets.token_hex(6)}/k=="


def test_a_slash_escaped_registered_key_is_redacted() -> None:
    key = _key()
    redaction.register_secret(key)
    escaped = key.replace("/", "\\/")
    for text in (f'{{"account_info": "{escaped}"}}', f"echo: {escaped} done", escaped):
        redacted = redaction.redact(text)
        assert redacted is not None and redaction.REDACTED in redacted
        assert not any(part in redacted for part in escaped.split("\\/") if len(part) >= 6), redacted


@pytest.mark.parametrize("text", ['{"url": "https:\\/\\/example.org\\/a"}', "C:\\Users\\me\\plot.png",
                                  'line one\\nline two \\"quoted\\"'])
def test_escapes_hiding_no_secret_are_kept(text: str) -> None:
    assert redaction.redact(text) == text


class Echoed(Exception):
    pass


@needs_custom_client
def test_a_slash_escaped_llm_config_key_never_reaches_telemetry(sink: Sink,  # noqa: F811
                                                                caplog: pytest.LogCaptureFixture) -> None:
    key = _key()
    escaped = key.replace("/", "\\/")

    class Echoing(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise Echoed(f'backend said {{"error": "bad key", "key": "{escaped}"}}'.replace('"key"', '"k"'))

    instrument(sink)
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Echoing", "api_key": key}], "cache_seed": None},
        human_input_mode="NEVER")
    assistant.register_model_client(Echoing)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(Echoed):
        user.initiate_chat(assistant, message=f"the backend returned {escaped}", max_turns=1, silent=True)
    assert_clean(sink, caplog, *(part for part in escaped.split("\\/") if len(part) >= 6))
