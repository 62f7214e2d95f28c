"""Session 40 (38th attack campaign): a setting named as an environment variable kept its secret in data and text.

The environment's rule takes a variable with ``KEY``, ``PASS`` or ``PAT`` as a word of its name for a secret
(``AZURE_OPENAI_KEY``, ``DB_PASS``, ``GITHUB_PAT``): its value is registered. The same names as keys of data
(tool arguments, a model's JSON answer, a dict of settings) or of text (a printed ``.env`` file, ``export
DB_PASS=...`` in a code block, code output) were no secret-named keys: the value was shown, and not learned,
unless the variable happened to be set in the instrumented process itself. Now a name written as an
environment variable's (upper case, words joined by ``_``) follows the environment's rule; lower-case names
keep theirs (``primary_key``, ``first_pass`` hold no secrets).

The values are this file's own (``isolated_secrets``: nothing learned here outlives the test).
"""

from __future__ import annotations

import json

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")

NAMES = ("OPENAI_KEY", "DB_PASS", "GITHUB_PAT", "SMTP_PASS_PRIMARY", "MISTRAL_KEY", "KEY")


@pytest.mark.parametrize("name", NAMES)
def test_an_environment_style_name_hides_its_value_in_data(name: str) -> None:
    """Fails on 86547de for each name: the value stays in the scrubbed data and in a later text."""
    value = f"Wm4att40{name.lower().replace('_', '')}"
    assert redaction.is_secret_key(name)
    assert redaction.scrub({"settings": {name: value}}) == {"settings": {name: redaction.REDACTED}}
    redaction.learn_secrets_in(json.dumps({"env": {name: value}}))  # a tool call's arguments
    assert value not in (redaction.safe_text(f"connected with {value}") or "")


@pytest.mark.parametrize("line", ["OPENAI_KEY={v}", "export DB_PASS='{v}'", "SMTP_PASS: {v}"])
def test_an_environment_style_name_hides_its_value_in_text(line: str) -> None:
    """Fails on 86547de: a printed .env file, a shell line, a YAML setting showed the value (the text's key
    scan has no ``pat`` hint: ``GITHUB_PAT=`` in text is not read, only as a key of data)."""
    value = f"Wm4att40text{len(line)}x"
    shown = redaction.safe_text(f"$ cat .env\n{line.format(v=value)}\nLOG_LEVEL=debug") or ""
    assert value not in shown and "LOG_LEVEL=debug" in shown
    assert value not in (redaction.safe_text(f"later: {value}") or "")


def test_lower_case_and_other_upper_case_names_are_unchanged() -> None:
    """What must not change: ordinary lower-case names and upper-case names without those words."""
    for name in ("primary_key", "sort_key", "first_pass", "github_pat_count", "PATH", "KEYBOARD", "PASSAGE",
                 "LOG_LEVEL", "SORT_KEYS"):
        assert not redaction.is_secret_key(name), name


@pytest.mark.parametrize("name", ["SORT_KEY", "CACHE_KEY", "PRIMARY_KEY", "PARTITION_KEYS", "RESULT_KEY"])
def test_a_constant_naming_a_key_into_data_teaches_nothing(name: str) -> None:
    """A code constant naming a key into data (``SORT_KEY = "wm4att40orderedby"``) holds no credential: its value,
    often an ordinary word, must not be learned, or every later text loses that word, inside longer words too.
    Learned (and then redacted in ``later``) by the first form of the environment-style rule."""
    value = f"wm4att40{name.lower().replace('_', '')}"
    assert not redaction.is_secret_key(name)
    assert redaction.scrub({name: value}) == {name: value}
    shown = redaction.safe_text(f'{name} = "{value}"\nrows.sort(key=lambda r: r[{name}])') or ""
    assert value in shown
    assert value in (redaction.safe_text(f"later: {value}_column") or "")


@pytest.mark.parametrize("name", ["DATA_KEY", "ROUTING_KEY", "HASH_KEY", "DEFAULT_KEY", "S3_KEY", "PASS_SORT_KEY"])
def test_a_name_that_may_hold_key_material_stays_secret(name: str) -> None:
    """The words left out of the data-key rule on purpose: each also names a credential somewhere (a KMS data key,
    PagerDuty's routing key)."""
    value = f"Wm4att40km{name.lower().replace('_', '')}"
    assert redaction.is_secret_key(name)
    assert value not in (redaction.safe_text(f"{name}={value}") or "")
    assert value not in (redaction.safe_text(f"later: {value}") or "")
