"""A registered key never reaches telemetry hex- or base64-encoded either.

Keys from ``llm_config`` and secret-named environment variables were matched as written; an
application that hex-dumps a request, or base64-encodes a key alone, inside a ``user:key``
pair or inside an encoded JSON config (a Kubernetes secret, a data URL, a proxy header with a
custom scheme), had it stored whole in exception events, statuses, message content, code
output and DB rows. The encoded forms of the first registered secrets are registered with
them: inside a base64 blob the key's bytes may start at any of three offsets of a 3-byte
group, and the characters its bytes alone determine are redacted for each.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel import redaction
from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import group_chat, needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.fixture(autouse=True)
def _room_for_encoded_forms(isolated_secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first 32 registered secrets get encoded forms: earlier tests of the session used them up."""
    monkeypatch.setattr(redaction, "_encoded_count", 0)


def encodings(key: str) -> dict[str, str]:
    """The ways an application writes a key out encoded."""
    raw = key.encode()
    return {
        "hex": raw.hex(), "HEX": raw.hex().upper(), "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode(),
        "user:key": base64.b64encode(b"svc:" + raw).decode(),
        "json blob": base64.b64encode(json.dumps({"endpoint": "https://x", "credential": key}).encode()).decode(),
        "json blob +1": base64.b64encode(json.dumps({"k": key}).encode()).decode(),
        "json blob +2": base64.b64encode(json.dumps({"kk": key}).encode()).decode(),
    }


def markers(key: str) -> list[str]:
    """What may not appear anywhere: the encodings' parts made of the key's bytes alone (the
    characters at a blob's edges mix 2-4 bits of the key with the bytes around it)."""
    raw = key.encode()
    out = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()[:-4]]
    out.append(base64.urlsafe_b64encode(raw).decode()[:-4])
    return out


def test_the_encodings_of_a_registered_key_are_redacted() -> None:
    key = f"MARKER{secrets.token_hex(16).upper()}"  # no byte of it in the blob's JSON around it
    redaction.register_secret(key)
    for name, encoded in encodings(key).items():
        redacted = redaction.redact(f"data: {encoded} end")
        assert redacted is not None
        assert redaction.REDACTED in redacted, (name, redacted)
        # what is left of the blob decodes to no 4 consecutive bytes of the key (its edges: 2 at most)
        for piece in redacted.removeprefix("data: ").removesuffix(" end").split(redaction.REDACTED):
            assert not any(key.encode()[i:i + 4] in decoded
                           for decoded in decodings(piece) for i in range(len(key) - 3)), (name, redacted)


def decodings(piece: str) -> list[bytes]:
    """``piece`` decoded as hex and as base64 from each of its first four characters."""
    out = []
    with contextlib.suppress(ValueError):
        out.append(bytes.fromhex(piece[:len(piece) // 2 * 2]))
    for start in range(4):
        chunk = piece[start:]
        chunk = chunk[:len(chunk) // 4 * 4]
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            with contextlib.suppress(ValueError):
                out.append(decode(chunk))
    return out


def test_ordinary_text_and_other_blobs_are_kept() -> None:
    redaction.register_secret(f"MARKER{secrets.token_urlsafe(24)}")
    for text in ("the spectrum peaks at l=220", base64.b64encode(b"an image, not a key" * 20).decode(),
                 secrets.token_hex(32), "0123456789abcdef" * 4):
        assert redaction.redact(text) == text


class KeyEchoed(Exception):
    pass


def run_with_encoded_keys(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                          encodings: Callable[[str], dict[str, str]], echoed: str,
                          encode: Callable[[str], str], encoders: tuple[str, str]) -> tuple[str, str]:
    """A run whose llm_config key and secret-named environment key appear ``encodings``-encoded
    in the model client's exception, the user's message, code output (``encoders``: Python
    expressions of the config key and the environment key, ``{}`` standing for each) and a
    tool's result (``encode``). Returns the two keys for the caller's ``assert_clean``.
    ``echoed``: the encoding checked to reach the application unchanged."""
    config_key = f"MARKER{secrets.token_hex(16)}"  # an Azure-like key: no shape, only registration
    env_key = f"TOKEN{secrets.token_urlsafe(24)}"
    monkeypatch.setenv("MY_SERVICE_TOKEN", env_key)
    found = {f"{which} {name}": value for which, key in (("config", config_key), ("env", env_key))
             for name, value in encodings(key).items()}
    quoted = "; ".join(f"{name}={value}" for name, value in found.items())

    class Echoing(ScriptedModelClient):
        def create(self, params: dict[str, Any]) -> Any:
            raise KeyEchoed(f"upstream could not read the request ({quoted})")

    instrument(sink)  # content capture on
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "Echoing", "api_key": config_key}], "cache_seed": None},
        human_input_mode="NEVER")
    assistant.register_model_client(Echoing)
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    with pytest.raises(KeyEchoed) as info:
        user.initiate_chat(assistant, message=f"encoded: {quoted}", max_turns=1, silent=True)
    assert found[f"config {echoed}"] in str(info.value)  # the application's exception is its own

    # code that prints the keys encoded, and a tool returning one
    script = [
        {"tool_calls": [{"id": "call_enc_1", "name": "peak_position", "arguments": {"multipole": 2}}]},
        f"```python\nimport base64\nprint({encoders[0].format(repr(config_key))}, "
        f"{encoders[1].format(repr(env_key))})\n```",
    ]

    def tool(multipole: int) -> str:
        return f"peak {multipole} " + encode(f"svc:{env_key}")

    group_chat(tmp_path / "chat", message="go", engineer_script=script, tool=tool)
    return config_key, env_key


@needs_custom_client
def test_encoded_llm_config_and_environment_keys_never_reach_telemetry(
        sink: Sink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        tmp_path: Path) -> None:
    config_key, env_key = run_with_encoded_keys(
        sink, caplog, monkeypatch, tmp_path, encodings, "hex",
        lambda text: base64.b64encode(text.encode()).decode(),
        ("base64.b64encode({}.encode()).decode()", "{}.encode().hex()"))
    assert_clean(sink, caplog, *markers(config_key), *markers(env_key))
