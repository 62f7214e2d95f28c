"""Session 46 (46th attack campaign): credentials written in shapes the key/value scan did not read.

* An XML element's text (``<password><v></password>``, with a namespace's prefix, pretty-printed).
* A PHP array's or a Ruby/Perl hash's pair (``'password' => '<v>'``, ``:token => '<v>'``): "=" then ">" was no
  value.
* A secret's name given as data, its value in the field after it: a list of environment variables (JSON,
  Kubernetes' YAML), a property list's ``<key>OPENAI_API_KEY</key><string><v></string>``, .NET's ``<add
  key="DbPassword" value="<v>"/>``, OTLP/JSON's ``{"key": "password", "value": {"stringValue": "<v>"}}``, a
  subscript's assignment (``os.environ["OPENAI_API_KEY"] = "<v>"``) and an environment setter
  (``os.environ.setdefault("API_KEY", "<v>")``); and the same pairs as data (``scrub`` and the learning from tool
  arguments).
* The password inside an HTTP Basic credential (base64 of ``user:password``) and a URL's percent-encoded password
  (``https://bob:Zq%40ss@host``): learned as written only, the password itself was shown later.
* A name encoded twice (``pass%2577ord=<v>``).
* "password" in other languages (``пароль``, ``contraseña``, ``パスワード``, ``密码``, ``hasło``, ``Passwort``).

Through the redaction's entry points and a real ``IngestServer`` (OTLP/JSON, OTLP/protobuf over HTTP, gRPC; SQLite).
Each value must be replaced where it stands and learned (a later text quoting it alone is redacted). Both
directions: code (a JavaScript arrow function's parameter, a PHP call), a plist's key names, a name/value pair
naming no secret, a closing tag, and an ordinary word after a name in prose of another language are not learned.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

from ._attack_helpers import PROTOCOLS, ingested, rows_holding

pytestmark = pytest.mark.usefixtures("isolated_secrets")

SHAPES = {
    "xml": "<config><password>{v}</password></config>",
    "xml-namespace": "<cfg:apiKey>{v}</cfg:apiKey>",
    "xml-pretty": "<password>\n    {v}\n</password>",
    "php-array": "$config = ['host' => 'db', 'password' => '{v}'];",
    "ruby-symbol": "connect(:host => 'db', :token => \"{v}\")",
    "env-list-json": '{{"env": [{{"name": "DB_PASSWORD", "value": "{v}"}}]}}',
    "env-list-yaml": "env:\n  - name: OPENAI_API_KEY\n    value: {v}\n",
    "dotnet-settings": '<appSettings><add key="DbPassword" value="{v}" /></appSettings>',
    "plist": "<dict><key>OPENAI_API_KEY</key>\n<string>{v}</string></dict>",
    "otlp-json": '{{"key": "password", "value": {{"stringValue": "{v}"}}}}',
    "subscript": 'os.environ["OPENAI_API_KEY"] = "{v}"',
    "setter": "os.environ.setdefault('ANTHROPIC_API_KEY', '{v}')",
    "encoded-twice": "q=1&pass%2577ord={v}&x=2",
    "russian": "Ваш пароль: {v}",
    "spanish": "contraseña: {v}",
    "japanese": "パスワード\uff1a{v}",  # (a fullwidth colon)
    "chinese": "数据库密码: {v}",
    "polish": "hasło = {v}",
    "german": "Passwort: {v}",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_credential_in_these_shapes_is_replaced_and_learned(shape: str) -> None:
    """Fails on main (19 of 19): the value was shown, there and in a later text."""
    value = unlearned_word("Sx") + "4"
    out = redaction.safe_text(SHAPES[shape].format(v=value)) or ""
    assert value not in out and "[REDACTED]" in out
    assert redaction.safe_text(f"later {value} again") == "later [REDACTED] again"


def _env_list(value: str) -> dict[str, object]:
    return {"env": [{"name": "DB_PASSWORD", "value": value}]}


def _otlp_attributes(value: str) -> dict[str, object]:
    return {"attributes": [{"key": "api_key", "value": {"stringValue": value}}]}


@pytest.mark.parametrize("data", [_env_list, _otlp_attributes], ids=["env-list", "otlp"])
def test_a_name_value_pair_as_data_is_scrubbed_and_learned(data: Callable[[str], dict[str, object]]) -> None:
    """Fails on main (2 of 2): each key alone names no secret; the value was recorded and never learned (scrub,
    and the learning from a tool's arguments with content capture off)."""
    value = unlearned_word("Dx") + "2"
    assert value not in str(redaction.scrub(data(value)))
    assert redaction.safe_text(f"later {value}") == "later [REDACTED]"
    other = unlearned_word("Ex") + "3"
    redaction.learn_secrets_in(data(other))
    assert redaction.safe_text(f"later {other}") == "later [REDACTED]"


@pytest.mark.parametrize("text", [
    "Authorization: Basic {b}",
    "curl -H 'Authorization: Basic {b}' https://api",
    "GET https://bob:{pct}@db.example.org/x",
], ids=["basic", "basic-in-curl", "url-percent"])
def test_the_password_a_login_encodes_is_learned(text: str) -> None:
    """Fails on main (3 of 3): the credential was replaced, and the password it encodes, quoted later, shown."""
    password = unlearned_word("Bx") + "5@!"
    encoded = base64.b64encode(f"bob:{password}".encode()).decode()
    pct = password.replace("@", "%40").replace("!", "%21")
    out = redaction.safe_text(text.format(b=encoded, pct=pct)) or ""
    assert encoded not in out and pct not in out
    assert redaction.safe_text(f"the tool said {password} was refused") == "the tool said [REDACTED] was refused"


@pytest.mark.parametrize(("text", "word"), [
    ("const ok = password => password.length > 8;", "length"),
    ("$data = ['password' => $request->input('password')];", "request"),
    ("<key>CFBundleName</key><string>{v}</string>", "{v}"),
    ('[{{"name": "DB_HOST", "value": "database7host"}}]', "database7host"),
    ("</password>notavalue7 here", "notavalue7"),
    ("Забыли пароль: нажмите здесь", "нажмите"),
    ("the keys are 'password', 'value': listed7 here", "listed7"),
    ("env['HTTP_COOKIE'] = cookie_str", "cookie_str"),
    ("by commenting out the <auth> element. This is", "element"),
    ("the trailer.<token>.command configuration", ".command"),
    ("pkcs11:token=Root%20CA%20Certificates;serial=1", "Root CA Certificates"),
], ids=["arrow-function", "php-call", "plist-key-names", "no-secret-name", "closing-tag", "prose", "words",
        "subscript-variable", "element-in-prose", "placeholder", "decoded-words"])
def test_code_and_ordinary_text_teach_nothing(text: str, word: str) -> None:
    """Both directions (held up on main): nothing learned from these (the last four were learned by this branch's
    first rules: bench/learned_corpus.py found them in the stdlib's and Debian's documentation)."""
    value = unlearned_word("Nx") + "6"
    redaction.safe_text(text.format(v=value))
    later = f"later {word.format(v=value)} here"
    assert redaction.safe_text(later) == later


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_ingest_clients_name_value_pairs_are_not_stored(protocol: str, tmp_path: Path) -> None:
    """Fails on main (3 of 3): a real ``IngestServer`` stored an ingest client's Kubernetes manifest (a string
    attribute, every protocol) and its list of name/value dicts (OTLP/JSON's ``kvlistValue``) with the values."""
    manifest_value, listed_value = unlearned_word("Mx") + "7", unlearned_word("Lx") + "8"
    attributes: dict[str, object] = {
        "deploy.manifest": f"env:\n  - name: OPENAI_API_KEY\n    value: {manifest_value}\n"}
    if protocol == "json":
        attributes["deploy.env"] = [{"name": "DB_PASSWORD", "value": listed_value}]
    db, _ = ingested(tmp_path, attributes, protocol)
    assert rows_holding(db, manifest_value) == [] and rows_holding(db, listed_value) == []
    assert rows_holding(db, "OPENAI_API_KEY")  # the rest of the manifest is kept
