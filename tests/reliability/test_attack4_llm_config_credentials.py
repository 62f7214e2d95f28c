"""Credentials an ``llm_config`` holds under names that do not say so are secrets everywhere.

Found by the twenty-fifth campaign. The secrets of an agent's ``llm_config`` (a dict or AG2's
``LLMConfig``) are registered with redaction before its first span, but only values under
secret-named keys (``api_key``, ``Authorization``, ``X-Api-Key``...): a proxy or gateway's
credential under another header name (``default_headers={"X-Proxy-Team": <token>}``, or
``extra_headers``), the token after ``Bearer`` under such a header, the password or token in
``base_url``'s user info, ``?code=``/``?key=``/``?sig=`` in ``base_url`` or ``default_query``, and
the same in an ``http_client``'s own headers and query were not. A model client's error that
quoted its request or the gateway's answer (``team <token> is not allowed``) put them whole into
the exception event, the status, the ``chat``/``invoke_agent``/``conversation`` spans and the DAG
rows, content capture on or off (their ``key=value`` and URL text forms were caught by shape; a
bare value was not). They are now registered by the rule the exporters' own configuration
follows (``environment_variables.configured_credentials``).
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
from autogen import ConversableAgent

import cmbagent_otel
from cmbagent_otel import redaction
from tests.conftest import client_key

from .conftest import ON_CMBAGENT_AUTOGEN, needs_custom_client
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = [pytest.mark.usefixtures("isolated_secrets"), needs_custom_client,
              pytest.mark.skipif(ON_CMBAGENT_AUTOGEN, reason="cmbagent_autogen's config schema rejects extra_headers "
                                 "in a config entry: no application on it holds a credential there")]


def _token(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(14)}"


class GatewayRejects:
    """A model client whose gateway refuses the call, quoting what it was sent (bare values)."""

    def __init__(self, config: dict[str, Any], **_: Any) -> None:
        self.config = config

    def create(self, params: dict[str, Any]) -> Any:
        client = self.config.get("http_client")
        headers = {**(self.config.get("default_headers") or {}), **(self.config.get("extra_headers") or {}),
                   **{k: v for k, v in client.headers.items() if k.startswith("x-")}}
        quoted = " ".join(str(v).split(" ")[-1] for v in headers.values())
        query = " ".join(str(v) for v in [*(self.config.get("default_query") or {}).values(), *client.params.values()])
        url = str(self.config.get("base_url"))
        user, _, password = url.partition("://")[2].partition("@")[0].partition(":")
        userinfo = password or user
        code = url.partition("code=")[2]
        raise PermissionError(f"gateway refused credentials {quoted} {query} {userinfo} {code}")

    def message_retrieval(self, response: Any) -> list[str]:
        return []

    def cost(self, response: Any) -> float:
        return 0.0

    @staticmethod
    def get_usage(response: Any) -> dict[str, Any]:
        return {}


class ProxyClient(httpx.Client):
    """An httpx client in ``llm_config``, as AG2's documentation shows (it must survive deepcopy)."""

    def __deepcopy__(self, memo: Any) -> ProxyClient:
        return self


def _credentials() -> dict[str, str]:
    names = ("team", "bearer", "extra", "password", "dsn", "code", "query", "workspace", "client-key")
    return {name: _token(name[:2].upper()) for name in names}


def _entry(k: dict[str, str], dsn: bool) -> dict[str, Any]:
    userinfo = k["dsn"] if dsn else f"svc:{k['password']}"
    return {"model": "gw-model", client_key(): "GatewayRejects",
            "default_headers": {"X-Proxy-Team": k["team"], "X-Forward": f"Bearer {k['bearer']}",
                                "X-Title": "cmb lab"},
            "extra_headers": {"X-Gateway-Tenant": k["extra"]},
            "base_url": f"https://{userinfo}@gateway.example/v1?code={k['code']}",
            "default_query": {"sig": k["query"], "api-version": "2024-10-21"},
            "http_client": ProxyClient(headers={"X-Workspace": k["workspace"]}, params={"key": k["client-key"]})}


@pytest.mark.parametrize("capture", [False, True], ids=["content-off", "content-on"])
@pytest.mark.parametrize("form", ["dict", "LLMConfig", "LLMConfig-dsn"])
def test_attack4_llm_config_credentials_are_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                                     form: str, capture: bool) -> None:
    from autogen import LLMConfig

    k = _credentials()
    entry = _entry(k, dsn=form.endswith("dsn"))
    llm_config: Any = LLMConfig(entry, cache_seed=None) if form != "dict" else {"config_list": [entry],
                                                                                "cache_seed": None}
    cmbagent_otel.instrument(tracer_provider=sink.provider, capture_content=capture, instrument_cmbagent=False)
    assistant = ConversableAgent("assistant", llm_config=llm_config, human_input_mode="NEVER")
    assistant.register_model_client(GatewayRejects)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(PermissionError):
        user.initiate_chat(assistant, message="fit the spectrum", max_turns=1, silent=True)
    events = [e for s in sink.memory.get_finished_spans() for e in s.events if e.name == "exception"]
    assert events and all("gateway refused credentials" in str(e.attributes.get("exception.message")) for e in events)
    unused = "password" if form.endswith("dsn") else "dsn"
    markers = [v for n, v in k.items() if n != unused]
    assert_clean(sink, caplog, *markers)


def test_attack4_plain_header_and_query_values_stay_visible(isolated_secrets: None) -> None:
    from cmbagent_otel.instrumentation._content import register_agent_secrets

    k = _credentials()
    agent = ConversableAgent("assistant", llm_config={"config_list": [_entry(k, dsn=False)], "cache_seed": None},
                             human_input_mode="NEVER")
    register_agent_secrets(agent)
    assert all(redaction.is_registered(v) for n, v in k.items() if n != "dsn")
    for text in ("cmb lab", "2024-10-21", "svc", "gw-model", f"python-httpx/{httpx.__version__}", "keep-alive"):
        assert redaction.redact(f"sent {text} upstream") == f"sent {text} upstream"
