"""Session 47 (47th attack campaign): credentials written in forms the key/value scan did not read.

* Structure: ``password -> <v>`` (a note's arrow, a Scala map's pair), a Markdown table's row (``| password | <v>
  |``) and column (a header naming it, the values in the rows under its rule), a YAML anchor (``password: &pw
  <v>``), an HTML-escaped XML element (``&lt;password&gt;<v>&lt;/password&gt;``) or JSON (``{&quot;password&quot;:
  &quot;<v>&quot;}``, ``&#34;`` too: only references of key characters were decoded), an XML element with attributes
  (``<password type="x"><v></password>``), a configuration's setter (``config.set("db", "password", <v>)``) and a
  setter's last argument (``keyring.set_password("svc", "user", <v>)``).
* Other languages: the verb of prose (``la contraseña es <v>``, ``das Passwort ist <v>``, ``le mot de passe est
  <v>``) and names in ASCII letters holding no English hint (``senha``, ``kennwort``, ``wachtwoord``, ``haslo``,
  ``parola``; looked for in texts beyond ASCII, as the other languages' names).
* Command lines giving a credential by its place (session 42 read mysql's ``-p<v>``, sshpass's ``-p``, curl's ``-u
  user:<v>``): ``setx NAME "<v>"`` (quoted: bare was read), ``gh secret set NAME --body <v>`` (``--body=<v>``, ``-b
  <v>``), a registry's or a cloud's login ``-p <v>`` (docker, podman, helm registry, az), ``sqlcmd -P <v>``,
  ``redis-cli -a <v>``, OpenLDAP's ``-w <v>``, ``zip -P <v>``, 7-Zip's ``-p<v>``, smbclient's ``-U user%<v>``,
  PowerShell's ``ConvertTo-SecureString "<v>" -AsPlainText``; and pydantic's ``SecretStr("<v>")`` after a name.
* Hex of such a pair glued to other letters or digits (``id<hex>``, ``x_<hex>zz``): decoded as a whole run only.

Through the redaction's entry points (``safe_text``, ``scrub``). Each value must be replaced where it stands and
learned (a later text quoting it alone is redacted). Both directions: a Java lambda, a table of parameters and
their types, a table's header, a getter's arguments, an HTML input's attributes, a name holding such a word inside
another (``hasLoaded``) and the same commands without a credential are kept and teach nothing.
"""

from __future__ import annotations

import pytest

from cmbagent_otel import redaction
from tests.conftest import unlearned_word

from ._attack_helpers import assert_kept, assert_replaced_and_learned

pytestmark = pytest.mark.usefixtures("isolated_secrets")

SHAPES = {
    "arrow": "password -> {v}",
    "scala-map": 'Map("user" -> "bob", "password" -> "{v}")',
    "unicode-arrow": "api_key \u2192 {v}",
    "markdown-row": "| setting | value |\n|---|---|\n| password | {v} |",
    "markdown-row-code": "| `api_key` | `{v}` |",
    "markdown-column": "| user | password |\n|------|----------|\n| bob  | {v} |",
    "markdown-column-bare": "user | token\n--- | ---\nbob | {v}\n",
    "yaml-anchor": "db:\n  password: &pw {v}\n  replica: *pw\n",
    "html-escaped-xml": "&lt;config&gt;&lt;password&gt;{v}&lt;/password&gt;&lt;/config&gt;",
    "html-escaped-json": "<div data-config='{{&quot;password&quot;: &quot;{v}&quot;}}'>",
    "html-numeric-quotes": "{{&#34;api_key&#34;: &#34;{v}&#34;}}",
    "html-escaped-pair": "token=&apos;{v}&apos; &amp; more",
    "xml-attributes": '<password type="plain" encoding=\'utf-8\'>{v}</password>',
    "config-set": 'config.set("database", "password", "{v}")',
    "keyring": 'keyring.set_password("my-service", "bob", "{v}")',
    "django-setter": "user.set_password('{v}')",
    "pydantic-secret": "Settings(api_key=SecretStr(\"{v}\"), password=SecretStr('{v}'))",
    "spanish-verb": "la contraseña es {v}",
    "german-verb": "das Passwort ist {v}",
    "french-verb": "le mot de passe est {v}",
    "french-name": "mot de passe : {v}",
    "portuguese-name": "Usuário: bob, senha: {v}",
    "german-name": "Benutzer bob, Kennwort: {v} (geändert)",
    "dutch-name": "wachtwoord = {v} — niet delen, één keer",
    "polish-name": "login: bob, haslo: {v}, zmień je",
    "italian-name": "parola d'accesso — parola: {v} (è nuova)",
    "portuguese-verb": "a senha é {v}",
}

