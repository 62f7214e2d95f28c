"""Keys held by objects in ``llm_config`` are registered like keys in dicts.

Found by the eleventh campaign: ``register_secrets_in`` walked dicts, lists and pydantic models; a
custom model client's config entry holding a dataclass (``credentials=Creds(api_key=...)``), a plain
object with a ``token`` attribute, or a key holder whose ``str()`` is the key, under a secret-named
entry, registered nothing (AG2 keeps such extras as they are), so the key a model or a provider
echoed reached message content, exception events and rows. Dataclass fields and the secret-named
attributes of plain objects are walked now, and under a secret-named entry the object's own
``str()`` and every attribute count as secret (at most 64 attributes an object; other attributes
are not followed: an HTTP client's pool is no configuration).
"""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import (  # noqa: F401 (sink: fixture)
    Sink,
    _needs_config_fields,
    assert_clean,
    echo_agent,
    instrument,
    sink,
)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@dataclasses.dataclass
class Creds:
    user: str
    api_key: str


class KeyHolder:
    def __init__(self, key: str) -> None:
        self._key = key

    def __str__(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return "KeyHolder(***)"


class Session:
    def __init__(self, token: str) -> None:
        self.token = token
        self.region = "eu-west-1"


class Hostile:
    def __getattribute__(self, name: str) -> object:
        raise RuntimeError("no attributes here")


def _markers() -> tuple[str, str, str]:
    return tuple(f"MARK{tag}{secrets.token_hex(10)}" for tag in "ABC")  # type: ignore[return-value]


def test_keys_in_config_objects_are_registered() -> None:
    a, b, c = _markers()
    redaction.register_secrets_in({"config_list": [{"model": "x", "credentials": Creds("astro", a),
                                                    "client_secret": KeyHolder(b), "auth": Session(c),
                                                    "hostile": Hostile(), "proxy": Session("not-a-secret-x")}]})
    assert all(redaction.is_registered(key) for key in (a, b, c))
    assert not redaction.is_registered("not-a-secret-x")  # a Session under a name that is no secret


@needs_custom_client
@_needs_config_fields(credentials="probe", client_secret="probe", auth="probe")  # extra fields: not ag2 0.9.0
def test_keys_in_config_objects_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    a, b, c = _markers()
    config = {"model": "scripted", client_key(): "ScriptedModelClient", "credentials": Creds("astro", a),
              "client_secret": KeyHolder(b), "auth": Session(c)}
    instrument(sink)
    assistant = echo_agent("assistant", f"the keys are {a}, {b} and {c}", config)
    user = echo_agent("user", "thanks", {"model": "scripted", client_key(): "ScriptedModelClient"})
    user.initiate_chat(assistant, message=f"use {a} please", max_turns=1, silent=True)
    assert_clean(sink, caplog, a, b, c)
