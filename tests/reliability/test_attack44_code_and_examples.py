"""Session 44 (44th attack campaign): code and documentation examples under a secret's name are not learned.

``bench/learned_corpus.py --prose`` (the first 900 Python files of AG2, httpx and openai and the installed
distributions' READMEs) still taught 27 values on main, each then redacted in every later text, inside longer words
too: Python annotations (``auth: AuthTypes | None = None``, ``api_key: "str | Variable | None"``), a tuple's
unpacking (``mode, credential = configuration``), attributes (``self._auth``, ``state.token_provider is None``),
f-string pieces (``f"token {...}"``), constants (``{MIME_TYPE_KEY: A2UI_MIME_TYPE}``, ``A2UI_OPERATIONS_KEY =
"a2ui_operations"``), version pins (``tiktoken==0.2.0``), placeholders (``"sk-..."``, ``"dummy_auth_token"``,
``"My API Key"``) and a docstring's provider (``api_key: Daytona API key.``). Each is replaced where it stands at
most, never learned now; the same shapes holding a credential still teach it (both directions).
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize(("text", "word"), [
    ("def __init__(\n    self,\n    *,\n    auth: AuthTypes | None = None,\n    params: Q | None = None,\n):",
     "AuthTypes"),
    ("    auth: AuthBlock = field(default_factory=AuthBlock)\n", "AuthBlock"),
    ("    auth: _BedrockBearerAuth | _BedrockSigV4Auth | None = None\n", "_BedrockBearerAuth"),
    ("def f(func: Callable[..., Any], sig: inspect.Signature, params: Iterable[str]) -> None:", "inspect.Signature"),
    ('    api_key: "str | Variable | None" = None,\n', "str | Variable | None"),
    ("    mode, credential = configuration\n", "configuration"),
    ("username, password = request.url.username, request.url.password\n", "request.url.username"),
    ("        auth=self._auth,\n", "self._auth"),
    ("api_key_was_mutated = state.token_provider is None\n", "state.token_provider"),
    ('return {"Authorization": f"token {self._connection_info.token}"}', 'f"token'),
    ("metadata={MIME_TYPE_KEY: A2UI_MIME_TYPE},", "A2UI_MIME_TYPE"),
    ('A2UI_CLIENT_CAPABILITIES_METADATA_KEY = "a2uiClientCapabilities"', "a2uiClientCapabilities"),
    ('A2UI_OPERATIONS_KEY = "a2ui_operations"', "a2ui_operations"),
    ("Requires-Dist: detect-secrets==1.5.0; extra == 'dev'", "=1.5.0"),
    ('manager = ContainerManager(api_key="sk-...")', "sk-..."),
    ('client=SkillsClientConfig(github_token="ghp_...", proxy="http://proxy:8080"),', "ghp_..."),
    ('    "gcp_auth_token": "dummy_auth_token",\n', "dummy_auth_token"),
    ('to add `OPENAI_API_KEY="My API Key"` to your `.env` file', "My API Key"),
    ('url.copy_with(username="jo@gmail.com", password="a secret")', "a secret"),
    ("    Args:\n        api_key: Daytona API key. If None, reads from DAYTONA_API_KEY env var.\n", "Daytona"),
])
def test_code_and_examples_under_a_secrets_name_are_not_learned(text: str, word: str) -> None:
    """Fails on main (20 of 20): each value was learned, then redacted in a later text."""
    redaction.safe_text(text)
    later = f"see {word} here"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize(("text", "secret"), [
    ("auth: Xk9fLm2Qp7Rt\n", "Xk9fLm2Qp7Rt"),
    ('api_key = "Zq8vN3wLp2Kd"\n', "Zq8vN3wLp2Kd"),
    ("    password = hunter2xyz\n", "hunter2xyz"),
    ('{"gcp_auth_token": "ya29.Abcd3fGh1jKl"}', "ya29.Abcd3fGh1jKl"),
    ("api_key: Sw0rdf1shKey. If None, read it\n", "Sw0rdf1shKey"),
    ('OPENAI_API_KEY="correct horse battery"', "correct horse battery"),
    ("Authorization: Token abcdefghijkl", "abcdefghijkl"),
    ("my password: hunter2xyz...", "hunter2xyz"),
])
def test_credentials_in_the_same_shapes_are_still_learned(text: str, secret: str) -> None:
    """Both directions (held up on main): a value that is no code or example is learned as before."""
    assert secret not in (redaction.safe_text(text) or "")
    assert redaction.safe_text(f"later {secret} again") == "later [REDACTED] again"
