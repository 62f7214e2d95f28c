"""Credentials a model call sends that no ``llm_config`` key names are secrets too.

Found by the twenty-sixth campaign (a hostile OpenAI-compatible server on loopback that echoes what
it was sent, real AG2 agents and the real ``openai`` client). Only an agent's ``llm_config`` was
walked for secrets, so these were registered nowhere: the token an ``azure_ad_token_provider``
returns, what an httpx ``auth=`` object of an ``http_client`` sends (BasicAuth's password, a custom
Auth's token), the key of an ``OpenAIWrapper`` used without an agent (AG2 strips ``api_key`` from
its ``_config_list``), and a key the ``openai`` client read from the environment when it was set
after ``instrument()`` (``OPENAI_API_KEY``, ``AZURE_OPENAI_API_KEY``). A server's 401 quoting the
credential put it whole into the exception events, the statuses and the DAG rows, content capture
off; an answer quoting it, into the captured output. Now the credentials of a failed request are
registered from the request the error keeps (``redaction.register_request_credentials``), and a
new config entry's clients are walked once (``_content.register_client_credentials``). The app
still gets the server's exception unchanged.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from autogen import ConversableAgent, OpenAIWrapper

import cmbagent_otel
from cmbagent_otel.testing import FakeOpenAIServer

from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"  # no key shape: only a registration makes it a secret


def _sent(headers: dict[str, str]) -> str:
    """What the request carried as its credential, decoded as a server that echoes it may show it."""
    auth = headers.get("Authorization") or headers.get("api-key") or ""
    scheme, _, token = auth.partition(" ")
    if scheme == "Basic":
        return base64.b64decode(token).decode().partition(":")[2]
    return token or auth


def _echoing(fail: bool) -> Callable[[dict[str, Any], dict[str, str]], tuple[int, dict[str, str], bytes]]:
    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        sent = _sent(headers)
        if fail:
            error = {"error": {"message": f"Incorrect credentials provided: {sent}", "type": "invalid_request_error"}}
            return 401, {"Content-Type": "application/json"}, json.dumps(error).encode()
        payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": f"you sent {sent}. TERMINATE"}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()
    return answer


class SharedClient(httpx.Client):
    """An httpx client in ``llm_config``, as AG2's documentation shows (AG2 deep-copies the config)."""

    def __deepcopy__(self, memo: Any) -> SharedClient:
        return self


class TokenAuth(httpx.Auth):
    """A custom httpx auth with its own scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Lab {self.token}"
        yield request


def _call(source: str, credential: str, base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    entry: dict[str, Any] = {"model": "gpt-4o", "base_url": base_url}
    if source == "azure_ad_token_provider":
        entry.update(api_type="azure", base_url=base_url.removesuffix("/v1"), api_version="2024-10-21",
                     azure_ad_token_provider=lambda: credential)
    elif source == "basic_auth":
        entry.update(api_key="unused", http_client=SharedClient(auth=httpx.BasicAuth("lab", credential)))
    elif source == "custom_auth":
        entry.update(api_key="unused", http_client=SharedClient(auth=TokenAuth(credential)))
    elif source == "wrapper":
        wrapper = OpenAIWrapper(config_list=[{**entry, "api_key": credential}], cache_seed=None)
        wrapper.create(messages=[{"role": "user", "content": "hi"}])
        return
    elif source == "OPENAI_API_KEY":
        monkeypatch.setenv("OPENAI_API_KEY", credential)  # set after instrument(): the client reads it
    elif source == "AZURE_OPENAI_API_KEY":
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", credential)
        entry.update(api_type="azure", base_url=base_url.removesuffix("/v1"), api_version="2024-10-21")
    agent = ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                             human_input_mode="NEVER")
    agent.generate_reply(messages=[{"role": "user", "content": "hi"}])


SOURCES = ["azure_ad_token_provider", "basic_auth", "custom_auth", "wrapper", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_rejected_credential_quoted_by_the_server_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    credential = _secret("Lb")
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echoing(fail=True)) as server, pytest.raises(Exception) as raised:
        _call(source, credential, server.base_url, monkeypatch)
    # the app gets the server's error as the openai client raised it, the credential in its text
    assert type(raised.value).__name__ == "AuthenticationError" and credential in str(raised.value)
    assert [span for span in sink.memory.get_finished_spans() if span.events], "no exception recorded"
    assert_clean(sink, caplog, credential)


@pytest.mark.parametrize("source", [s for s in SOURCES if s != "azure_ad_token_provider"])
def test_an_answer_quoting_the_credential_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    credential = _secret("Lb")
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echoing(fail=False)) as server:
        _call(source, credential, server.base_url, monkeypatch)
    outputs = [span for span in sink.memory.get_finished_spans() if "gen_ai.output.messages" in (span.attributes or {})]
    assert outputs, "no output captured"
    assert_clean(sink, caplog, credential)


def test_per_request_headers_are_not_registered(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A failed request's token-looking headers that are no credential (W3C trace context, a request
    id: new on every request) are not registered: each failure would add secrets without end."""
    from cmbagent_otel import redaction

    trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    request_id = f"req{secrets.token_hex(12)}"
    entry = {"model": "gpt-4o", "api_key": _secret("Lb"),
             "default_headers": {}, "http_client": SharedClient(event_hooks={"request": [
                 lambda request: request.headers.update({"traceparent": trace, "x-request-id": request_id})]})}
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=False, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echoing(fail=True)) as server, pytest.raises(openai.AuthenticationError):
        entry["base_url"] = server.base_url
        ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                         human_input_mode="NEVER").generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert [span for span in sink.memory.get_finished_spans() if span.events]
    assert not redaction.is_registered(trace) and not redaction.is_registered(request_id)
