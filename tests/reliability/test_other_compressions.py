"""A secret inside base64 of bzip2, xz or zlib at a fast level never reaches telemetry.

Left by the eleventh campaign, which decoded base64 blobs of gzip and of zlib at its default and
best levels (``eJ…``, ``eN…``): ``base64(bz2.compress(config))`` (``QlpoO…``), ``lzma.compress``'s xz
(``/Td6WFo…``), and ``zlib.compress(data, 1)`` (``eAE…``) or levels 2-5 (``eF4…``) went whole into
exception events, statuses, content and rows. They are now decoded and decompressed like gzip
(at most 64 KiB out: a bomb stops there) and replaced whole when they hide a secret.
"""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import zlib

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import _b64, assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def forms(registered: str) -> dict[str, tuple[str, str]]:
    """name -> (text as a tool or code prints it, the start of the blob that must go)."""
    config = json.dumps({"model": "gpt-4o", "api_key": registered, "notes": "x" * 200}).encode()
    shaped = f"OPENAI_API_KEY: sk-proj-{_b64(40)}\n".encode()
    password = json.dumps({"user": "astro", "password": _b64(14)}).encode()
    found = {
        "bzip2 of a registered key": bz2.compress(config),
        "bzip2 level 1 of a shaped key": bz2.compress(shaped, 1),
        "xz of a registered key": lzma.compress(config),
        "xz of a password": lzma.compress(password),
        "zlib level 1": zlib.compress(shaped, 1),
        "zlib level 3": zlib.compress(password, 3),
        "zlib level 0 (stored)": zlib.compress(config, 0),
    }
    encoded = {name: base64.b64encode(blob).decode() for name, blob in found.items()}
    encoded["bzip2 wrapped at 76"] = base64.encodebytes(bz2.compress(config)).decode()
    return {name: (f"blob {blob} end", blob[:40]) for name, blob in encoded.items()}


def test_the_blobs_are_redacted(registered_key: str) -> None:
    for name, (text, blob) in forms(registered_key).items():
        redacted = redaction.redact(text) or ""
        assert blob not in redacted and redacted.startswith("blob [REDACTED]") and redacted.endswith(" end"), \
            (name, redacted)


@pytest.mark.parametrize("blob", [
    base64.b64encode(bz2.compress(b"peaks at 220, 540\n" * 20)).decode(),
    base64.b64encode(lzma.compress(b"{'l': [2, 220]}")).decode(),
    base64.b64encode(zlib.compress(json.dumps({"model": "gpt-4o", "max_tokens": 1024}).encode(), 1)).decode(),
    "QlpoOTFBWSZTWQ",  # a bzip2 header alone, cut
    "/Td6WFoAAATm1rRGAgAhARYAAAB0L+Wj" + "A" * 40,  # an xz header and no valid stream
])
def test_blobs_without_a_secret_stay(blob: str) -> None:
    text = f"out: {blob}\nthe key, they said, is fine"
    assert redaction.redact(text) == text


def test_a_bzip2_bomb_is_searched_only_to_its_bound() -> None:
    key = "sk-proj-" + _b64(40)
    late = base64.b64encode(bz2.compress(b"a" * 5_000_000 + f" {key}".encode())).decode()
    assert redaction.redact(f"x {late}") == f"x {late}"  # past 64 KiB out: not searched (documented)


@needs_custom_client
def test_the_blobs_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                         registered_key: str) -> None:
    assert_refused_call_is_clean(sink, caplog, forms(registered_key))
