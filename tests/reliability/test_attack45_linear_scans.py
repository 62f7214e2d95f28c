"""Session 45 (45th attack campaign): two scans whose cost grew with the square of a run's length.

* A dict key or attribute name of ``"Secret" * n + "!"`` (a tool's arguments, an ingest client's attributes): the
  secret-name pattern, ``.*(?:words)[\\w.\\-]*$``, scanned the rest of the name again from every word's occurrence:
  96,000 characters took 12 s of CPU per match, and a name is matched twice. The words are looked for in the name's
  last run of name characters only, once (the same names are secret: 300,000 random names compared).
* A text of ``"eyJ" * n`` (a JSON Web Token's first characters): the token's shape scanned its first part to the run's
  end from every ``eyJ`` (100,000 characters: 1.8 s). It is looked for at a run's start now, or after a space escaped
  as ``%20`` or ``\\u0020``.

The tests run under a CPU-time alarm (``ITIMER_VIRTUAL``) of 20 s: a liveness bound, not a speed target (linear
needs about 0.02 s here; main needed minutes).
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

from .test_adversarial_text import cpu_alarm

pytestmark = pytest.mark.usefixtures("isolated_secrets")

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


@pytest.mark.parametrize("name", ["Secret" * 32_000 + "!", "apikey" * 32_000 + "!", "Secret" * 32_000 + "\nx"],
                         ids=["secret", "apikey", "newline"])
def test_a_long_key_name_is_judged_in_linear_time(name: str) -> None:
    """Fails on main (3 of 3: the alarm)."""
    value = "MARKER" + secrets.token_hex(12)
    with cpu_alarm(20):
        assert redaction.is_secret_key(name) is False
        assert value in str(redaction.scrub({name: value}))


@pytest.mark.parametrize("name", ["x" * 100_000 + "_api_key", "note: " * 20_000 + "password", "a!" * 50_000 + "token"])
def test_a_long_secret_name_is_still_one(name: str) -> None:
    """Both directions (held up on main, within the bound): the words at the end of a long name still tell it."""
    with cpu_alarm(20):
        assert redaction.is_secret_key(name) is True


def test_a_run_of_token_starts_is_scanned_in_linear_time() -> None:
    """Fails on main (the alarm: 2.5 million characters); a token after it is still replaced."""
    with cpu_alarm(20):
        out = redaction.redact("eyJ" * 800_000 + f" Bearer%20{TOKEN} x={TOKEN}")
    assert TOKEN not in out and out.endswith(f" Bearer%20{redaction.REDACTED} x={redaction.REDACTED}")
