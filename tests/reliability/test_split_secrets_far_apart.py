"""A key split across messages far apart, or continued by letters alone, never reaches telemetry.

The ninth campaign left two ways open. A key whose start ends one message is continued by a later
text of the same call only when the continuation holds a digit (a word completing the shape must
not count): a key's body of letters alone (about 3 % of 20-character base62 bodies) was left whole
in the recorded messages and rows. And an open start was forgotten after 8 texts: a key continued
by the 9th text or later went through. A continuation now counts when it holds a digit or a
lower-case letter followed by an upper-case one (a capitalised word still does not), and an open
start is kept for 256 texts (at most 16 open starts, the oldest forgotten first).
"""

from __future__ import annotations

import random
import string

import pytest

from cmbagent_otel import redaction

from .test_secrets import Sink, assert_clean, sink  # noqa: F401  (fixture)
from .test_split_secrets import _recorded_content, _secret_and_assistant

pytestmark = pytest.mark.usefixtures("isolated_secrets")


def _letters_key() -> str:
    body = "".join(random.choice(string.ascii_letters) for _ in range(38))
    return "sk-proj-" + body[:3].lower() + "Qz" + body  # no digit; "Qz" only so the case mixes for sure


@pytest.mark.parametrize(("key", "between"), [
    pytest.param("letters", 3, id="letters-only-continuation"),
    pytest.param("digits", 12, id="twelve-texts-later"),
])
def test_a_key_continued_far_apart_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture,  # noqa: F811
                                               key: str, between: int) -> None:
    secret, assistant = _secret_and_assistant(sink, "shaped")
    if key == "letters":
        secret = _letters_key()
    first, second = secret[:11], secret[11:]
    messages = [{"role": "user", "content": f"my key: {first}"}]
    messages += [{"role": "assistant" if i % 2 else "user", "content": f"(filler {i}) let me look"}
                 for i in range(between)]
    messages.append({"role": "user", "content": f"{second} is the rest"})
    assistant.generate_reply(messages=messages)
    assert_clean(sink, caplog, first, second)
    content = _recorded_content(sink)
    assert "(filler 1)" in content and "is the rest" in content


def test_a_capitalised_word_still_does_not_continue_a_key() -> None:
    redaction.learn_split_secrets(["try sk-abcdefghi", "ok then", "Thanksgiving plots", "Wonderful"])
    assert redaction.redact("Thanksgiving plots") == "Thanksgiving plots"
