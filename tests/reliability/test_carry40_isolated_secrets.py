"""Session 40 (carried over): ``isolated_secrets`` copied the learned secrets instead of starting clean.

A test using it saw what every earlier test of the process had learned (a learned word is redacted even
inside longer words), so its outcome depended on which tests ran before it: in the full suite "Failed" had
been learned when ``test_carry39_secret_scan_of_exception_types.py`` ran, not when it ran alone. The fixture
now starts from nothing learned (registered secrets kept) and puts everything back afterwards.
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction
from tests.conftest import forget_learned


def _word() -> str:
    return f"Zq{secrets.token_hex(4)}carry40"


def test_isolated_secrets_starts_with_nothing_learned_and_forgets_after(request: pytest.FixtureRequest) -> None:
    """Fails on 86547de: the secret learned before the fixture (as by an earlier test) is redacted inside it."""
    earlier, inside, registered = _word(), _word(), _word()
    redaction.learn_secret(earlier)  # what an earlier test of the process taught
    redaction.register_secret(registered)  # configuration: registered secrets are kept

    def after_the_fixture() -> None:  # runs after the fixture's teardown (finalizers run last in, first out)
        try:
            assert redaction.safe_text(f"x {earlier}") == f"x {redaction.REDACTED}"  # put back
            assert redaction.safe_text(f"x {inside}") == f"x {inside}"  # the test's own learning forgotten
        finally:
            forget_learned(earlier)

    request.addfinalizer(after_the_fixture)
    request.getfixturevalue("isolated_secrets")
    assert redaction.safe_text(f"x {earlier}") == f"x {earlier}"
    assert redaction.safe_text(f"x {registered}") == f"x {redaction.REDACTED}"
    redaction.learn_secret(inside)
    assert redaction.safe_text(f"x {inside}") == f"x {redaction.REDACTED}"
