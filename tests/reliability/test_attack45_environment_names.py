"""Session 45 (45th attack campaign): environment variables named with dashes or dots.

``openai-api-key``, ``my-api-key``, ``db.password``: such names are set through ``env``, a process's environment
dict or a container's configuration, not a shell. The environment's rule read "_" as the only joiner (``API_?KEY``,
``_KEY`` as a word), so their values were never registered and a tool printing one showed it. Words joined by "-" or
"." are read as joined by "_" now; a name of data (``sort-key``) still holds no secret.
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize("name", ["openai-api-key", "my-api-key", "openai.api.key", "my-pass", "service-key",
                                  "db.password"])
def test_a_variable_named_with_dashes_or_dots_is_registered(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Fails on main (5 of 6; ``db.password`` held PASSWORD anywhere): shown in a tool's output."""
    value = "Qv" + secrets.token_hex(10)
    monkeypatch.setenv(name, value)
    redaction.register_new_environment()
    assert redaction.safe_text(f"printed {value}") == "printed [REDACTED]"


@pytest.mark.parametrize("name", ["sort-key", "cache.key", "primary-key"])
def test_a_name_of_data_with_dashes_holds_no_secret(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Both directions (held up on main): a key into data keeps its value readable, as ``SORT_KEY`` does."""
    monkeypatch.setenv(name, "created_at")
    redaction.register_new_environment()
    assert redaction.safe_text("ordered by created_at") == "ordered by created_at"
