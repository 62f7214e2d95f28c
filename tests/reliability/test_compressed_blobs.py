"""A secret inside a base64 blob with no fixed form never reaches telemetry.

Found by the eleventh campaign (the ninth left gzip+base64 open): a tool or code printing
``base64(gzip(config))`` (a Helm value, a Kubernetes annotation, a compressed session), a zlib
stream in base64 (``base64.b64encode(zlib.compress(...))``), a PEM private key in base64 (a
Kubernetes ``tls.key`` from ``kubectl get secret -o yaml``) or a JSON object in base64 holding a
secret-named value went whole into exception events, statuses, message content and rows: the
compressed bytes of a key depend on the whole stream, and the base64 of a PEM block or of a
shapeless value under ``password`` matched no registered form and no shape. Blobs that start as
gzip (``H4sI``), zlib (``eJ…``, ``eN…``), ``-----`` (``LS0tLS1``) or a JSON object (``eyJ``,
``eyAi``, ``ewo``) are now decoded (and decompressed, at most 64 KiB out) and searched; a blob
whose text holds a secret is replaced whole.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import _b64, assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def forms(registered: str) -> dict[str, tuple[str, str]]:
    """name -> (text as a tool or code prints it, the blob that must go)."""
    shaped = "sk-proj-" + _b64(40)
    config = json.dumps({"model": "gpt-4o", "api_key": registered, "notes": "x" * 200}).encode()
    pem = (b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI" + _b64(40).encode() + b"\n-----END EC PRIVATE KEY-----\n")
    found = {
        "gzip of a registered key": base64.b64encode(gzip.compress(config)).decode(),
        "gzip, wrapped at 76": base64.encodebytes(gzip.compress(f"key={shaped}\n".encode() * 3)).decode(),
        "zlib of a shaped key": base64.b64encode(zlib.compress(f"OPENAI_API_KEY: {shaped}".encode())).decode(),
        "pem in base64": base64.b64encode(pem).decode(),
        "json with a password": base64.b64encode(json.dumps({"user": "astro", "password": _b64(14)}).encode())
        .decode(),
        "url-safe json": base64.urlsafe_b64encode(json.dumps({"token": _b64(30) + "~?>"}).encode()).decode(),
    }
    return {name: (f"blob {blob} end", blob.split("\n")[0][:40]) for name, blob in found.items()}


def test_the_blobs_are_redacted(registered_key: str) -> None:
    for name, (text, blob) in forms(registered_key).items():
        redacted = redaction.redact(text) or ""
        assert blob not in redacted and redacted.startswith("blob [REDACTED]") and redacted.endswith(" end"), \
            (name, redacted)
    # inside JSON (a message's content), the line breaks escaped
    wrapped = forms(registered_key)["gzip, wrapped at 76"][0]
    redacted = redaction.redact(json.dumps({"content": wrapped})) or ""
    assert wrapped.split("\n")[1][:30] not in redacted and redacted.endswith('end"}'), redacted


@pytest.mark.parametrize("blob", [
    base64.b64encode(gzip.compress(b"peaks at 220, 540\n" * 20)).decode(),
    base64.b64encode(zlib.compress(b"{'l': [2, 220]}")).decode(),
    base64.b64encode(json.dumps({"model": "gpt-4o", "max_tokens": 1024}).encode()).decode(),
    base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode(),
    "eyJhbGciOiJub25lIn0",  # a JWT header alone
])
def test_blobs_without_a_secret_stay(blob: str) -> None:
    text = f"out: {blob}\nthe key, they said, is fine"
    assert redaction.redact(text) == text


def test_a_decompression_bomb_is_searched_only_to_its_bound() -> None:
    """64 KiB of decompressed text are searched: a key past them is not found (documented)."""
    key = "sk-proj-" + _b64(40)
    early = base64.b64encode(gzip.compress(f"{key} ".encode() + b"a" * 5_000_000)).decode()
    late = base64.b64encode(gzip.compress(b"a" * 5_000_000 + f" {key}".encode())).decode()
    assert redaction.redact(f"x {early}") == f"x {redaction.REDACTED}"
    assert redaction.redact(f"x {late}") == f"x {late}"


@needs_custom_client
def test_the_blobs_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                         registered_key: str) -> None:
    assert_refused_call_is_clean(sink, caplog, forms(registered_key))
