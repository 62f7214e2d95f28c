"""Session 40 (38th attack campaign): keys named for key material kept their values.

``auth_key`` (DeepL's client takes its key so; ``X-Auth-Key`` headers), ``hmac_key``, ``signing_key``,
``encryption_key`` and ``master_key`` (and their camelCase and dotted forms) matched no secret name: a tool's
arguments, a model's JSON or a printed configuration kept the value, and it was not learned. They are secret
names now; ``license_key``, ``ssh_key`` (often a path), ``primary_key`` and an ARN under such a name are not.

The values are this file's own (``isolated_secrets``).
"""

from __future__ import annotations

import json

import pytest

from cmbagent_otel import redaction

pytestmark = pytest.mark.usefixtures("isolated_secrets")


@pytest.mark.parametrize("name", ["auth_key", "authKey", "X-Auth-Key", "deepl.auth.key", "hmac_key", "signingKey",
                                  "encryption_key", "master_key"])
def test_a_key_material_name_hides_its_value(name: str) -> None:
    """Fails on 86547de for each name: the value kept in data and text, and in a later text."""
    value = f"Pf6att40{name.replace('.', '').replace('-', '').lower()}"
    assert redaction.is_secret_key(name)
    assert redaction.scrub({"args": {name: value}}) == {"args": {name: redaction.REDACTED}}
    assert value not in (redaction.safe_text(f"config:\n{name}: {value}\n") or "")
    redaction.learn_secrets_in(json.dumps({name: value}))
    assert value not in (redaction.safe_text(f"used {value}") or "")


def test_other_key_names_stay_ordinary() -> None:
    for name in ("license_key", "ssh_key", "primary_key", "keyauth", "master.key.arn", "turnkey"):
        assert not redaction.is_secret_key(name), name
