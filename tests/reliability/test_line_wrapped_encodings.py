"""A key cut by the line breaks of an encoding never reaches telemetry.

Found by the fifteenth campaign: quoted-printable (an e-mail body or MIME part a tool fetched or
code printed) ends each line at 76 characters with a soft break ``=`` + newline, and base64 is
wrapped at 76 (``base64``, MIME, Python's ``encodebytes``) or 64 characters a line (PEM,
``openssl base64``). A key, or the base64 form of a registered key, that a break fell inside was
in neither line: neither its shape nor its registered form matched, and both halves reached
exception events, statuses, message content and rows. A text holding such breaks (as written or
JSON-escaped) is now also searched with them removed, and shown so where that hides more.
"""

from __future__ import annotations

import base64
import json
import quopri

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import _b64, assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _wrapped_form(key: str, width: int, newline: str) -> tuple[str, list[str]]:
    """A config holding ``key`` in base64 wrapped at ``width`` characters a line (a line break inside
    the key's form), and the two pieces of the characters the key alone determines, on either side."""
    prefix = b"# pipeline config; key: ".ljust((width - 12) * 3 // 4, b"#")
    raw = prefix + key.encode() + b"\nendpoint: https://archive.example.org/v2\n"
    encoded = base64.b64encode(raw).decode()
    first, last = -(-len(prefix) // 3) * 4, (len(prefix) + len(key)) // 3 * 4
    cut = (first // width + 1) * width
    assert first + 8 <= cut <= last - 8, "the line break must fall inside the key's form"
    lines = [encoded[i:i + width] for i in range(0, len(encoded), width)]
    return newline.join(lines), [encoded[first:cut], encoded[cut:last]]


def forms(registered: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (text as a tool or code prints it, pieces that must not appear)."""
    shaped = "sk-proj-" + _b64(48)
    mail = quopri.encodestring(f"Hello team, for the nightly pipeline use the key {shaped} from now on.\n"
                               .encode()).decode()
    mail_registered = quopri.encodestring(f"Hello team, the archive's service password is now {registered} "
                                          "(rotated monthly).\n".encode()).decode()
    assert "=\n" in mail and "=\n" in mail_registered
    found = {
        "quoted-printable, shaped key": (mail, [shaped[-24:]]),
        "quoted-printable, registered key": (mail_registered, [registered[-16:]]),
        "base64 at 76 (MIME)": _wrapped_form(registered, 76, "\n"),
        "base64 at 64, CRLF (PEM, openssl)": _wrapped_form(registered, 64, "\r\n"),
    }
    return found


@pytest.mark.parametrize("as_json", [False, True], ids=["as-written", "json-escaped"])
def test_the_cut_keys_are_redacted(registered_key: str, as_json: bool) -> None:
    """As printed, and JSON-escaped ("=\\n", "\\r\\n": another instrumentation's attribute holding
    a JSON body, a request the ingest receives)."""
    for name, (text, pieces) in forms(registered_key).items():
        redacted = redaction.redact(json.dumps({"body": text}) if as_json else text) or ""
        assert redaction.REDACTED in redacted, (name, redacted)
        for piece in pieces:
            assert piece not in redacted.replace("\r", "").replace("\n", ""), (name, piece, redacted)


@pytest.mark.parametrize("text", [
    quopri.encodestring(b"Hello team, the nightly pipeline ran fine; peaks at 220, 540 and 800, as expected.\n")
    .decode(),
    base64.encodebytes(b"peaks at 220, 540 and 800; nothing else to report from the pipeline tonight\n" * 3)
    .decode(),
    "a=1\nb=2\n" + "=" * 70 + "\nheadline\n",
    json.dumps({"out": base64.encodebytes(b"peaks at 220, 540 and 800; nothing else to report tonight\n" * 3)
                .decode(), "note": "x=\n"}),
])
def test_wrapped_text_without_a_secret_stays(text: str) -> None:
    assert redaction.redact(text) == text


@needs_custom_client
def test_the_cut_keys_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                            registered_key: str) -> None:
    found = forms(registered_key)
    assert_refused_call_is_clean(sink, caplog, {f"{name} {i}": (text, piece) for name, (text, pieces)
                                                in found.items() for i, piece in enumerate(pieces)})
