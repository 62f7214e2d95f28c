"""Twenty-eighth fault campaign: credentials computed per request, in a process that runs for days.

A signing httpx ``auth=`` puts a new ``Authorization`` value on every request, and an
``azure_ad_token_provider`` a new token every hour or so. The instrumentor registers the value a
request carried, so that an answer or an error quoting it is redacted
(``redaction.register_sent_credentials`` for a successful call, ``register_request_credentials``
for a failed one). On f5cad67 a successful call's value was registered for the first 64 values
only and then not at all: from the 65th request on (the third day of hourly tokens), an answer
quoting the value went whole into the captured output. A failed call's value was registered
every time, for ever: a registry (and its compiled patterns, rebuilt with each) growing by one
secret per failed request. Now the first 64 such values are registered and the later ones are
learned (``redaction.learn_secret``: the most recent :data:`redaction.MAX_LEARNED` kept), so the
newest are always redacted and the registry stops growing.

Real parts: real AG2 agents, the real ``openai`` client and httpx, the loopback fake OpenAI server.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

import cmbagent_otel
from cmbagent_otel import redaction
from cmbagent_otel.testing import FakeOpenAIServer
from tests.reliability.conftest import _no_docker  # noqa: F401 (a fixture)
from tests.reliability.test_attack5_credential_sources import SharedClient, _secret
from tests.reliability.test_attack6_leftovers import SigningAuth, recording
from tests.reliability.test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")

CALLS = 90  # past the 64 values registered for good


def _registered() -> int:
    """How many secrets are registered (not counting their encoded forms)."""
    return len(redaction._known.keys() - redaction._forms)


def _agent(base_url: str, credential: str) -> Any:
    from autogen import ConversableAgent

    entry = {"model": "gpt-4o", "base_url": base_url, "api_key": "unused",  # a 401 is not retried
             "http_client": SharedClient(auth=SigningAuth(credential.encode()))}
    return ConversableAgent("assistant", llm_config={"config_list": [entry], "cache_seed": None},
                            human_input_mode="NEVER")


@pytest.mark.parametrize("fail", [False, True], ids=["answers", "errors"])
def test_per_request_credentials_of_many_calls_never_leak_and_the_registry_stops_growing(
        sink: Sink, caplog: pytest.LogCaptureFixture, fail: bool) -> None:  # noqa: F811
    sent: list[str] = []
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=True, instrument_cmbagent=False)
    with FakeOpenAIServer(raw_responder=recording(sent, fail)) as server:
        agent = _agent(server.base_url, _secret("Lb"))
        known = _registered()
        for _ in range(CALLS):
            if fail:
                with pytest.raises(openai.AuthenticationError):
                    agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
            else:
                reply = agent.generate_reply(messages=[{"role": "user", "content": "hi"}])
                assert sent[-1] in str(reply)  # the app gets the answer as the server wrote it
    assert len(sent) >= CALLS and len(set(sent)) == len(sent)  # a new value on every request
    assert_clean(sink, caplog, *sent)
    # bounded: at most 64 values registered for good, and the agent's api_key ("unused")
    assert _registered() - known <= redaction._SENT_MAX + 1
    assert len(redaction._sent_seen) <= redaction._SENT_MAX
