"""Credentials written in the forms connection strings and signed URLs take never reach telemetry.

Found by the sixth campaign: a URL whose user name is empty (``redis://:password@host``, Redis'
own form), an Azure SAS URL's signature (``…?sv=…&sig=…``), the ``AccountKey=`` of an Azure
Storage connection string and GitHub's fine-grained tokens (``github_pat_…``) went whole into
exception events, statuses, message content and DB rows (the URL pattern wanted a user name;
``sig`` and ``AccountKey`` were not secret names; the ``ghp_`` shape is the classic token's only).
A Service Bus connection string's ``SharedAccessKey=`` was already caught (``access key``).
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


def _b64(n: int) -> str:
    return secrets.token_urlsafe(n)[:n].replace("-", "A").replace("_", "B")


def forms() -> dict[str, tuple[str, str]]:
    """name -> (text as an application or a provider writes it, the part that must disappear)."""
    redis_pw, sig, account_key, bus_key = (f"PW{_b64(18)}", f"{_b64(30)}%2B{_b64(10)}%3D", _b64(86) + "==",
                                           _b64(43) + "=")
    pat = "github_pat_11" + _b64(20) + "_" + _b64(59)
    return {
        "redis url": (f"redis://:{redis_pw}@cache.internal:6379/0", redis_pw),
        "azure sas": (f"https://acct.blob.core.windows.net/maps/planck.fits?sv=2022-11-02&sp=r&sig={sig}&se=2027",
                      sig),
        "azure storage": (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};"
                          "EndpointSuffix=core.windows.net", account_key[:-2]),
        "service bus": (f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={bus_key}",
                        bus_key[:-1]),
        "github fine-grained": (pat, pat[11:]),
    }


def test_the_forms_are_redacted() -> None:
    for name, (text, secret) in forms().items():
        redacted = redaction.redact(f"failed with {text} (retry)") or ""
        assert secret not in redacted and redaction.REDACTED in redacted, (name, redacted)
    assert redaction.redact("sigma=0.5, signal: 3, design=x") == "sigma=0.5, signal: 3, design=x"


class Refused(Exception):
    pass


def assert_refused_call_is_clean(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                 found: dict[str, tuple[str, str]]) -> None:
    """A model call refused with an error quoting every form, with content capture on (the user's
    message quotes them too): the application gets its own exception, telemetry none of the secrets."""
    quoted = " ; ".join(text for text, _ in found.values())

    class Refusing(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise Refused(f"could not fetch the inputs ({quoted})")

    instrument(sink)  # content capture on: the message carries them too
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Refusing"}], "cache_seed": None}, human_input_mode="NEVER")
    assistant.register_model_client(Refusing)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(Refused) as info:
        user.initiate_chat(assistant, message=f"read from: {quoted}", max_turns=1, silent=True)
    assert quoted in str(info.value)  # the application's exception is its own
    assert_clean(sink, caplog, *(secret for _, secret in found.values()))


@needs_custom_client
def test_credential_forms_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                tmp_path: Path) -> None:
    assert_refused_call_is_clean(sink, caplog, forms())