# credentials a command line gives by position, after the command that reads them so
COMMANDS = {
    "setx-quoted": 'setx OPENAI_API_KEY "{v}" /M',
    "gh-body": "gh secret set API_TOKEN --body {v}",
    "gh-body-equals": "gh secret set API_TOKEN --body={v} --repo me/x",
    "gh-b-quoted": 'gh secret set API_TOKEN -b "{v}"',
    "docker-login": "docker login -u bob -p {v} registry.example.com",
    "podman-login": "podman login --username bob -p '{v}' quay.io",
    "helm-registry": "helm registry login ghcr.io -u bob -p {v}",
    "az-login": "az login --service-principal -u app-id -p {v} --tenant t1",
    "sqlcmd": "sqlcmd -S db.example.com -U sa -P {v} -Q 'select 1'",
    "redis-cli": "redis-cli -h cache -a {v} ping",
    "ldapsearch": "ldapsearch -x -D cn=admin,dc=example -w {v} -b dc=example",
    "zip": "zip -P {v} -r backup.zip data/",
    "7z": "7z a -p{v} -mhe=on backup.7z data/",
    "smbclient": "smbclient //srv/share -U bob%{v} -c ls",
    "powershell": "$pw = ConvertTo-SecureString \"{v}\" -AsPlainText -Force",
    "after-a-pipe": "cat list.txt | redis-cli -a '{v}' --pipe; echo done",
}


FORMS = {**SHAPES, **COMMANDS}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_a_credential_in_these_forms_is_replaced_and_learned(form: str) -> None:
    """Fails on main (43 of 43): the value was shown, there and in a later text."""
    assert_replaced_and_learned(form)


KEPT = {
    "java-lambda": "users.map(password -> password.trim())",
    "c-pointer": "if (cfg->token->next_token2) free(cfg);",
    "markdown-parameters": "| Name | Type | Description |\n|---|---|---|\n| api_key | str | Your key |\n"
                           "| token | Optional[str] | A token |\n| password | SecretStr | required |",
    "markdown-header": "| name | password | notes |\n|---|---|---|\n",
    "markdown-words": "| password | required |\n| token | expired |",
    "getter": 'keyring.get_password("my-service", "bob")',
    "setter-variable": "user.set_password(new_password)",
    "html-input": '<input type="password" name="pw" value="">',
    "identifier": "hasLoaded: Vq8ready é",
    "setx-path": 'setx PATH "C:\\tools\\bin2"',
    "setx-java-home": "setx JAVA_HOME C:\\jdk17",
    "docker-password-stdin": "docker login -u bob --password-stdin registry.example.com",
    "gh-secret-list": "gh secret list --repo me/x2",
    "gh-secret-from-a-file": "gh secret set API_TOKEN < token.txt",
    "zip-recursive": "zip -r backup2.zip data/",
    "redis-cli-port": "redis-cli -h cache2 -p 6379 ping",
    "ldapsearch-anonymous": "ldapsearch -x -H ldap://db2 -b dc=example",
    "7z-extract": "7z x backup2.7z -o/tmp/out2",
    "smbclient-list": "smbclient -L //srv2 -N",
    "sqlcmd-trusted": "sqlcmd -S db2 -E -Q 'select 1'",
    "powershell-encrypted": "$pw = ConvertTo-SecureString $encrypted2 -Key $k",
    "pydantic-variable": "Settings(api_key=SecretStr(value))",
}


@pytest.mark.parametrize("kept", KEPT)
def test_code_tables_and_commands_naming_no_value_are_kept(kept: str) -> None:
    """Passes on main too: these hold no credential's value; kept as written and nothing learned."""
    assert_kept(KEPT[kept])


def test_a_scrubbed_dict_keyed_by_a_foreign_name_is_redacted() -> None:
    """Fails on main: a tool's arguments or a settings dict keyed ``senha``, ``Kennwort``, ``wachtwoord`` were
    recorded with their values (no English hint in the key)."""
    value = unlearned_word("Sx") + "4"
    for key in ("senha", "Kennwort", "wachtwoord", "DB_SENHA"):
        assert redaction.scrub({key: value, "host": "db"}) == {key: "[REDACTED]", "host": "db"}


GLUED = {"after-letters": "id{h}", "between": "x_{h}zz", "path-segment": "/cache/{h}/blob",
         "upper-case": "KEY{H}_x", "after-a-digit": "x5{h}"}


@pytest.mark.parametrize("glued", GLUED.values(), ids=GLUED.keys())
def test_hex_of_a_pair_glued_to_other_characters_is_replaced_and_learned(glued: str) -> None:
    """Fails on main (5 of 5): hex of ``password=<v>`` was decoded only as a whole run (no letter or digit before
    or after it); glued to others it was stored as written, readable by decoding it."""
    value = unlearned_word("Sx") + "4"
    encoded = f"password={value}".encode().hex()
    out = redaction.safe_text(glued.format(h=encoded, H=encoded.upper())) or ""
    assert encoded not in out.lower() and "[REDACTED]" in out
    assert redaction.safe_text(f"later {value} again") == "later [REDACTED] again"
