"""Leftovers of the twenty-sixth campaign: an ordinary-looking id holding an unregistered key of a
known shape, and credentials computed per request that a successful call sends.

Found by the twenty-seventh campaign (a hostile OpenAI-compatible server on loopback, real AG2
agents and the real ``openai`` client). A response or tool call id of letters and digits holding an
AWS access key id (``AKIA``/``ASIA`` + 16 upper-case letters and digits, a shape the redaction knows)
took ``redact_id``'s fast path and was recorded whole: ``_ORDINARY_ID`` only ruled out Google's
``AIza`` keys. The token an ``azure_ad_token_provider`` returns and the header a signing httpx
``auth=`` computes per request are kept by neither the ``openai`` client nor httpx: they were
registered only from a failed request's error, so an answer quoting them on a successful call went
whole into the captured output. Now the request as sent is read from the response ``openai`` is
about to parse (``redaction.register_sent_credentials``), once per value; the provider is never
called by us and the app gets the same answer.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import string
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import cmbagent_otel
from cmbagent_otel import redaction, semconv
from cmbagent_otel.testing import FakeOpenAIServer

from .test_attack5_credential_sources import SharedClient, _call, _echoing, _secret, _sent
from .test_attack5_server_response_fields import _attributes, _run, _tool_call, metrics  # noqa: F401
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


class SigningAuth(httpx.Auth):
    """A signing auth: the header is computed for each request from a key, and kept nowhere."""

    def __init__(self, key: bytes) -> None:
        self._signer = hmac.new(key, digestmod=hashlib.sha256).copy  # no secret-named attribute holds the key
        self._nonce = itertools.count()

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        signer = self._signer()
        signer.update(f"{request.method} {request.url} {next(self._nonce)}".encode())
        request.headers["Authorization"] = f"Lab-Sig {signer.hexdigest()}"
        yield request


def recording(sent: list[str], fail: bool = False) -> Any:
    """The server's answers (or 401s when ``fail``), each request's credential appended to ``sent``."""
    echo = _echoing(fail=fail)

    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        sent.append(_sent(headers))
        return echo(body, headers)
    return answer


@pytest.mark.parametrize("capture", [False, True], ids=["capture-off", "capture-on"])
@pytest.mark.parametrize("source", ["azure_ad_token_provider", "signing_auth"])
def test_an_answer_quoting_a_per_request_credential_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch, source: str,
                                                                capture: bool) -> None:
    sent: list[str] = []
    credential = _secret("Lb")
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=recording(sent)) as server:
        if source == "azure_ad_token_provider":
            _call(source, credential, server.base_url, monkeypatch)
        else:
            from autogen import ConversableAgent

            entry = {"model": "gpt-4o", "base_url": server.base_url, "api_key": "unused",
                     "http_client": SharedClient(auth=SigningAuth(credential.encode()))}
            agent = ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                                     human_input_mode="NEVER")
            reply = agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
            assert reply is not None and sent[-1] in str(reply)  # the app gets the answer as the server wrote it
    assert sent and all(value for value in sent)
    if capture:
        outputs = [span for span in sink.memory.get_finished_spans()
                   if "gen_ai.output.messages" in (span.attributes or {})]
        assert outputs, "no output captured"
    assert_clean(sink, caplog, *sent)


def test_a_provider_token_is_registered_once(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The provider is called by the openai client alone (once per request); each value read once."""
    calls: list[str] = []
    token = _secret("Lb")

    def provider() -> str:
        calls.append(token)
        return token

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echoing(fail=False)) as server:
        from autogen import ConversableAgent

        entry = {"model": "gpt-4o", "api_type": "azure", "base_url": server.base_url.removesuffix("/v1"),
                 "api_version": "2024-10-21", "azure_ad_token_provider": provider}
        agent = ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                                 human_input_mode="NEVER")
        for _ in range(3):
            agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
    assert len(calls) == 3  # one per request, as without instrumentation
    assert redaction.is_registered(token)
    assert list(redaction._sent_seen) == [f"Bearer {token}".encode()]


def test_an_async_client_registers_the_provider_token(sink: Sink) -> None:  # noqa: F811
    """The async ``openai`` client's path: its ``_process_response`` coroutine is returned as it is."""
    import asyncio

    import openai

    token = _secret("Lb")

    async def provider() -> str:
        return token

    async def call(base_url: str) -> str:
        client = openai.AsyncAzureOpenAI(azure_endpoint=base_url.removesuffix("/v1"), api_version="2024-10-21",
                                         azure_ad_token_provider=provider)
        answer = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        return answer.choices[0].message.content or ""

    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=_echoing(fail=False)) as server:
        content = asyncio.run(call(server.base_url))
    assert token in content  # the app's answer unchanged
    assert redaction.is_registered(token)
