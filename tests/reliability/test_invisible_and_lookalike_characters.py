"""A key broken up by invisible or look-alike characters, or HTML-escaped, never reaches telemetry.

Found by the eleventh campaign: what a prompt-injected model or echoing code can slip into a key so
that no pattern matches it while a reader still recovers it: a zero-width space (U+200B) or soft
hyphen inside it, fullwidth letters (U+FF53 U+FF4B U+FF0D... for ``sk-``), Unicode tag characters (U+E0020-E007E spell
ASCII invisibly: "ASCII smuggling"), Cyrillic look-alikes (``sk-pr?j-...`` with U+043E for the ``o``), and HTML
numeric character references (``sk&#45;proj&#45;…``, ``&#x2d;``). Each left the key, or all of it
but a few characters, in exception events, statuses, message content and rows. A non-ASCII text
holding such characters is now searched folded too (invisible characters removed, the others
mapped to ASCII), ``&#NN;`` references are decoded like ``%XX``, and the folded or decoded form is
recorded only where it hides more.
"""

from __future__ import annotations

import re

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import _b64, assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def forms(registered: str) -> dict[str, tuple[str, str]]:
    """name -> (text as written, a part a reader would put back together: it must go)."""
    shaped = "sk-proj-" + _b64(40)
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in registered)
    tags = "".join(chr(0xE0000 + ord(c)) for c in shaped)
    lookalike = shaped.replace("o", "\u043e").replace("a", "\u0430")
    return {
        "zero-width in a registered key": (registered[:6] + "\u200b" + registered[6:], registered[6:]),
        "soft hyphens in a shaped key": ("\u00ad".join((shaped[:12], shaped[12:30], shaped[30:])), shaped[12:30]),
        "word joiner and BOM": (registered[:9] + "\u2060" + registered[9:20] + "\ufeff" + registered[20:],
                                registered[9:20]),
        "fullwidth registered key": (fullwidth, fullwidth[4:]),
        "tag characters": (f"see{tags}", tags[8:]),
        "cyrillic look-alikes": (lookalike, max(re.split("[\u043e\u0430]", lookalike), key=len)),
        "html decimal references": (shaped.replace("-", "&#45;"), shaped[8:]),
        "html hex references": (registered[:5] + "".join(f"&#x{ord(c):x};" for c in registered[5:9]) + registered[9:],
                                registered[9:]),
    }


def test_the_forms_are_redacted(registered_key: str) -> None:
    for name, (text, part) in forms(registered_key).items():
        redacted = redaction.redact(f"failed with {text} (retry)") or ""
        assert part not in redacted and redaction.REDACTED in redacted, (name, redacted)


@pytest.mark.parametrize("text", [
    "Привет, мир! Ключ не нужен: спектр мощности C_l в норме.",  # Cyrillic prose
    "\u03a1 = 0.3 and \u03bd = 2 in the fit; \u03a9m \u2248 0.31",  # Greek letters next to ASCII
    "family 👨\u200d👩\u200d👧 emoji, \uff46\uff55\uff4c\uff4c \uff54\uff45\uff58\uff54, and a soft\u00adhyphen",
    "AT&#38;T and &#169; 2026, &#x41;BC",
])
def test_text_hiding_no_key_stays_as_written(text: str) -> None:
    assert redaction.redact(text) == text


@needs_custom_client
def test_the_forms_never_reach_telemetry(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                         registered_key: str) -> None:
    assert_refused_call_is_clean(sink, caplog, forms(registered_key))
