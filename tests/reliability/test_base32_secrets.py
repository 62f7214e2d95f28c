"""A registered key never reaches telemetry base32-encoded either.

The eighth campaign registered the hex and base64 forms of the keys from ``llm_config`` and
secret-named environment variables; base32 (RFC 4648: TOTP seeds, DNS-safe and
case-insensitive identifiers, ``base64.b32encode`` in a script) was left, and such a key,
alone or inside an encoded blob, was stored whole in exception events, statuses, content, code
output and rows. Its base32 forms are registered too: inside a blob the key's first byte may sit
at any of five offsets of a 5-byte group, and for each the characters its bytes alone determine
are redacted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
from pathlib import Path

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_encoded_secrets import _room_for_encoded_forms, run_with_encoded_keys  # noqa: F401 (autouse fixture)
from .test_secrets import Sink, assert_clean, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def encodings(key: str) -> dict[str, str]:
    """The ways an application writes a key out in base32: alone, and inside blobs at each offset."""
    raw = key.encode()
    found = {"alone": base64.b32encode(raw).decode(), "unpadded": base64.b32encode(raw).decode().rstrip("=")}
    for before in range(5):
        found[f"blob +{before}"] = base64.b32encode(json.dumps({"k" * (before + 1): key}).encode()).decode()
    return found


def leaked_bytes(text: str, key: str) -> bool:
    """Whether any part of ``text`` base32-decodes to 4 consecutive bytes of ``key``."""
    for piece in text.split(redaction.REDACTED):
        for start in range(8):
            chunk = piece[start:]
            chunk = chunk[:len(chunk) // 8 * 8]
            with contextlib.suppress(ValueError):
                decoded = base64.b32decode(chunk)
                if any(key.encode()[i:i + 4] in decoded for i in range(len(key) - 3)):
                    return True
    return False


def test_the_base32_forms_of_a_registered_key_are_redacted() -> None:
    key = f"MARKER{secrets.token_urlsafe(20)}"
    redaction.register_secret(key)
    for name, encoded in encodings(key).items():
        redacted = redaction.redact(f"seed {encoded} end")
        assert redacted is not None and redaction.REDACTED in redacted, (name, redacted)
        assert not leaked_bytes(redacted.removeprefix("seed ").removesuffix(" end"), key), (name, redacted)


def test_ordinary_base32_is_kept() -> None:
    redaction.register_secret(f"MARKER{secrets.token_urlsafe(20)}")
    for text in (base64.b32encode(b"a plot, not a key" * 4).decode(), "ABCDEFGHIJKLMNOP234567" * 2):
        assert redaction.redact(text) == text


@needs_custom_client
def test_base32_llm_config_and_environment_keys_never_reach_telemetry(
        sink: Sink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        tmp_path: Path) -> None:
    config_key, env_key = run_with_encoded_keys(
        sink, caplog, monkeypatch, tmp_path, encodings, "alone",
        lambda text: base64.b32encode(text.encode()).decode(), ("base64.b32encode({}.encode()).decode()",) * 2)
    markers = [base64.b32encode(key.encode()).decode()[:-8] for key in (config_key, env_key)]
    markers += [base64.b32encode(b"svc:" + env_key.encode()).decode()[8:-8]]
    assert_clean(sink, caplog, *markers)
