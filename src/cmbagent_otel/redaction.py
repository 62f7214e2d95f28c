"""Bounding and scrubbing of values before they become span attributes.

Every string cmbagent-otel puts on a span passes through :func:`truncate` (length bound)
and, when it can carry user or provider text, :func:`redact` (secret scrubbing). Secrets
are recognised four ways:

* values registered with :func:`register_secret` (API keys found in ``llm_config`` are
  registered automatically by the instrumentor) and values of environment variables whose
  name looks secret (``*_API_KEY``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``);
* values learned from data (:func:`learn_secret`): whatever sits under a secret-named key
  (``password``, ``api_key``, ``token``, ``authorization``... see :func:`is_secret_key`) in
  a dict, in tool-call arguments, or in text written as ``key: value`` / ``"key": "value"``
  / ``key=value`` (JSON, JSON nested in JSON strings, Python reprs, query strings);
  the most recent 256 learned values are kept;
* the value part of such key/value text, replaced in place even when it is too short to
  be learned;
* well-known key shapes (``sk-...``, ``Bearer ...``, ``Basic ...``, Google ``AIza...``,
  GitHub/Slack tokens, Hugging Face ``hf_...``, Groq ``gsk_...``, xAI ``xai-...``,
  Perplexity ``pplx-...``, AWS access key ids, JWTs, PEM private keys, GitLab ``glpat-...``,
  npm, PyPI, SendGrid, DigitalOcean, Stripe restricted keys, URL credentials).

Texts are also searched with ``%XX``, ``\\u00XX`` and ``&#NN;`` escapes decoded, with invisible
and look-alike characters folded (a key broken up by U+200B, fullwidth, Unicode tags, Cyrillic
letters), and inside base64 blobs that start as gzip, zlib, a PEM block or a JSON object.

A learned value is redacted wherever it appears afterwards, so a password passed to a tool
is also scrubbed from the exception message or the result the tool produces.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import operator
import os
import re
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from . import environment_variables
from ._forksafe import reset_in_child
from ._jsontext import compact_encoder

REDACTED = "[REDACTED]"

# ... and KEY, PASS, PAT as a word of the name (AZURE_OPENAI_KEY, DB_PASS, GITHUB_PAT; not PATH, KEYBOARD); a
# passphrase or passcode (BORG_PASSPHRASE, GPG_PASSPHRASE: not registered before) and sshpass's SSHPASS;
# AUTH but not an author, an authority or ssh-agent's socket (GIT_AUTHOR_NAME, XAUTHORITY, SSH_AUTH_SOCK: a
# person's name or a path, which would be redacted wherever it appears), AUTHORIZATION still
_SECRET_ENV_NAME = re.compile(
    r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|PASSCODE|SSHPASS|CREDENTIAL|AUTH(?!OR(?!IZ)|_SOCK)|COOKIE"
    r"|PRIVATE_?KEY|CONNECTION_?STRING|(?:^|_)(?:KEY|PASS|PAT)(?:_|$))",
    re.IGNORECASE,
)
# account key / shared access key: Azure connection strings; sig: an Azure SAS URL's signature; auth key
# (DeepL's auth_key, X-Auth-Key), HMAC, signing, encryption and master keys are key material by their name.
# Words may be joined by "." as well (OpenTelemetry attribute names: `aws.secret.access.key`, `openai.api.key`)
# ... but not a name's ARN (``aws.secretsmanager.secret.arn``: an identifier; a secret under it is
# still caught by value)
# The words are looked for in the name's last run of [\w.-] only (what a word may be followed by): the text up to its
# last other character is matched once, as an atomic group (a lookahead's capture, taken back by reference), and the
# run checked once. Written as ``.*(?:words)[\w.\-]*$``, every word's occurrence scanned the rest of the name again:
# a dict key of "Secret" * 10,000 + "!" took 2 s to judge, 100 kB 12 s.
# "password" in other languages, written with letters beyond ASCII (looked for in such texts only: each word is a
# pass more over a text): ``contraseña: <v>``, ``пароль: <v>``, ``密码: <v>`` were read as no name (German's
# "Passwort" and Norwegian's "passord" start with "pass": named so below)
_FOREIGN_HINTS = ("contraseña", "пароль", "密码", "密碼", "口令", "パスワード", "비밀번호", "hasło", "şifre",
                  "lösenord", "jelszó", "κωδικός", "סיסמה", "पासवर्ड")
# ... and in ASCII letters (Portuguese, German, Dutch, Italian and Turkish, Polish and Finnish written without their
# letters): looked for as the others, in texts beyond ASCII only (a text of these languages nearly always holds one
# of their letters; each word a pass more over every ASCII text, ~0.5 ns a character); a name holding one is secret
# as a whole word only (``hasLoaded`` holds "haslo")
_FOREIGN_ASCII = ("senha", "kennwort", "wachtwoord", "parola", "haslo", "salasana")
_FOREIGN_HINTS += _FOREIGN_ASCII
_FOREIGN_NAMES = "|".join(_FOREIGN_HINTS)
_FOREIGN_SCRIPT_NAMES = "|".join(hint for hint in _FOREIGN_HINTS if hint not in _FOREIGN_ASCII)
_UNSPACED = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"  # CJK, kana, hangul: scripts written without blanks
_SECRET_KEY_NAME = re.compile(
    r"^(?![\w.\-]*[._\-]arn$)(?:(?=((?:.*[^\w.\-\n])?))\1(?=[\w.\-]*$)[\w.\-]*?"
    r"(?:(?<![a-z])(?:" + "|".join(_FOREIGN_ASCII) + r")(?![a-z])[\w.\-]*|"
    r"(?:api[_.-]?key|apikey|passw(?:or)?d|passwort|passord|" + _FOREIGN_SCRIPT_NAMES + "|passphrase|"
    r"secret|credential|private[_.-]?key|access[_.-]?key|"
    r"auth[_.-]?token|subscription[_.-]?key|account[_.-]?key|functions[_.-]?key|connection[_.-]?string|"
    r"(?:auth|hmac|signing|encryption|master)[_.-]?key)[\w.\-]*|token|authorization|cookie)"
    r"|auth|pass|passe|pwd|sig)$",  # (French's "mot de passe")
    re.IGNORECASE,
)
# a name written as an environment variable's (upper case, words joined by "_") is secret by the rule for
# environment variables: with KEY, PASS or PAT as a word (a printed .env file, `export DB_PASS=...`, a dict of
# settings: OPENAI_KEY, DB_PASS, GITHUB_PAT), as the variable itself would be; lower-case names keep the rule
# above (primary_key, sort_key, first_pass hold no secrets)
# ... and AUTH as its last word (NPM_AUTH, GH_AUTH, PROXY_AUTH, HTTP_AUTH, REDISCLI_AUTH: npm's and proxies' tokens and
# user:password pairs, registered from the environment but kept in a printed .env file or a dict of settings); not
# AUTH before another word (POSTGRES_HOST_AUTH_METHOD, AUTH_URL: a method's or a place's name). Such a name holding
# a method (SMTP_AUTH=CRAM-MD5, HTTP_AUTH=basic) holds no secret: see _AUTH_METHOD
_ENV_STYLE_SECRET_NAME = re.compile(
    r"(?:[A-Z][A-Z0-9]*_)*(?:KEY|PASS|PAT)(?:_[A-Z0-9]+)*|SSHPASS|(?:[A-Z][A-Z0-9]*_)+AUTH")
# ... but KEY after a word that names a key into data is a code constant, not a credential (SORT_KEY = "created",
# CACHE_KEY, PRIMARY_KEY): its value, often an ordinary word, would be learned and then redacted in every later
# text, inside longer words too. Words that also name key material are not here (DATA_KEY: a KMS data key,
# ROUTING_KEY: PagerDuty's integration key, HASH_KEY, DEFAULT_KEY, S3_KEY, REDIS_KEY)
_DATA_KEY_NAME = re.compile(
    r"(?:(?!PASS_|PAT_)[A-Z][A-Z0-9]*_)*(?:SORT|PRIMARY|FOREIGN|CACHE|PARTITION|LOOKUP|ROW|INDEX|GROUP|RANGE|"
    r"DEDUP|MAP|DICT|COLUMN|FIELD|OBJECT|BUCKET|STATE|CONFIG|UNIQUE|SHARD|CLUSTER|SEARCH|FILTER|ORDER|JOIN|ID|NAME|"
    r"RESULT|ENTRY|ITEM|RECORD|TABLE|SETTINGS?|CONTEXT)_KEYS?")


def _names_data_key(name: str) -> bool:
    """Whether ``name`` (a key of data, or an environment variable's name, in any case) names a key into data, not
    a credential (``_DATA_KEY_NAME``), with no other secret word before it (``TOKEN_CACHE_KEY``, ``PASS_SORT_KEY``
    stay secret). One rule for both: the environment's rule registered ``SORT_KEY=created``'s value while the same
    name in data kept it, and "created" was then redacted in every later text, inside longer words too."""
    upper = name.upper()
    if _DATA_KEY_NAME.fullmatch(upper) is None:
        return False
    words = upper.rsplit("_", 2)
    return len(words) < 3 or _SECRET_ENV_NAME.search(words[0]) is None


# words joined by "-" or "." in a variable's name (``openai-api-key``, ``db.password``: set through ``env`` or a
# process's environment dict, not a shell) are words as joined by "_": ``my-api-key`` was never registered
_ENV_NAME_JOINERS = str.maketrans("-.", "__")


def _is_secret_env_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (its value is registered): by the environment's
    rule, or as a key of data would (``SENTRY_DSN``, ``PG_DSN``, ``OpenAIKey``: see :func:`_holder_secret_name`)."""
    name = name.translate(_ENV_NAME_JOINERS)
    return (_SECRET_ENV_NAME.search(name) is not None and not _names_data_key(name)) or _holder_secret_name(name)


# A name whose last word is KEY, PASS, PAT or AUTH after a word naming what the credential opens, in any case or
# joining (openai_key, anthropicKey, db_pass, DbPass, github-pat, npm_auth, sentry_dsn): a provider, a service or a
# store of data. Lower-case names otherwise keep the rule above: sort_key, cache_key, first_pass, proxy_pass
# (nginx's upstream URL) and key alone hold no secrets, and a `*_key` rule would learn their values.
_KEY_HOLDERS = frozenset((
    "openai", "azure", "anthropic", "claude", "gemini", "google", "vertex", "mistral", "groq", "cohere", "deepseek",
    "together", "perplexity", "pplx", "xai", "grok", "hf", "huggingface", "replicate", "fireworks", "openrouter",
    "nvidia", "ngc", "cerebras", "sambanova", "voyage", "jina", "deepl", "elevenlabs", "serper", "serpapi", "tavily",
    "exa", "brave", "bing", "pinecone", "weaviate", "qdrant", "wandb", "langsmith", "langfuse", "stripe", "twilio",
    "sendgrid", "mailgun", "github", "gh", "gitlab", "bitbucket", "slack", "discord", "telegram", "notion", "jira",
    "atlassian", "aws", "gcp", "watsonx", "supabase", "firebase", "cloudflare", "vercel", "heroku", "datadog",
    "sentry", "honeycomb", "session", "docker", "dockerhub", "npm", "pypi", "ado", "devops",
))
# ... and for a password, what logs in with one (db_pass, smtp_pass, admin_pass, RootPass)
_PASS_HOLDERS = _KEY_HOLDERS | frozenset((
    "db", "database", "mysql", "mariadb", "postgres", "postgresql", "pg", "psql", "redis", "mongo", "mongodb",
    "smtp", "imap", "pop", "pop3", "mail", "email", "ftp", "sftp", "ssh", "ldap", "admin", "root", "user", "login",
    "vault", "keystore", "truststore", "rabbitmq", "amqp", "kafka", "elastic", "neo4j", "oracle", "mssql", "sql",
    "wifi", "sudo", "account",
))
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# a data source name or a JSON Web Token, whatever is before it (dsn, pg_dsn, SENTRY_DSN, jwt, authJwt)
_WHOLE_CREDENTIAL_WORDS = frozenset(("dsn", "jwt", "passcode"))


def _holder_secret_name(name: str) -> bool:
    """Whether ``name`` is secret by :data:`_KEY_HOLDERS` / :data:`_PASS_HOLDERS` or ends with a word of
    :data:`_WHOLE_CREDENTIAL_WORDS`: its words read as an identifier's (``_``, ``-``, ``.``, blanks or
    camelCase), the holder being the one, two or three words before the last."""
    words = [word.lower() for word in _NAME_WORDS.findall(name[-64:])]  # the last words decide (a long name too)
    if not words:
        return False
    last = words[-1]
    if last in _WHOLE_CREDENTIAL_WORDS:
        return True
    # (pwd: MYSQL_PWD, db_pwd; alone, PWD is the shell's working directory)
    holders = _PASS_HOLDERS if last in ("pass", "pwd") else _KEY_HOLDERS if last in ("key", "pat", "auth") else None
    if holders is None:
        return False
    return any("".join(words[-1 - count:-1]) in holders for count in range(1, min(3, len(words) - 1) + 1))
_BLANKS = re.compile(r"[ \t]+")
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|sk_(?:live_|test_)?[A-Za-z0-9]{16,}|AIza[0-9A-Za-z_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"xox[abeprs]-[A-Za-z0-9\-]{10,}|(?i:bearer|basic)\s+[A-Za-z0-9._~+/\-]{8,}=*)"
)
# More providers' credential shapes (Groq, Hugging Face, xAI, Perplexity, AWS access key ids,
# JWTs, PEM private keys, GitLab, npm, PyPI, SendGrid, DigitalOcean, Stripe restricted keys,
# Slack app tokens). Each is tried only when its literal start is in the text: one alternation
# with them cost ~45 % more CPU on every string, as their first characters are common. Hints are
# grouped behind a gate, one search for "_" (or "-", "A") whose look-behinds hold the group's
# hints, so a text holding none is scanned once per group, not once per hint (17 hints scanned
# one by one cost +15 % per cache miss; the gates cost what the 9 scans of before did). Within a
# group the shapes run in the order of the flat tuple below.
_GATED_GROUPS: tuple[tuple[re.Pattern[str] | None, tuple[tuple[str, re.Pattern[str]], ...]], ...] = tuple(
    (re.compile(gate) if gate else None, tuple((hint, re.compile(pattern)) for hint, pattern in shapes))
    for gate, shapes in (
        (r"_(?<=[bfkmopr]_)(?:(?<=gsk_)|(?<=github_)|(?<=hf_)|(?<=npm_)|(?<=do[por]_)v1_|(?<=rk_)(?:live|test)_)", (
            ("gsk_", r"gsk_[A-Za-z0-9]{20,}"),
            ("github_pat_", r"github_pat_[A-Za-z0-9_]{20,}"),  # GitHub's fine-grained tokens
            ("hf_", r"hf_[A-Za-z0-9]{20,}"),
            ("npm_", r"npm_[A-Za-z0-9]{36,}"),
            ("_v1_", r"do[por]_v1_[a-f0-9]{64}"),  # DigitalOcean
            ("rk_", r"rk_(?:live|test)_[A-Za-z0-9]{16,}"),  # Stripe's restricted keys
        )),
        (r"-(?<=[a-z]-)(?:(?<=xai-)|(?<=pplx-)|(?<=gl[a-z]{2}-)|(?<=gl[a-z]{3}-)|(?<=gl[a-z]{4}-)|(?<=gl[a-z]{5}-)"
         r"|(?<=pypi-)AgE|(?<=xapp-))", (
            ("xai-", r"xai-[A-Za-z0-9]{20,}"),
            ("pplx-", r"pplx-[A-Za-z0-9]{20,}"),
            # GitLab: personal/project/group access, deploy, runner, CI job, trigger, feed... tokens
            ("gl", r"gl(?:pat|dt|rt|cbt|ptt|soat|ft|imt|agent|oas|wt)-[A-Za-z0-9_\-]{20,}"),
            ("pypi-AgE", r"pypi-AgE[A-Za-z0-9_\-]{50,}"),  # PyPI API tokens (macaroons)
            ("xapp-", r"xapp-\d-[A-Za-z0-9\-]{10,}"),  # Slack app-level tokens
        )),
        (r"A(?:KIA|SIA)", (
            ("AKIA", r"AKIA[0-9A-Z]{16}"),
            ("ASIA", r"ASIA[0-9A-Z]{16}"),
        )),
        (None, (
            # at a run's start (or after a space escaped as %20 or \u0020): from every "eyJ" inside one run of
            # these characters the first part was scanned to the run's end, "eyJ" * 33,000 took 1.8 s of CPU
            ("eyJ", r"(?:(?<![A-Za-z0-9_\-])|(?<=%20)|(?<=\\u0020))"
                    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
            # to the end of the text when the END line was cut off
            ("PRIVATE KEY-----",
             r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----(?s:.*?-----END [A-Z ]{0,40}PRIVATE KEY-----|.*)"),
            ("SG.", r"SG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"),  # SendGrid
        )),
    )
)
_GATED_SHAPES = tuple(shape for _gate, shapes in _GATED_GROUPS for shape in shapes)
# scheme://user:password@host, scheme://:password@host (Redis), and a password holding a raw "@" or
# "/" (scheme://u:p@ss/w0rd@host: up to the last "@" of the URL, the safe side) or a user name that is
# an e-mail address; "host:port/..." is not a password, and a password never runs into the next "://"
# (text made of "://a:" repeated took 70 ms per 64 KiB to search without that stop: 1 ms with it)
# A password of digits and one "/" part (u:2024/pw@host) is not a port: a port's path goes on
# without an "@" (host:443/users/me@x.org, host:4873/@scope/pkg, host:5432/db?mail=a@b.org stay).
_URL_CREDENTIALS = re.compile(r"://[^/\s:\"'<>]{0,256}:(?!\d{1,5}(?:[?#\s\"'<>]|$|/(?![^\s/\"'<>@?#]+@)))"
                              r"(?:[^\s\"'<>:]|:(?!//)){1,256}@")
# a token as a URL's whole user name (https://TOKEN@host: GitHub, Azure DevOps, Bitbucket clones)
_URL_TOKEN_USER = re.compile(r"://(?=[a-z_\-]*[0-9])(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{20,256}@", re.IGNORECASE)
# user:password@host written without a scheme (a DSN or a connection line): found at its ":"
# A password of letters alone counts when a port or a path follows the host (a DSN: an address
# does not go on with one)
_BARE_CREDENTIALS = re.compile(  # starts with its literal ":" (a fast scan), the user's end looked behind
    r":(?<=[A-Za-z0-9_.\-]:)(?P<pw>(?=[^\s:@/\"'<>]*[^A-Za-z\s:@/\"'<>])[^\s:@/\"'<>]{6,128}"
    r"|[A-Za-z]{6,128}(?=@[A-Za-z0-9][A-Za-z0-9\-]*(?:\.[A-Za-z0-9\-]+)*(?::\d{1,5}|/[A-Za-z0-9_]))"
    r")@(?=[A-Za-z0-9][A-Za-z0-9\-]*(?:\.[A-Za-z0-9\-]+)*(?::\d{1,5})?(?:[/\s\"'<>,;):]|$))")
# Oracle's user/password@service, after a word that takes one (sqlplus scott/tiger@orcl, CONNECT
# system/manager@//db:1521/pdb, userid=scott/tiger@orcl, cx_Oracle.connect("scott/tiger@orcl")):
# found at its "/" (a fast scan), the user and the word before it checked behind
_ORACLE_LOGIN = re.compile(r"/(?<=[A-Za-z0-9_$#]/)(?P<pw>[^\s/@\"'<>]{1,128})@(?=[A-Za-z0-9/(\[])")
_ORACLE_WORDS = ("sqlplus", "sqlldr", "rman", "expdp", "impdp", "exp", "imp", "dgmgrl", "connect", "conn", "userid",
                 "target", "auxiliary", "catalog")
_ORACLE_WORD_PARTS = ("sqlplus", "sqlldr", "rman", "exp", "imp", "dgmgrl", "conn", "userid", "target", "auxiliary",
                      "catalog")  # each word holds one of them
# "<word> <user>" (or "<word>=<user>", "<word>(<user>", "sqlplus -s <user>") matched backwards from the
# "/", on the text before it reversed: anchored, one short match per login (a search of the window
# before each "/" cost 367 ms on 64 KiB of "a/b@")
_ORACLE_USER_BEFORE = re.compile(
    r"[\w$#]{0,63}[A-Za-z][\"']?(?:\s*\(|\s*=\s*|(?:\s+[A-Za-z]+-)*\s+)"
    rf"(?:{'|'.join(sorted((w[::-1] for w in _ORACLE_WORDS), key=len, reverse=True))})(?![\w\-])", re.IGNORECASE)
_BARE_USER = re.compile(r"(?:^|(?<=[\s\"'=(\[,;]))[A-Za-z][A-Za-z0-9_.\-]{0,63}\Z")
_NOT_USERS = frozenset({"mailto", "sip", "sips", "tel", "xmpp", "im", "pres", "acct", "news", "urn", "geo", "sms",
                        "mid", "cid", "fax", "modem", "callto", "skype", "facetime", "imap", "pop",
                        # mail headers and the words of a line that quotes an address
                        "re", "fw", "fwd", "to", "cc", "bcc", "from", "contact", "email", "mail", "reply"})
# query parameters that are credentials only inside a URL: Azure Functions' ?code=, Google's ?key=,
# a presigned URL's X-Amz-Signature= (as key names, "code" and "key" are ordinary words: exit code=1)
_URL_QUERY_SECRETS = re.compile(r"(?P<name>[?&](?:amp;)?(?:code|key|[\w\-]*signature))=(?!\[REDACTED\])[^&#\s\"'<>]+",
                                re.IGNORECASE)
# webhook URLs whose path is the credential (Slack, Discord, Microsoft Teams)
_URL_PATH_SECRETS = re.compile(
    r"(?P<path>hooks\.slack\.com/(?:services|workflows|triggers)/|/api/webhooks/|/webhookb2/)[^\s\"'<>?#]+")
# \u00XX (JSON) and %XX (URL) escapes of characters keys are made of: "sk\u002dproj..." is a key
# and JSON's "\/" (PHP's json_encode and others escape every "/": a base64 key holds some)
_JSON_ESCAPED = re.compile(r"\\(?:u00([2-7][0-9A-Fa-f])|/)")
_URL_ESCAPED = re.compile(r"%([2-7][0-9A-Fa-f])")  # two patterns: each starts with a literal (fast scan)
# HTML's numeric character references (&#45; &#x2d;), which an HTML page or a templating escape writes, and its
# quotes' named ones (``{&quot;password&quot;: &quot;<v>&quot;}``: JSON in an HTML attribute or a template's output)
_HTML_ESCAPED = re.compile(r"&(?:#(?:[xX]0*([2-7][0-9A-Fa-f])|0*(3[2-9]|[4-9][0-9]|1[01][0-9]|12[0-6]))|(quot|apos));")
_HTML_QUOTES = {"quot": '"', "apos": "'"}
_PLAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+/=")
_MIN_SECRET_LEN = 6
MAX_LEARNED = 256

# Key/value text: a secret-looking word, the rest of the key name, an optional closing quote
# (JSON, escaped JSON, Python repr), ":" or "=", then a quoted or bare value. The words are
# found in the lower-cased text first (str.find: far cheaper than a case-insensitive pattern
# tried at every position), then matched in full there; the key name is checked with
# is_secret_key.
# "pat": the last word of github_pat, GITHUB_PAT (see _holder_secret_name), found apart (see _hint_starts); "dsn"
# and "jwt" are no hints in text (a pass more over every text each): a DSN's password is found by the URL rules and
# a JSON Web Token by its shape, whatever names them. A name may also be followed by "is", "was" or "to" in prose
# (``the password is <v>``, ``set the API key to <v>``): group ``verb``; a command line's option by blanks
# (``--api-key <v>``, ``--password '<v>'``): group ``flag``, taken after a name starting with "-" only
_KV_HINTS = ("key", "token", "secret", "pass", "pwd", "auth", "credential", "cookie", "sig")
_KV_AND_FOREIGN_HINTS = _KV_HINTS + _FOREIGN_HINTS
# ("password" in other languages: see _FOREIGN_HINTS)
_KV_KEY = re.compile(
    # (a name in a script written without blanks goes on to the next punctuation, not through the sentence's
    # next words: ``请使用以下密码登录数据库服务器: password=<v>`` read 密码登录数据库服务器 as the name, its
    # value "password=<v>")
    rf"""(?P<name>(?:(?:key|token|secret|pass|pwd|auth|credential|cookie|sig|pat)[\w.\-]*"""
    rf"""|(?:{_FOREIGN_NAMES})(?:[^\W{_UNSPACED}]|[.\-])*))"""
    r"""(?P<q>\\*["']?)"""
    # (``=>``: a PHP array's, a Ruby or Perl hash's pair, ``'password' => '<v>'``: "=" then ">" was no value)
    # (``->``, ``→`` after a blank: a Scala map's pair, ``"password" -> "<v>"``, a note's ``password -> <v>``; a
    # YAML anchor after ":" is no value, ``password: &pw <v>``)
    r"""(?:[ \t]*(?:(?P<arrow>=>)|(?P<pointer>(?<=[ \t"'])(?:->|\u2192))|=|:(?:[ \t]*&[\w.\-]{1,64}(?=[ \t]))?)"""
    # (a value wrapped as pydantic's secret, ``api_key=SecretStr("<v>")``: read as a call, code, and shown)
    r"""[ \t]*(?:Secret(?:Str|Bytes)\((?=\\*["']))?"""
    # an XML element's text (``<password><v></password>``, ``<apiKey><v></apiKey>``): checked to follow "<"; the
    # element may have attributes (``<password type="x">``) and be HTML-escaped (``&lt;password&gt;<v>&lt;/``)
    r"""|(?P<tag>(?:[ \t]+[\w:.\-]{1,64}=(?:"[^"<>\n]{0,256}"|'[^'<>\n]{0,256}'))*[ \t]*(?:>|&gt;)[ \t\r\n]*)"""
    r"""(?=[^\s<>&])"""
    # a Markdown table's row, ``| password | <v> |`` (the value is the cell's: see _kv_pairs)
    r"""|(?P<cell>[`*]{0,3}[ \t]*\|[ \t]*)(?=[^\s|])"""
    # a setter's last argument after strings before it (``keyring.set_password("svc", "user", "<v>")``,
    # ``user.set_password("<v>")``): checked to be named "set..." (see _kv_pairs)
    r"""|(?P<call>\([ \t]*(?:\\*["'][^"'\\\n]{0,128}\\*["'][ \t]*,[ \t]*){0,3})(?=\\*["'])"""
    # a secret's name given as data, its value in the field after it (checked to follow a name's field): a list of
    # environment variables (``{"name": "DB_PASSWORD", "value": "<v>"}``, Kubernetes' ``- name: DB_PASSWORD`` and
    # ``value: <v>`` on the next line), .NET's ``<add key="DbPassword" value="<v>"/>``, OTLP/JSON's
    # ``{"key": "password", "value": {"stringValue": "<v>"}}``
    r"""|(?P<named>[ \t]*,?[ \t]*(?:\r?\n[ \t]*)?\\*["']?value\\*["']?[ \t]*[:=][ \t]*"""
    r"""(?:\{[ \t]*\\*["'](?:stringValue|value)\\*["'][ \t]*:[ \t]*)?"""
    r"""|</key>\s*<string>)"""  # (a property list's: <key>API_KEY</key><string><v></string>)
    # a subscript's assignment (``os.environ["OPENAI_API_KEY"] = "<v>"``, ``headers['Authorization'] = '<v>'``) and
    # an environment setter's arguments (``os.environ.setdefault("API_KEY", "<v>")``, ``monkeypatch.setenv(...)``)
    r"""|(?P<subscript>(?<=["'])\][ \t]*=(?!=)[ \t]*)|(?P<argument>(?<=["'])[ \t]*,[ \t]*)"""
    # (``was changed to <v>``, ``has been reset to <v>``: read as "was" and a word of state, the value was shown)
    r"""|(?P<verb>[ \t]+(?:(?:is|was)(?:[ \t]+(?:now[ \t]+)?(?:set|changed|updated|reset)[ \t]+to|[ \t]+now)?"""
    r"""|has[ \t]+been[ \t]+(?:set|changed|updated|reset)[ \t]+to|(?:set[ \t]+|changed[ \t]+|updated[ \t]+)?to"""
    # (and "is" in Spanish and Portuguese, German, French, Italian, Swedish, Norwegian and Danish, Polish: ``la
    # contraseña es <v>``, ``das Passwort ist <v>``, ``le mot de passe est <v>``)
    r"""|es|ist|est|é|è|era|war|är|er|jest)"""
    r"""(?:[ \t]*:)?[ \t]+)"""
    # whose credential it is before ":" (``password for alice: <v>``, ``token for 'bob@x.org': <v>``): read as a name
    # in prose (a message's first word is not learned); before, neither a key nor a value: shown, there and later
    r"""|(?P<owner>[ \t]+(?:for|of)[ \t]+(?:the[ \t]+)?(?:user[ \t]+|account[ \t]+)?"""
    r"""(?:'[^\s']{1,128}'|"[^\s"]{1,128}"|[\w.@\-]{1,64})"""
    r"""[ \t]*:[ \t]*)"""
    r"""|(?P<flag>[ \t]+)(?![\s\-]))""",
    re.IGNORECASE,
)
# a value: quoted (by a quote and the backslashes before it: JSON escaped inside JSON), up to the same
# quote on the same line, or bare (see _kv_value)
_VALUE_QUOTE = re.compile(r"""\\*["']""")
_KV_BARE = re.compile(r"""(?:(?:bearer|basic|token)[ \t]+)?[^\s"'\\,;&}\])\[{<>]+""", re.IGNORECASE)
# a quote or backslashes inside a bare value, then more of it (password=ab"cd, JSON-escaped ab\"cd, ab\cd):
# the value goes on (a backslash ended it, and what came after it was shown)
_KV_BARE_MORE = re.compile(r"""(?:\\*["']|\\+)[^\s"'\\,;&}\])\[{<>]+""")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_NAME_RUN = re.compile(r"[\w.\-]*")  # how far _KV_KEY's key name can reach from a hint
# the longest name _SECRET_KEY_NAME takes only whole (auth, pass, pwd, sig): a name inside a longer one
# judged not secret (its suffix, after a non-ASCII letter) can be secret only as one of them
_SHORT_NAME_MAX = 4
_ASCII_LOWER = {ord(c): ord(c.lower()) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}

_lock = threading.RLock()
reset_in_child(sys.modules[__name__], "_lock")
_known: dict[str, None] = {}  # registered secrets, in registration order (see _rebuild)
_learned: OrderedDict[str, None] = OrderedDict()
_known_pattern: re.Pattern[str] | _Patterns | None = None
secrets_version = 0
"""Changes whenever what redaction does changes (a secret registered, learned or forgotten, a split
secret's piece learned): results cached with an older version may let a secret through."""
_secret_with_comma = False


def max_length() -> int:
    """The attribute length bound: ``CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH`` or 4096."""
    return int(environment_variables.get(environment_variables.MAX_ATTRIBUTE_LENGTH))


_max_len = max_length()
_logger = logging.getLogger("cmbagent_otel.redaction")


def attribute_bound() -> int:
    """The attribute length bound as :func:`truncate` uses it: read at import, by ``instrument()`` and by
    :func:`reload_settings` (:func:`max_length` reads the environment again)."""
    return _max_len


def reload_settings() -> None:
    """Re-read the length bound and secret-looking environment variables."""
    global _max_len
    _max_len = max_length()
    _register_environment()


def register_new_environment() -> None:
    """Register secret-looking environment variables set or changed since the last look (one
    dict comparison when none was): an application may set one after :func:`instrument` (a
    ``.env`` file loaded late, a key asked for at run time) and the code or tool it runs may
    print it. Called before a code execution's output or a tool's result is recorded. Never raises."""
    try:  # not contextlib.suppress (as in register_sent_credentials): every tool call and code run
        data = getattr(os.environ, "_data", None)  # the live mapping behind os.environ (CPython)
        if data is None or data != _environment_seen:
            _register_environment()
    except Exception:
        return


_environment_seen: dict[Any, Any] = {}


def _register_environment() -> None:
    global _environment_seen
    data = getattr(os.environ, "_data", None)
    _environment_seen = dict(data) if isinstance(data, dict) else {}
    for name, value in os.environ.items():
        secret_name = _is_secret_env_name(name)
        if secret_name and not _holds_no_secret(name, value):  # SMTP_AUTH=CRAM-MD5: a method's name
            register_secret(value)
        if "://" in value and ("@" in value or secret_name) and not (secret_name and _holds_no_secret(name, value)):
            # a URL's password, whatever the variable's name (DATABASE_URL, MONGODB_URI, CELERY_BROKER_URL): see
            # _learnable (postgres://postgres:postgres@db would redact "postgres" everywhere); under a secret's name
            # too, with its query's tokens: SENTRY_DSN=https://<key>@o1.ingest.sentry.io/1 registered the whole URL
            # only, and a text quoting the key alone showed it
            for secret in environment_variables.url_credentials(value, is_secret_key):
                if _learnable(secret, value):
                    register_secret(secret)
    # the credentials inside the exporters' configuration (OTLP headers, URL passwords and tokens)
    for value in environment_variables.configured_credentials(is_secret_key):
        register_secret(value)


def _scan_bound() -> int:
    """How much of one string :func:`scrub` and :func:`safe_text` read: well past every bound
    their output is cut to, so the cut never shows, while a 50 MB message costs what 64 KiB do
    on every span it appears in (its tail never reaches telemetry)."""
    return max(_SCAN_MIN, 16 * _max_len)


_SCAN_MIN = 1 << 16


def truncate(value: str | None, limit: int | None = None) -> str | None:
    """Cut ``value`` to the attribute bound, marking the cut with ``...[truncated]``."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    bound = limit or _max_len
    if len(value) <= bound:
        return value
    return value[: max(bound - 14, 0)] + "...[truncated]"


def _trie_pattern(words: list[str]) -> str:
    """One regex alternation shaped as a trie: each position is tried against the first
    characters once, not against every secret (hundreds of learned values stay cheap), and
    the longest secret wins where one is a prefix of another."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = []
        for ch, child in sorted(node.items()):
            if not ch:
                continue
            run = [ch]
            while len(child) == 1 and "" not in child:  # a chain without branches: one literal
                ((next_ch, child),) = child.items()
                run.append(next_ch)
            branches.append(re.escape("".join(run)) + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def _compile(values: Iterable[str]) -> re.Pattern[str]:
    try:
        return re.compile(_trie_pattern(sorted(values)))
    except (RecursionError, re.error):  # secrets nested as prefixes hundreds deep: plain alternation
        return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))


class _Patterns:
    """Many secrets as several patterns, each match replaced as by one alternation of them all
    (overlapping matches of two patterns are joined: neither secret shows a part)."""

    __slots__ = ("patterns",)

    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        self.patterns = patterns

    def search(self, text: str) -> re.Match[str] | None:
        """The first pattern's first match in ``text`` (whether any secret is there), or ``None``."""
        for pattern in self.patterns:
            found = pattern.search(text)
            if found is not None:
                return found
        return None

    def sub(self, repl: str, text: str) -> str:
        spans = [m.span() for pattern in self.patterns for m in pattern.finditer(text)]
        if not spans:
            return text
        return _replaced(text, spans, repl)


def _replaced(text: str, spans: list[tuple[int, int]], repl: str) -> str:
    """``text`` with each of ``spans`` (not empty; overlapping ones merged) replaced by ``repl``."""
    spans.sort()
    out, last, (start, end) = [], 0, spans[0]
    for s, e in spans[1:]:
        if s < end:
            end = max(end, e)
            continue
        out += (text[last:start], repl)
        last, start, end = end, s, e
    out += (text[last:start], repl, text[end:])
    return "".join(out)


_CHUNK = 128
# Compiled groups of secrets, by their words (see _rebuild): a group whose words did not change is not compiled again
_chunks: dict[tuple[str, ...], re.Pattern[str]] = {}
# Registered secrets laid out for _rebuild: full chunks (each secret's encoded forms follow it in
# _known) as (words, their pattern once compiled, number of secrets), two of the same size merged
# up to _SEALED_MAX secrets, and the secrets after them, each as its words. Laid out for one
# _known dict (the tests put a copy in its place: laid out afresh) and extended as it grows.
_sealed: list[tuple[tuple[str, ...], re.Pattern[str] | None, int]] = []
_open: list[tuple[str, ...]] = []
_layout_of: dict[str, None] | None = None
_layout_len = 0
_known_comma = False  # a registered secret holds a comma (registered ones are never forgotten)
# Each pattern is one more search of every text redacted (~13 us per 2 KB text when its secrets start
# with varied characters): 40 chunks at 5,000 keys made a text 1.4x as costly to redact as one
# pattern. Full chunks are merged, two of a size, up to this many secrets (compiled once per size).
_SEALED_MAX = 8 * _CHUNK
# The secrets after the full chunks, when not one pattern: a settled group of a multiple of this
# many (compiled again every _RECENT new secrets) and the recent ones (compiled with each new one)
_RECENT = 16


def _lay_out() -> None:
    """Extend _sealed and _open with the secrets registered since the last call."""
    global _layout_of, _layout_len, _sealed, _open, _known_comma
    if _layout_of is not _known or _layout_len > len(_known):
        _layout_of, _layout_len, _sealed, _open, _known_comma = _known, 0, [], [], False
    forms = _forms
    for value in itertools.islice(_known, _layout_len, None):
        if "," in value:
            _known_comma = True
        if value in forms and _open:  # an encoded form of the secret before it
            _open[-1] += (value,)
            continue
        if len(_open) == _CHUNK:
            _sealed.append((tuple(word for secret in _open for word in secret), None, _CHUNK))
            _open = []
            while len(_sealed) > 1 and _sealed[-1][2] == _sealed[-2][2] and 2 * _sealed[-1][2] <= _SEALED_MAX:
                (first, _, size), (second, _, _) = _sealed[-2:]
                _sealed[-2:] = [(first + second, None, 2 * size)]
        _open.append((value,))
    _layout_len = len(_known)


def _rebuild() -> None:
    """Compile the known secrets again. An application's keys (up to _ENCODED_MAX registered: those
    with encoded forms) and the values it learned (up to _CHUNK secrets in all): one pattern,
    compiled again with each new secret, since every pattern is one more search of every text
    redacted. Past that (a service registering each request's API key) a new secret compiles a
    few, not all of them (registering each of 1000 keys once compiled all of them: 23 s of CPU for
    the last 500 and 200 MiB of re's cache; then all of the first 128 and past them their last
    chunk of up to 128: 25 s for 5,000 keys): registered ones in full chunks of _CHUNK secrets, compiled once, two of
    the same size merged up to _SEALED_MAX secrets, then the secrets after them as a settled group
    (a multiple of _RECENT secrets) and the recent ones; the learned ones as one group."""
    global _known_pattern, _secret_with_comma, _chunks, secrets_version, _sealed
    secrets_version += 1
    _lay_out()
    learned = tuple(v for v in _learned if v not in _known)
    _secret_with_comma = _known_comma or any("," in v for v in learned)
    groups: list[tuple[str, ...]] = []
    if not _sealed and len(_open) <= _ENCODED_MAX and len(_open) + len(learned) <= _CHUNK:
        words = tuple(word for secret in _open for word in secret) + learned
        if words:
            groups.append(words)
    else:
        settled = len(_open) - len(_open) % _RECENT
        for part in (_open[:settled], _open[settled:]):
            if part:
                groups.append(tuple(word for secret in part for word in secret))
        if learned:
            groups.append(learned)
    chunks = {group: _chunks.get(group) or _compile(group) for group in groups}
    if _sealed and _sealed[-1][1] is None:  # chunks filled or merged since: compiled once, then kept
        _sealed = [(words, pattern or _chunks.get(words) or _compile(words), count)
                   for words, pattern, count in _sealed]
    _chunks = chunks
    patterns = tuple(pattern for _, pattern, _ in _sealed if pattern is not None) + tuple(chunks.values())
    _known_pattern = (patterns[0] if len(patterns) == 1 else _Patterns(patterns)) if patterns else None


def is_registered(value: str) -> bool:
    """Whether ``value`` is a registered secret (no lock: a set lookup)."""
    return value in _known


def register_secret(value: Any) -> None:
    """Never let ``value`` appear in telemetry (spans, logs, DB rows).

    Like a learned value, a value longer than the part of a text redaction reads (64 KiB, or 16
    times the attribute bound) is not registered: it could never be found whole (it is redacted
    under its secret-named key; a warning gives its length). Its encoded forms (hex, base64,
    base32: ~15 times its length) are kept for values of up to 4,096 characters (a PEM private
    key, a service account's JSON), for the first 32 registered."""
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LEN:
        return
    if len(value) > _scan_bound():
        # a 1 MB value cost 51 s of CPU and 2.9 GB to register (its encoded forms compiled), for a
        # secret no text is read far enough to find
        _logger.warning("cmbagent_otel: a secret of %d characters is not registered: no more of a text than "
                        "%d characters is searched for secrets, so it could never be found whole", len(value),
                        _scan_bound())
        return
    with _lock:
        if value in _known:
            return
        _known[value] = None
        _learned.pop(value, None)
        _note_length(value)
        _heads.setdefault(value[:_MIN_SECRET_LEN], []).append(value)
        _tails.setdefault(value[-_MIN_SECRET_LEN:], []).append(value)
        global _encoded_count
        # an application's few keys, not a service's per-user ones; not documents
        if _encoded_count < _ENCODED_MAX and len(value) <= _ENCODED_REGISTERED_MAX:
            _encoded_count += 1
            for form in _encoded_forms(value):
                if form not in _known:
                    _known[form] = None
                    _forms.add(form)
        for form in () if value.isascii() else _renderings(value, len(value) <= _ENCODED_REGISTERED_MAX):
            if form not in _known:
                _known[form] = None
                _forms.add(form)
        _rebuild()


def secret_text(raw: bytes) -> str:
    """A secret given as bytes (pydantic's ``SecretBytes``, a header value or password given as bytes, a
    Basic token's ``user:password``) as text to register or learn: bytes that are not UTF-8 are kept as
    lone surrogates, as Python keeps an environment value's, so that every rendering of those bytes is
    redacted (see :func:`_renderings`). Decoded with U+FFFD instead, only that one text was registered,
    and the bytes' hex and base64 forms, their Latin-1 decoding (what a server quoting them shows) and
    their ``\\xNN`` escapes reached telemetry whole."""
    return raw.decode("utf-8", "surrogateescape")


def _renderings(value: str, encoded: bool = True) -> set[str]:
    """The texts a secret holding lone surrogates (an environment value whose bytes are not UTF-8, as
    Python keeps them) is seen as once rendered: escaped as telemetry escapes it (``\\xNN``), as JSON
    escapes it (``\\udcNN``), decoded again with U+FFFD for its bad bytes (a subprocess's output) or as
    Latin-1; and its hex and base64 forms are those of its bytes. Each let the secret through whole,
    as only the surrogate form was registered. ``encoded``: with the hex and base64 forms."""
    try:
        value.encode("utf-8")
        return set()
    except UnicodeEncodeError:
        pass
    forms = {encodable(value), value.encode("utf-8", "backslashreplace").decode("utf-8")}
    with contextlib.suppress(UnicodeEncodeError):
        raw = value.encode("utf-8", "surrogateescape")
        forms.update((raw.decode("utf-8", "replace"), raw.decode("latin-1")))
        if encoded:
            forms.update(_encoded_forms_of(raw))  # few: Python makes such a value only of OS bytes
    forms.discard(value)
    return forms


# each registered secret with its encoded forms is ~9 patterns' worth: a service registering
# each request's key would make patterns 9 times larger
_ENCODED_MAX = 32
# The longest registered secret whose encoded forms are kept (see _ENCODED_VALUE_MAX for learned
# ones): a PEM private key or a service account's JSON keeps them; a 64 KiB value's would be 1 M
# characters compiled again with each of the next registered secrets
_ENCODED_REGISTERED_MAX = 4096
_encoded_count = 0
_forms: set[str] = set()  # the encoded forms in _known: chunks (see _rebuild) count secrets, not forms
_B64_URLSAFE = str.maketrans("+/", "-_")
_MIN_ENCODED_LEN = 8  # a shorter base64 core could stand in ordinary text by chance


def _encoded_forms(value: str) -> set[str]:
    """Hex (both cases), base64 (standard and URL-safe) and base32 forms of a registered secret, so that
    a key an application hex-dumps, or base64-encodes alone or inside a larger blob (a
    ``user:key`` header, an encoded JSON config), is caught too. Inside a blob the secret's
    first byte may sit at any of three offsets of a 3-byte group (five of a 5-byte group in
    base32): for each, the characters its bytes alone determine (not those shared with the bytes
    around it)."""
    forms = _encoded_forms_of(value.encode("utf-8", "surrogatepass"))
    forms.discard(value)
    return forms


def _encoded_forms_of(raw: bytes) -> set[str]:
    """The forms :func:`_encoded_forms` describes, of the bytes ``raw``."""
    forms = {raw.hex(), raw.hex().upper()}
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode("ascii").rstrip("=")
        core = encoded[(0, 2, 3)[offset]:len(encoded) - (1 if (offset + len(raw)) % 3 else 0)]
        if len(core) >= _MIN_ENCODED_LEN:
            forms.update((core, core.translate(_B64_URLSAFE)))
    bits = 8 * len(raw)
    for offset in range(5):  # base32 (RFC 4648, as written: upper case): 5-byte groups of 8 characters
        encoded = base64.b32encode(bytes(offset) + raw).decode("ascii")
        core = encoded[-(-8 * offset // 5):(8 * offset + bits) // 5]
        if len(core) >= _MIN_ENCODED_LEN:
            forms.add(core)
    return forms


def learn_secret(value: Any) -> bool:
    """Redact ``value`` from now on: a value found under a secret-named key in data.

    Unlike :func:`register_secret` (configuration: kept for the process's life), learned
    values are bounded: the :data:`MAX_LEARNED` most recently seen forms are kept, 128 Ki characters
    of them (the newest value's kept whole); a value longer than the part of a text redaction reads
    (64 KiB, or 16 times the attribute bound) is not learned. The JSON-escaped form is learned too,
    so the value is caught inside serialised JSON, and the encoded forms of the 16 most recently
    learned values of up to 1,024 characters (hex, base64, base32) are looked for in tool results
    and code output (:func:`learn_encoded_in`).
    Returns whether the set of secrets changed.
    """
    next(_learn_calls)  # see learn_secrets_in: a text that never gets here holds nothing to learn
    return _learn(value, True)


def _learn(value: Any, encoded: bool) -> bool:
    """:func:`learn_secret`; ``encoded``: keep the value's encoded forms (a form found is learned without)."""
    global _learned_forms_pattern
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LEN or REDACTED in value:
        return False
    if len(value) > _scan_bound():
        # never found whole: no more of any text than this is read. A 1 MB password in a model's tool
        # arguments cost 4.8 s to learn, 3 s again with each later secret, and its encoded forms 46 s
        # and 2.7 GB to compile, for nothing (it is redacted under its key, where it was found)
        return False
    short = len(value) <= _ENCODED_VALUE_MAX
    forms = {value, json.dumps(value, ensure_ascii=False)[1:-1]}
    if not value.isascii():
        forms |= _renderings(value, short)  # bytes that are not UTF-8: see register_secret
    with _lock:
        for form in forms & _learned.keys():
            _learned.move_to_end(form)
        if value in _learned_forms:
            _learned_forms.move_to_end(value)
        new = [form for form in forms if form not in _known and form not in _learned]
        if not new:
            return False
        for form in new:
            _learned[form] = None
        while len(_learned) > MAX_LEARNED:
            _learned.popitem(last=False)
        chars = sum(map(len, _learned))
        while len(_learned) > len(new) and chars > _LEARNED_CHARS_MAX:
            chars -= len(_learned.popitem(last=False)[0])
        if encoded and short and value not in _known and value not in _learned_forms:
            _learned_forms[value] = tuple(_encoded_forms(value))
            while len(_learned_forms) > _LEARNED_ENCODED_MAX:
                _learned_forms.popitem(last=False)
            _learned_forms_pattern = None
        _rebuild()
        return True


# The characters of the learned forms kept (the oldest forgotten past it, the newest value's kept whole):
# they are compiled again with every new secret (~3 s per MB), so values of tens of kilobytes from a
# model's tool arguments made every later learning or registration cost seconds
_LEARNED_CHARS_MAX = 1 << 17
# The longest learned value whose encoded forms are kept (~20 times its length: hex, base64 and
# base32 at each offset): passwords and tokens, not documents
_ENCODED_VALUE_MAX = 1024

# The encoded forms (see _encoded_forms) of the most recently learned values: a password from a
# tool's arguments that the tool or the code hex-dumps or base64-encodes. Not in _known_pattern:
# their first characters are as varied as base64's, and 16 values' forms made every redaction of
# a cache miss ~2x slower (400 words: 104 -> 213 us); they are looked for where an application
# encodes (tool results, code output), and a form found there is learned as it stands.
_LEARNED_ENCODED_MAX = 16
_learned_forms: OrderedDict[str, tuple[str, ...]] = OrderedDict()
_learned_forms_pattern: re.Pattern[str] | None = None


def learn_encoded_in(text: Any) -> None:
    """Learn the encoded forms of recently learned secrets found in ``text`` (a tool's result, a
    code execution's output), so that they are redacted there and wherever they are quoted
    later. ``text`` may be a message: the strings of dicts, lists and tuples are looked at (a
    model's reply quoting a password it was given). One check when nothing was learned; never
    raises."""
    if not _learned_forms:
        return
    if type(text) is not str:
        with contextlib.suppress(Exception):
            for item in _strings_in(text, 0):
                learn_encoded_in(item)
        return
    with contextlib.suppress(Exception):
        global _learned_forms_pattern
        pattern = _learned_forms_pattern
        if pattern is None:
            with _lock:
                forms = {form for values in _learned_forms.values() for form in values}
                pattern = _learned_forms_pattern = _compile(forms) if forms else re.compile(r"(?!)")
        bound = _scan_bound()
        for found in set(pattern.findall(text if len(text) <= bound else text[:bound])):
            _learn(found, False)


def _strings_in(value: Any, depth: int) -> Iterable[str]:
    if type(value) is str:
        yield value
    elif depth < 8 and isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item, depth + 1)
    elif depth < 8 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings_in(item, depth + 1)


def register_secrets_in(value: Any) -> None:
    """Register every secret found in a configuration object (never raises).

    Walks dicts, lists and pydantic models (AG2's ``LLMConfig`` and its config entries):
    values under secret-named keys at any depth (``api_key``, ``azure_ad_token``,
    ``default_headers["Authorization"]``, ``X-Api-Key``...), ``Bearer`` header values, and
    every pydantic ``SecretStr``. AG2 0.14 strips ``api_key`` from
    ``OpenAIWrapper._config_list``, so the agent's ``llm_config`` is where keys are found.
    """
    try:  # telemetry must never break the app (not contextlib.suppress: every new agent's config)
        _register_walk(value, 0, False, register_secret)
    except Exception:
        return


def register_request_credentials(exc: BaseException) -> None:
    """Register the credentials the HTTP request of a failed call carried, before its error is recorded
    (never raises). A model server's error may quote them (``Incorrect API key provided: <key>``), and
    some are registered nowhere else: a token an ``azure_ad_token_provider`` returned, what an httpx
    ``auth=`` object put in the headers (a Basic password, a custom scheme's token), a key the client
    read from the environment after :func:`instrument`. Read from the ``request`` (``httpx.Request``)
    that ``openai``'s and httpx's errors keep, on the exception and its causes: the header values by
    the rule of the exporters' configuration (:func:`environment_variables.headers_credentials`) by
    name or scheme only, not by looking like a token (a ``traceparent`` or an idempotency key is new
    on every request; a proxy header's credential is the config walk's), and the URL's credentials.
    Only instance attributes are read (no property of the app's exception runs)."""
    with contextlib.suppress(Exception):
        for _ in range(8):
            fields = getattr(exc, "__dict__", None)
            request = (fields.get("request") or fields.get("_request")) if type(fields) is dict else None
            if request is not None:
                headers, url = getattr(request, "headers", None), getattr(request, "url", None)
                # the headers that carry a credential by name or scheme (not the token-looking rule: a
                # request's traceparent or request id would be registered anew on every failure)
                found = environment_variables.headers_credentials(headers, is_secret_key, token_like=False) \
                    if isinstance(headers, Mapping) else []
                if url is not None:
                    found += environment_variables.url_credentials(str(url), is_secret_key)
                for value in found:
                    _register_request_value(value)
            cause = exc.__cause__ or exc.__context__
            if cause is None or cause is exc:
                return
            exc = cause


# The credential header values of successful requests looked at lately (each once while it is among the
# last _SENT_MAX: a token is sent with every request of its hour).
_sent_seen: dict[Any, None] = {}
_SENT_MAX = 64
# How many credentials read from requests (sent, or carried by a failed one) were registered for good. A
# value that is new on every request (a signing auth's signature) or every hour (an azure_ad_token_provider's
# token) would grow the registry for ever in a process that runs for days, each registration emptying the
# memos; such a value is good for its own request (or hour) alone. Past the first _SENT_MAX they are
# learned (learn_secret: the most recent MAX_LEARNED kept): the newest are always redacted.
_request_registered = 0


def _register_request_value(value: str) -> None:
    """Register a credential a request carried, or learn it once :data:`_SENT_MAX` were registered."""
    global _request_registered
    if not value or value in _known:
        return
    if _request_registered < _SENT_MAX:
        _request_registered += 1
        register_secret(value)
    else:
        _learn(value, False)


_SENT_HEADERS = (b"authorization", b"api-key")
# httpx's Headers keep (raw name, lower-case name, value) byte triples in ``_list``: read in C (its
# ``get`` cost ~250 bytecodes per name for a request of 17 headers); another layout is read by ``get``
_HEADER_NAME, _HEADER_VALUE = operator.itemgetter(1), operator.itemgetter(2)


def register_sent_credentials(response: Any) -> None:
    """Register the credentials a successful HTTP request carried (never raises), from the
    ``httpx.Response`` the ``openai`` client is about to parse: the request it keeps has the headers as
    sent, after the client's ``azure_ad_token_provider`` and the HTTP client's ``auth=`` set them (neither
    keeps what it computed). A server's answer may quote them. Only ``Authorization`` and ``api-key`` are
    read, each value once (:data:`_sent_seen`), by the rule of :func:`register_request_credentials`; the
    provider is never called by us."""
    try:  # not contextlib.suppress: its two Python calls were a third of the call's cost
        fields = getattr(response, "__dict__", None)
        request = fields.get("_request") if type(fields) is dict else None  # no property of httpx's runs
        headers = getattr(request, "headers", None)
        if headers is None:
            return
        triples = getattr(headers, "_list", None)
        if type(triples) is list:
            values = dict(zip(map(_HEADER_NAME, triples), map(_HEADER_VALUE, triples), strict=True))
        else:
            values = {name: headers.get(name.decode()) for name in _SENT_HEADERS}
        for name in _SENT_HEADERS:
            value = values.get(name)
            if value is None or value in _sent_seen:
                continue
            if len(_sent_seen) >= _SENT_MAX:
                with contextlib.suppress(Exception):  # another thread may evict it first
                    _sent_seen.pop(next(iter(_sent_seen)), None)  # the oldest: looked at again if it comes back
            _sent_seen[value] = None
            text = secret_text(value) if type(value) is bytes else value
            if type(text) is not str:
                continue
            for secret in environment_variables.header_credentials(name.decode(), text, is_secret_key,
                                                                   token_like=False):
                _register_request_value(secret)
    except Exception:
        return


class SentBytes(str):
    """The base64 text of a bytes value an ingest client sent (OTLP ``bytesValue``), text so it can
    be stored in a JSON column. Its bytes are what hold a secret: :func:`scrub` redacts them as the
    text they decode to (UTF-8) and returns that text (what a reader of the row sees: a workflow's or
    an agent's name sent as bytes is its name, a redacted value shows ``[REDACTED]``), and a
    secret-named key's bytes are learned as that text; bytes that are no text (not UTF-8, or holding
    control characters other than tab and line ends) are redacted as their base64 (where the encoded
    forms of registered secrets are looked for) and stay base64."""

    __slots__ = ()


def _sent(value: SentBytes) -> str | bytes:
    """What ``value``'s bytes are: their UTF-8 text, or the bytes (no UTF-8, or UTF-16 / UTF-32 text: see
    :func:`_wide_text`; or ``value`` itself, no base64)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error
        return str(value)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    if "\x00" in text and _wide_text(raw) is not None:
        return raw  # UTF-16 or UTF-32 text of ASCII letters is UTF-8 too, its NULs the wide encoding's
    return text


# characters that make decoded bytes binary data rather than text (and that a PostgreSQL text or JSONB value
# refuses: NUL), as a reader would not want them in a column
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _wide_text(raw: bytes) -> tuple[str, str] | None:
    """(the text, its encoding) of bytes that are no UTF-8 but text in another encoding an ingest client may send,
    else ``None``: UTF-32 and UTF-16 with a byte order mark (Windows tools and .NET write text so), without one
    (.NET's ``Encoding.Unicode.GetBytes``, Java's ``UTF_16LE``: text whose every other byte is NUL), and Latin-1
    (a Windows or ISO-8859-1 program's text: letters past ASCII that are no UTF-8). Such bytes were stored as the
    base64 of the bytes sent, a key or ``password=...`` in them readable by anyone who decodes it (the encoded
    forms looked for are those of UTF-8 bytes), and a secret-named key's bytes were learned as bytes. Text is what
    holds no control character but tab and line ends; anything else stays binary."""
    if raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        candidates: tuple[str, ...] = ("utf-32",)
    elif raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        candidates = ("utf-16",)
    else:
        candidates = ()
        quarter = len(raw) // 4
        if len(raw) >= 8 and len(raw) % 4 == 0:
            # code points under U+10000: two NUL bytes of every four (at the end: little-endian)
            if raw[2::4].count(0) == quarter and raw[3::4].count(0) == quarter:
                candidates = ("utf-32-le",)
            elif raw[0::4].count(0) == quarter and raw[1::4].count(0) == quarter:
                candidates = ("utf-32-be",)
        if not candidates and len(raw) >= 4 and len(raw) % 2 == 0:
            half, low, high = len(raw) // 2, raw[1::2].count(0), raw[0::2].count(0)
            if low * 2 >= half and high == 0:
                candidates = ("utf-16-le",)  # mostly ASCII or Latin-1 letters: their high byte is NUL
            elif high * 2 >= half and low == 0:
                candidates = ("utf-16-be",)
            elif low != high:
                # fewer ASCII characters (blanks, digits, a key) among letters of another script, whose high byte is
                # no NUL (Cyrillic 04, Greek 03, CJK 4E-9F): one script's text only (see _one_script)
                candidates = ("utf-16-le/script",) if low > high else ("utf-16-be/script",)
        candidates += ("latin-1",)
        if not raw.count(0) and len(raw) >= 16 and len(raw) % 2 == 0:
            # no ASCII character at all (CJK without blanks), 8 characters or more: after Latin-1, which such bytes are
            # as often; the order whose high bytes vary less first (Cyrillic's are all 04; read the other way round,
            # it is CJK). 16 random bytes are read so 0.3 % of the time (Latin-1: 1 %): as sent, as nothing is secret
            swapped = len(set(raw[0::2])) < len(set(raw[1::2]))
            candidates += ("utf-16-be/script", "utf-16-le/script") if swapped else \
                ("utf-16-le/script", "utf-16-be/script")
    for candidate in candidates:
        encoding, _, script = candidate.partition("/")
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if text and _CONTROL_CHARS.search(text) is None and (encoding != "latin-1" or _C1_CHARS.search(text) is None) \
                and (not script or _one_script(text) or _scripts_with_a_word(text)):
            return text, encoding
    return None


# Text in one script besides ASCII, Latin letters and the punctuation scripts share (general, CJK and fullwidth
# forms): what UTF-16 without a byte order mark is read as when most of its characters' high bytes are no NUL. Bytes
# that are no such text (binary data, Latin-1 text read two bytes at a time: "Bush hid the facts" reads as CJK,
# but mixed with Hangul, private use or symbols in most texts) match none and stay bytes
_SCRIPTS = tuple(re.compile(rf"[\t\n\r\x20-\x7e\u00a0-\u024f\u2000-\u206f\u3000-\u303f\uff00-\uffef{letters}]+")
                 for letters in (
                     "\u0370-\u03ff\u1f00-\u1fff",  # Greek
                     "\u0400-\u052f",  # Cyrillic
                     "\u0530-\u058f", "\u0590-\u05ff", "\u0600-\u06ff\u0750-\u077f",  # Armenian, Hebrew, Arabic
                     "\u0900-\u097f", "\u0980-\u09ff", "\u0b80-\u0bff", "\u0e00-\u0e7f", "\u10a0-\u10ff",
                     "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",  # Chinese, Japanese
                     "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",  # Korean
                 ))


def _one_script(text: str) -> bool:
    """Whether ``text`` is written in one of :data:`_SCRIPTS`."""
    return any(script.fullmatch(text) is not None for script in _SCRIPTS)


# Text mixing the scripts of _SCRIPTS (a Russian message quoting a Chinese one, Japanese with Cyrillic names) was
# stored as sent, a ``password=<v>`` in it readable by decoding the base64. Taken when it holds an ASCII word of 3
# letters (a key's name, ``api_key``, a command): bytes that are no text read so only where 6 bytes in a row are
# letters each beside a NUL (about 1 in 10^10 for random bytes), binary data and Latin-1 text as before
_ANY_SCRIPT = re.compile("[" + "".join(script.pattern[1:-2] for script in _SCRIPTS) + "]+")
_ASCII_WORD = re.compile(r"[A-Za-z]{3}")


def _scripts_with_a_word(text: str) -> bool:
    """Whether ``text`` is written in the scripts of :data:`_SCRIPTS`, mixed, and holds an ASCII word."""
    return _ASCII_WORD.search(text) is not None and _ANY_SCRIPT.fullmatch(text) is not None


# C1 control characters: bytes 0x80-0x9F decoded as Latin-1 are control characters, no text's letters (binary data)
_C1_CHARS = re.compile(r"[\x80-\x9f]")


def _scrub_sent(value: SentBytes) -> str:
    """:func:`scrub` of an ingest client's bytes: their text redacted, or the base64 of bytes that are no
    text (see :class:`SentBytes`); text in another encoding (UTF-16, UTF-32, Latin-1: see :func:`_wide_text`) is
    redacted as text and stays base64 (of the redacted text, in the same encoding; as sent when nothing is secret)."""
    text = _sent(value)
    if not isinstance(text, str):
        wide = _wide_text(text)
        if wide is not None:
            clean = _scrub_string(wide[0])
            if clean != wide[0]:
                return base64.b64encode(clean.encode(wide[1], "replace")).decode("ascii")
        return _scrub_string(str(value))
    clean = _scrub_string(text)
    if _CONTROL_CHARS.search(text) is None:
        return clean
    return str(value) if clean == text else base64.b64encode(clean.encode("utf-8")).decode("ascii")


def learn_secrets_in(value: Any) -> None:
    """Learn (:func:`learn_secret`) every secret found in data, e.g. a tool call's arguments.

    Like :func:`register_secrets_in`, and also looks inside strings: a JSON object or array
    written as a string (tool arguments arrive that way, sometimes JSON nested in JSON) is
    parsed and walked, and ``key: value`` text is scanned. Never raises.
    """
    try:  # not contextlib.suppress: every tool call
        if type(value) is not str or len(value) > _CLEAN_TEXT_MAX_LEN:
            _register_walk(value, 0, False, learn_secret)
            return
        if value in _clean_texts:
            return  # walked before and found nothing: what it finds depends on the text alone
        before = next(_learn_calls)
        _register_walk(value, 0, False, learn_secret)
        if next(_learn_calls) == before + 1:  # nothing offered to learn_secret (any thread): nothing to learn
            if len(_clean_texts) >= _CLEAN_TEXTS_MAX:
                _clean_texts.clear()  # a bound, not a cache policy
            _clean_texts[value] = None
    except Exception:
        return


# Texts (tool arguments, mostly) whose walk offered nothing to learn_secret: the same text again
# (a tool called with the same arguments) is not parsed and scanned again. Bounded in count and size.
# next() on a count is one atomic step (a global `+= 1` from two threads can lose an increment, and
# a lost one could make a text that offered a secret look clean)
_learn_calls = itertools.count()
_clean_texts: dict[str, None] = {}
_CLEAN_TEXTS_MAX = 512
_CLEAN_TEXT_MAX_LEN = 4096

_MAX_JSON_TEXT = 1 << 20  # longer strings are scanned as text, not parsed
_SCALARS = frozenset({bool, int, float})  # never secrets, never containers
_BUILTIN_DATA = frozenset({str, dict, list, tuple})  # exact types (a subclass may add get_secret_value)


# per class: whether its instances can have ``get_secret_value`` / ``config_list`` (see _probes)
_PROBES: dict[type, tuple[bool, bool]] = {}
_ANY = (True, True)


def _probes(cls: type) -> tuple[bool, bool]:
    """(probe ``get_secret_value``, probe ``config_list``) on instances of ``cls``, decided once per class.

    A pydantic model answers a missing attribute through two ``__getattr__`` (the model's, then its
    metaclass's) and two formatted exceptions: microseconds per probe, on every new agent's config.
    Its class tells whether either name can be there (a field, or a class attribute; its extras are
    walked apart). AG2's ``LLMConfig`` forwards every read to such a model, which has ``config_list``
    and no ``get_secret_value``. Anything else is probed.
    """
    found = _ANY
    with contextlib.suppress(Exception):
        mro = cls.__mro__
        fields = getattr(cls, "__pydantic_fields__", None)
        if isinstance(fields, dict):
            found = (any("get_secret_value" in vars(k) for k in mro),
                     "config_list" in fields or any("config_list" in vars(k) for k in mro))
        elif cls.__name__ == "LLMConfig" and cls.__module__.endswith(".llm_config.config") \
                and not any("get_secret_value" in vars(k) for k in mro):
            found = (False, True)
    if len(_PROBES) >= 1024:
        _PROBES.clear()  # classes of one process: a bound, not a cache policy
    _PROBES[cls] = found
    return found


def _register_walk(value: Any, depth: int, secret: bool, register: Any) -> None:
    if value is None or depth > 20:
        return
    cls = type(value)
    if cls is SentBytes:  # an ingest client's bytes: what they hold, not their base64
        value = _sent(value)
        if type(value) is bytes:
            wide = _wide_text(value)
            value = wide[0] if wide is not None else value
        cls = type(value)
    if cls not in _BUILTIN_DATA:  # those have no get_secret_value (no attribute can be set on them)
        if isinstance(value, (bool, int, float)):
            return
        probes = _PROBES.get(cls) or _probes(cls)
        reveal = getattr(value, "get_secret_value", None) if probes[0] else None
        if callable(reveal):  # pydantic SecretStr / SecretBytes
            revealed = reveal()
            if isinstance(revealed, bytes):
                revealed = secret_text(revealed)
            _register_value(revealed, register)
            return
    if isinstance(value, (bytes, bytearray)):  # a key given as bytes (a header value httpx takes as it is)
        if secret:
            _register_value(secret_text(bytes(value)), register)
        return
    if isinstance(value, str):
        if secret:
            _register_value(value, register)
        elif register is learn_secret:
            _learn_text(value, depth)
        return
    if isinstance(value, dict):
        pair = "value" in value and not secret and _names_a_secret(value)
        for key, item in value.items():
            if item is None or type(item) in _SCALARS:
                continue  # what the call would return at once for (config objects are mostly these)
            named = not secret and ((pair and key == "value") or (
                is_secret_key(str(key)) and not _holds_no_secret(str(key), item)))
            _register_walk(item, depth + 1, secret or named, register)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _register_walk(item, depth + 1, secret, register)
        return
    config_list = getattr(value, "config_list", None) if probes[1] else None  # LLMConfig
    if isinstance(config_list, (list, tuple)):
        _register_walk(config_list, depth + 1, secret, register)
    fields = getattr(type(value), "model_fields", None)  # pydantic v2 model
    if isinstance(fields, dict):
        for name in fields:
            item = getattr(value, name, None)
            if item is None or type(item) in _SCALARS:
                continue
            _register_walk(item, depth + 1, secret or is_secret_key(name), register)
        extra = getattr(value, "__pydantic_extra__", None)
        if isinstance(extra, dict):
            _register_walk(extra, depth + 1, secret, register)
    elif config_list is None:
        _walk_object(value, depth, secret, register)


_OBJECT_ATTRIBUTES = 64  # attributes of one plain object looked at (an HTTP client holds many)


def _walk_object(value: Any, depth: int, secret: bool, register: Any) -> None:
    """A dataclass or plain object in a configuration (``credentials=Creds(api_key=...)``, a key
    holder whose ``str()`` is the key): its secret-named attributes, and under a secret-named key
    its ``str()`` (when its class defines one) and every attribute. Other attributes are not
    followed (an HTTP client's connection pool is no configuration)."""
    with contextlib.suppress(Exception):  # a hostile object stops its own walk, not the rest
        cls = type(value)
        if isinstance(value, (type, bytes, bytearray)) or callable(value) or cls.__module__ == "builtins":
            return
        if secret and cls.__str__ is not object.__str__:
            _register_value(str(value), register)
        fields = getattr(value, "__dataclass_fields__", None)
        names = list(fields) if isinstance(fields, dict) else list(getattr(value, "__dict__", None) or ())
        for name in names[:_OBJECT_ATTRIBUTES]:
            if not isinstance(name, str):
                continue
            named = is_secret_key(name)
            if secret or named or isinstance(fields, dict):
                item = getattr(value, name, None)
                if item is not None and type(item) not in _SCALARS:
                    _register_walk(item, depth + 1, secret or named, register)


def _learn_text(text: str, depth: int) -> None:
    """Learn the secrets in a string that is JSON (parsed and walked) or key/value text."""
    stripped = text.strip()
    if len(stripped) <= _MAX_JSON_TEXT and stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, (dict, list)):
            _register_walk(parsed, depth + 1, False, learn_secret)
            return
    # as redact reads it: escaped, folded, form-encoded, encoded (content capture off, tool arguments are only learned
    # from: base64 of ``password=<v>``, then ``my+password+is+<v>``, taught nothing, and the tool's error quoting <v>
    # showed it)
    _redact_with(_known_pattern, text)


def _names_a_secret(value: Mapping[Any, Any]) -> bool:
    """Whether the dict ``value`` (holding a "value") is a name/value pair naming a secret: a list of environment
    variables (``{"name": "DB_PASSWORD", "value": <v>}``: Kubernetes, ECS, a CI's API), OTLP/JSON's attribute
    (``{"key": "password", "value": {"stringValue": <v>}}``). Each key alone names no secret, and the value was
    recorded and never learned."""
    with contextlib.suppress(Exception):  # (a mapping of the application's whose lookups raise: no pair)
        for field in ("name", "key"):
            name = value.get(field)
            if type(name) is str and is_secret_key(name) and not _holds_no_secret(name, value["value"]):
                return True
    return False


def _register_value(value: Any, register: Any) -> None:
    if not isinstance(value, str):
        return
    if register is learn_secret and _STATE_WORD.fullmatch(value.strip()) is not None:
        return  # {"token": "expired"}: a word of state, never learned (see _kv_pairs)
    register(value)
    scheme, _, token = value.strip().partition(" ")
    if token and scheme.lower() in ("bearer", "basic", "token"):
        register(token.strip())
    _register_login_password(value, register)


# a secret-named key's value that is a login, ``user:password`` (``PROXY_AUTH=bob:<v>``, npm's ``_auth``, a Basic
# token's text): only the whole was learned, and a later text quoting the password alone showed it
_USER_PASSWORD = re.compile(r"[A-Za-z][\w.@\-]{0,63}:(?P<pw>[^\s:/][^\s:]{5,})")


def _register_login_password(value: str, register: Any) -> None:
    """Register (or learn) the password of a secret-named key's ``user:password`` value too, when it cannot be a
    word or an identifier (a digit, an inner capital or a symbol): a namespaced name (``TENANT_VARIABLE_KEY =
    "a2a:tenant"``, ``"ns:extra_parts"``) has the same shape, and "tenant" was learned at the first try."""
    found = _USER_PASSWORD.fullmatch(value.strip())
    if found is None:
        return
    password = found.group("pw")
    if (_RANDOM_LOOKING.search(password) is not None or _IDENTIFIER.fullmatch(password.replace("-", "_")) is None) \
            and not _is_reference(password):
        register(password)


# A Python class's name, as a traceback's last line or a logged error prints an exception's type before its
# message: an exception's (``NoCredentialsError``, ``PasswordSetError``), or a class's qualified by its
# lower-case module path (``tests.test_secrets.UpstreamRejected``). Taken for a secret-named key, the first
# word of the message was learned as a secret and so redacted in every later text ("Unable", "Failed",
# "upstream"); it is still redacted where it stands (a message may start with what its type names)
_EXCEPTION_NAME = re.compile(r"(?:[a-z_][a-z0-9_]*\.)*[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*(?:Error|Exception|Warning)")
_QUALIFIED_CLASS = re.compile(r"(?:[a-z_][a-z0-9_]*\.)+[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*")


# more words after a value on its line: the value is a message's first word ("Unable to locate credentials")
_MESSAGE_GOES_ON = re.compile(r"[,;:.!?]?[ \t]+\S")
# an ordinary word, letters only, capitalised at most or all in capitals, its parts joined by a hyphen or an
# apostrophe ("Unable", "Failed", "connection", "ECONNRESET", "time-out", "can't"): what a message starts with.
# A value with a digit, an inner capital or another symbol (hunter2, s3cr3t!, GitHubPat) is learned even at a
# message's start: a credential written in a sentence is still one
_PLAIN_WORD = re.compile(r"(?:[A-Za-z][a-z]*|[A-Z]+)(?:['-](?:[A-Za-z][a-z]*|[A-Z]+))*")
# what ends a sentence or a clause after a bare value (``my password: <v>.``, ``read token: <v>: EOF``): the value is
# learned without it too, or a later text quoting the value alone showed it (only ``<v>.`` was learned)
_SENTENCE_END = ".!?:"
# a word stating what a credential is or became, not the credential (``token: expired``, ``[auth] token: expired
# session``, ``the password is incorrect``): never learned after a name in prose, where it is a message's word
_STATE_WORD = re.compile(
    r"(?i:expired|revoked|rejected|refused|denied|required|missing|invalid|incorrect|wrong|created|updated|changed|"
    r"rotated|refreshed|renewed|issued|generated|deleted|removed|disabled|enabled|accepted|verified|validated|"
    r"unverified|malformed|corrupted|corrupt|pending|loading|unknown|provided|configured|undefined|unset|hidden|"
    r"masked|redacted|stored|saved|cached|encrypted|decrypted|truncated|omitted|absent|present|active|inactive|"
    r"unavailable|mismatch|mismatched|locked|unlocked|blocked|suspended|compromised|leaked|exposed|valid|empty|"
    r"needed|supplied|specified|ignored|skipped|unchanged|outdated|stale|blank|unauthorized|forbidden|timeout|"
    r"checked|found|received|sent|reset|none|null|"
    # ... and what a value is like, as a message or a form's hint says (api key: optional (leave blank))
    r"optional|default|example|placeholder|dummy|sample|unused|public|private|shared|temporary|permanent|global|"
    r"local|unique|random|secure|insecure|weak|strong|correct|same|different|visible|shown)")
# after a value in prose, what sets it apart from the rest of the sentence (``set password: <v> for now``,
# ``INFO token: <v> for user bob``, ``<v> (temporary)``): the value is one, not a message's first word, which a
# verb or a noun follows (``connection refused``, ``permission denied``, ``please wait``)
# ... or what tells to keep it (``your token: <v> keep it safe``, ``password: <v>, do not share it``): in ~5,000 files
# of ordinary text (bench/learned_corpus.py --prose --system) a name in prose was followed by an ordinary word and more
# words 63 times (changelogs' ``cert auth: filter out ...``, ``private keys: these are ...``), never so
_VALUE_ASIDE = re.compile(r",?[ \t]+(?:(?:for|until|till|as|and|or|but|so|then|now|today|tomorrow|instead)\b"
                          r"|[(\-\u2013\u2014])"
                          r"|[,.;!]?[ \t]+(?:please[ \t]+)?(?:keep|store|save|guard|protect|hide|remember)[ \t]+"
                          r"(?:it|this|that|them)\b"
                          r"|[,.;!]?[ \t]+(?:please[ \t]+)?(?:never|don't|do[ \t]+not)[ \t]+"
                          r"(?:share|commit|post|give|show|paste|lose|tell|reveal|forget)\b", re.IGNORECASE)
# a line that tells of a failure: a name's value in it is a message (``error: read token: connection refused``)
_FAILURE_WORDS = re.compile(
    r"(?i:\b(?:error|errors|err|fail|failed|failure|failing|fatal|panic|exception|warn|warning|cannot|can't|"
    r"couldn't|could[ \t]+not|unable|invalid|denied|refused|rejected|missing|expired|timeout|timed[ \t]+out|"
    r"retrying|not|no)\b)")
# names that, written alone before "is" / "to" in a sentence, are as often ordinary words
_NOT_NAMES_IN_PROSE = frozenset(("secret", "secrets", "pwd", "pass", "sig", "auth"))
# a command line's option that names where a secret is kept or how it is given, not the secret (``--password-stdin``,
# ``--api-key-file``, ``--token-env``): the argument after it is a path or a name
_NOT_A_SECRET_OPTION = re.compile(r"[_\-.](?:stdin|file|path|env|dir|cmd|command|helper|name|id|type)\Z", re.IGNORECASE)
# A command line's option whose value is a credential: its name's last word (split at "-", "_", ".") names one
# (``--password``, ``--api-key``, ``--auth-token``, ``--client-secret``, ``-pass``). Session 41 took any
# secret-looking option name: ``--secret-scanning enabled`` and mysql's ``-psecretword database`` (a password
# attached to ``-p``, then the database) learned "enabled" / "database", then redacted in every later text, inside
# longer words too; ``--max-token 4096`` hid a count. A word of counting before it names a number, not a secret
_OPTION_CREDENTIAL_WORDS = frozenset((
    "token", "secret", "password", "passwd", "pass", "pwd", "passphrase", "passcode", "credential", "credentials",
    "cookie", "apikey", "pat", "jwt", "dsn", "sig"))
_OPTION_COUNT_WORDS = frozenset(("max", "min", "num", "count", "limit", "size", "length", "len", "budget", "ttl",
                                 "expiry", "lifetime", "timeout", "per"))
_OPTION_WORDS = re.compile(r"[A-Za-z0-9]+")
# what follows ``--key`` (``key`` alone is no secret's name: ``sort --key 2,2n``, ``openssl -key server.key``,
# ``cache --key build``): a credential only when it looks like one (a letter and a digit, no path or file name)
_KEY_OPTION_VALUE = re.compile(r"(?=[^\s/\\]*[0-9])(?=[^\s/\\]*[A-Za-z])(?![^\s/\\]*\.[A-Za-z]{1,4}\Z)[^\s/\\,]{6,}")
# an option's value that is a "name=value" specification (``docker build --secret id=npmrc,src=...``), not a secret
_OPTION_SPEC = re.compile(r"[a-z]+=[^=]")
# a reference to a secret, not a secret: a shell or PowerShell variable (``$OPENAI_TOKEN``, ``${DB_PASS}``,
# ``$env:API_KEY``), a Windows one (``%API_KEY%``), a template's (``{{ secrets.TOKEN }}``, ``${{ secrets.X }}``,
# ``{password}``, ``%(password)s``, ``<password>``) or a mask (``*****``, ``xxxxxx``). Learned, "$OPENAI_TOKEN" was
# redacted in every later text that names the variable (the variable's value is registered by the environment's
# rule, whatever a text calls it)
_REFERENCE = re.compile(
    r"\$(?:[A-Z_][A-Z0-9_]*|[a-z_][a-z0-9_]*|env:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})"
    r"|\$?\{\{[^{}\n]{1,128}\}\}|\{[A-Za-z_][A-Za-z0-9_.]*\}|%\(?[A-Za-z_][A-Za-z0-9_]*(?:%|\)s)|<[A-Za-z_][\w .\-]*>"
    r"|(?P<mask>[*xX#.\u2022])(?P=mask){2,}")


# a bare value that is code: an identifier, dotted at most (self.api_key, config.api_key, API_KEY, SecretStr)
_IDENTIFIER = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")
# a type's name (``password: string`` in TypeScript, ``token VARCHAR(64)``, ``api_key: str``): learned, "string" was
# redacted inside "substring"
_TYPE_NAMES = frozenset(("str", "string", "bytes", "int", "integer", "bool", "boolean", "number", "float", "double",
                         "object", "any", "unknown", "char", "varchar", "text", "binary", "blob", "uuid", "secretstr",
                         "secretbytes"))
# an authentication scheme's name alone (``Authorization: Bearer`` with its token cut off or elsewhere)
_AUTH_SCHEMES = frozenset(("bearer", "basic", "token", "digest", "negotiate", "ntlm", "apikey"))


def _names_code(text: str, value: str, value_end: int) -> bool:
    """Whether the bare ``value`` of a secret-named key is code or a word naming where the secret comes from, not
    the secret: a call (``api_key=os.environ.get("OPENAI_API_KEY")``, ``token=GenerateToken(...)``), a type or an
    index (``token: Optional[str]``, ``secret: Annotated[str, ...]``, ``key=os.environ["X"]``), a variable named as a
    secret (``password=password``, ``api_key=self.api_key``, argparse's ``--api-key API_KEY``, ``api_key:
    SecretStr``), a type's (``password: string``), a provider's name (``api_key: OpenAI API key`` in a docstring or a
    help text) or an authentication scheme alone (none with a digit: a literal). Code a model writes is full of
    them: learned, "password", "api_key", "Optional", "OpenAI" were redacted in every later text, inside longer words
    too (``OPENAI_API_KEY`` shown as ``OPENAI_[REDACTED]``)."""
    if "(" in value or (value_end < len(text) and text[value_end] == "["):
        return True
    core = value.rstrip(_SENTENCE_END + ",?") or value
    if _IDENTIFIER.fullmatch(core) is None or _DIGIT.search(core) is not None:
        return False  # a value with a digit is a literal (InvalidApiKeyError: Vq8apikey40)
    lower = core.lower()
    return is_secret_key(core.rpartition(".")[2]) or lower in _KEY_HOLDERS or lower in _AUTH_SCHEMES \
        or lower in _TYPE_NAMES


def _is_call_argument(text: str, name_start: int, value_end: int) -> bool:
    """Whether the pair at ``name_start`` ending at ``value_end`` is a keyword argument of a call: after ``(`` or
    ``,`` and before ``,`` or ``)``, inside a parenthesis opened before it (within 256 characters: a call's arguments
    may run over lines)."""
    head = text[max(0, name_start - 256):name_start].rstrip()
    if not head or head[-1] not in "(," or head.count("(") <= head.count(")"):
        return False
    tail = text[value_end:value_end + 64].lstrip(" \t")
    return tail[:1] in (",", ")")


# A code constant named ``*_KEY`` with no word of a credential (``TEXT_KEY = "content"``, ``MIME_TYPE_KEY =
# "mimeType"``, ``CONTEXT_UPDATE_METADATA_KEY = "ag2.context_update"``, ``TENANT_VARIABLE_KEY = "a2a:tenant"``): the
# name of a key into data, taken for an environment variable's (see _ENV_STYLE_SECRET_NAME); its value, a word or an
# identifier's path, was learned, and "content" was redacted in every later text (8 of the 44 values the corpus
# taught). Replaced where it stands, not learned; a value that looks random (a digit among letters in a part longer
# than a namespace's 4 characters) still is
_CONSTANT_KEY_NAME = re.compile(r"(?:[A-Z][A-Z0-9]*_)+KEYS?")
_CREDENTIAL_WORD = re.compile(r"(?:^|_)(?:PASS|PAT|AUTH|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE|API|ACCESS)_")
# (a part with a digit is a namespace's short one, a2a, ag2, v1; else a word, camelCase at most: one way to match
# each part, or a failing match tried both ways per part, exponential: "ab.ab....ab!" of 18 parts took 67 ms at the
# first try)
_IDENTIFIER_PART = r"(?:(?=[a-z]*[0-9])[a-z0-9]{1,4}|[A-Za-z][a-z_]*(?:[A-Z][a-z_]*)*)"
_IDENTIFIER_PATH = re.compile(rf"{_IDENTIFIER_PART}(?:[.:/\-]{_IDENTIFIER_PART})*")


# a namespace's short name with a digit opening an identifier (``a2ui_operations``, ``a2uiClientCapabilities``): the
# rest is matched on its own, one way (see _IDENTIFIER_PART)
_NAMESPACE_HEAD = re.compile(r"[a-z]{0,3}[0-9][a-z0-9]{0,3}_?(?=[A-Za-z])")


def _names_a_constant(name: str, value: str) -> bool:
    """Whether ``value`` under ``name`` is a code constant's: see :data:`_CONSTANT_KEY_NAME`."""
    if _CONSTANT_KEY_NAME.fullmatch(name) is None or _CREDENTIAL_WORD.search(name) is not None \
            or _holder_secret_name(name) or _SECRET_KEY_NAME.match(name) is not None:
        return False
    if _IDENTIFIER_PATH.fullmatch(value) is not None:
        return True
    head = _NAMESPACE_HEAD.match(value)
    return head is not None and head.end() <= 5 and _IDENTIFIER_PATH.fullmatch(value, head.end()) is not None


# What the corpus of ordinary sources and READMEs (bench/learned_corpus.py --prose) still taught after session 43, 27
# values, each code or a documentation's example under a secret's name, never a secret (a learned value is redacted in
# every later text, inside longer words too). Replaced where they stand, not learned:
# a Python annotation's class (``auth: AuthTypes | None = None``, ``auth: AuthBlock = field(...)``, ``sig:
# inspect.Signature, ...``) or a quoted one (``api_key: "str | Variable | None"``)
# (its first lower-case letter matched one way: "A" + "a" * 30000 + "_" failed in 4 s at the first try)
_CLASS_NAME = re.compile(r"(?:[a-z_][a-z0-9_]*\.)*_*[A-Z][A-Z0-9]*[a-z][A-Za-z0-9]*")
_ANNOTATION_GOES_ON = re.compile(r"[ \t]*(?:\|[ \t]*[A-Za-z_]|=(?!=))")
_TYPE_UNION = re.compile(r"[A-Za-z_][\w.]*(?:\[[\w., ]*\])?(?:[ \t]*\|[ \t]*[A-Za-z_][\w.]*(?:\[[\w., ]*\])?)+")
# a tuple's unpacking (``mode, credential = configuration``, ``username, password = request.url.username, ...``)
_TUPLE_TARGETS = re.compile(r"[ \t]*(?:[A-Za-z_][\w.]*[ \t]*,[ \t]*)+\Z")
# an attribute of an object (``self._auth``, ``state.token_provider is None``)
_OWN_ATTRIBUTE = re.compile(r"(?:self|cls)\.[A-Za-z_][\w.]*")
_EXPRESSION_GOES_ON = re.compile(r"[ \t]+(?:is|in|and|or|not)\b|[ \t]*[=!<>]=")
# an f-string's or a bytes literal's piece (``{"Authorization": f"token {self.token}"}``: the bare value ``f"token``)
_STRING_PREFIX = re.compile(r"[fFbBrRuU]{1,2}[\"']")
# a constant's name as a value (``{MIME_TYPE_KEY: A2UI_MIME_TYPE}``): two words at least, in capitals
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")
# a documentation's example naming what it stands for (``"dummy_auth_token"``, ``OPENAI_API_KEY="My API Key"``,
# ``password="a secret"``) or a provider's name before it (``api_key: Daytona API key.``, a docstring)
_EXAMPLE_WORDS = frozenset(("key", "token", "secret", "password", "passwd", "auth", "credential", "credentials",
                            "apikey", "passphrase"))
_AUTH_SCHEME_PREFIX = re.compile(r"(?i:bearer|basic|token)[ \t]+")  # (Authorization: Token <v>: the scheme's)
_NAMES_THE_KEY_AFTER = re.compile(r"[ \t]+(?:API[ \t]+)?(?:key|token|secret|password|credentials?)\b", re.IGNORECASE)


def _is_code_or_example(text: str, key: re.Match[str], value: str, quoted: bool, value_end: int,
                        name_start: int) -> bool:
    """Whether the value of a secret-named key is code or a documentation's example (see :data:`_CLASS_NAME` and
    the rules after it), judged only when it is about to be learned."""
    if value[:1] == "=":
        return True  # tiktoken==0.2.0, detect-secrets==1.5.0: a version pin
    head = value.rstrip(".\u2026")
    if head != value and len(head) <= 8 and _DIGIT.search(head) is None and (quoted or head[-1:] in "-_"):
        return True  # api_key="sk-...", github_token="ghp_...": a key's prefix (hunter2x... keeps its digit)
    words = _NAME_WORDS.findall(_AUTH_SCHEME_PREFIX.sub("", value, count=1))
    if _DIGIT.search(value) is None and _EXAMPLE_WORDS.intersection(word.lower() for word in words):
        return True
    if quoted:
        return _TYPE_UNION.fullmatch(value) is not None
    if _STRING_PREFIX.match(value) is not None or _OWN_ATTRIBUTE.fullmatch(value) is not None or (
            _CONSTANT_NAME.fullmatch(value) is not None
            and sum(part.isalpha() and len(part) > 2 for part in value.split("_")) > 1):
        return True
    if _PLAIN_WORD.fullmatch(value) is not None and _NAMES_THE_KEY_AFTER.match(text, value_end) is not None:
        return True
    if _IDENTIFIER.fullmatch(value) is None:
        return False
    if _CLASS_NAME.fullmatch(value) is not None and (
            _ANNOTATION_GOES_ON.match(text, value_end) is not None or ("." in value and "=" not in key.group(0))):
        return True
    if _EXPRESSION_GOES_ON.match(text, value_end) is not None and "." in value:
        return True
    separator = key.group(0)[len(key.group("name")):]
    line_start = _line_start_near(text, name_start)[0]
    return "=" in separator and _TUPLE_TARGETS.fullmatch(text, line_start, name_start) is not None


# A name for what is said of a credential or where it is kept, not the credential (``api_key_env_var = config``,
# ``api_key_ids: Return only usage for these keys``, ``api_key_header: APIKeyHeader = security``, ``_AUTHORIZATION =
# "authorization"``): a word or an identifier under it (or the name's own word) was learned, and "config",
# "security", "Return" were redacted in every later text (the corpus count). Replaced where it stands, not learned;
# a value with a digit still is
_NAMES_WHAT_IS_NO_SECRET = frozenset((
    "stdin", "file", "files", "path", "paths", "env", "var", "vars", "dir", "cmd", "command", "helper", "name", "names",
    "id", "ids", "type", "types", "header", "headers", "url", "urls", "uri", "endpoint", "prefix", "provider", "source",
    "field", "param", "arg"))


# ``variable: Type =`` before a class's name: a Python annotation, the name the type's (``api_key_query: APIKeyQuery =
# security`` learned "security")
_ANNOTATED = re.compile(r"[A-Za-z_]\w*:[ \t]*\Z")


def _names_what_is_no_secret(name: str, value: str, before: str = "") -> bool:
    """Whether ``value`` under ``name`` is no secret by the name (see :data:`_NAMES_WHAT_IS_NO_SECRET`), or is the
    name's own word, or ``name`` is a class's annotating a variable (``before``: the text before it on its line)."""
    if value.lower() == name.strip("_").lower():
        return True
    if _DIGIT.search(value) is not None or _IDENTIFIER_PATH.fullmatch(value) is None:
        return False  # (a value with a digit is a literal: ``Error: Password = hunter2x`` is learned)
    if name[:1].isupper() and not name.isupper() and _ANNOTATED.search(before) is not None:
        return True
    words = _NAME_WORDS.findall(name[-32:])  # its last word (api_key_env_var, apiKeyHeader)
    return len(words) > 1 and words[-1].lower() in _NAMES_WHAT_IS_NO_SECRET


# an absolute path (POSIX, home-relative, Windows): what the shell's PWD holds
_ABSOLUTE_PATH = re.compile(r"(?:~|/|[A-Za-z]:(?:\\{1,2}|/))[^\s\x00]*")


def _is_working_directory(name: str, value: Any) -> bool:
    """Whether ``value`` under the key ``name`` is the shell's working directory: ``PWD`` / ``pwd`` alone holding an
    absolute path (``env`` or ``os.environ`` printed by code, ``pwd: /work/project``). Read as a password (ODBC's
    ``UID=sa;PWD=<it>``), the path was learned and then redacted in every later text that names a file under it."""
    return name.strip().lower() == "pwd" and isinstance(value, str) and _ABSOLUTE_PATH.fullmatch(value) is not None


# what a name ending in AUTH holds when it names how one authenticates, not with what (SMTP_AUTH=CRAM-MD5,
# HTTP_AUTH=basic, MONGO_AUTH=SCRAM-SHA-256, db_auth: scram-sha-256, PROXY_AUTH=ntlm, NGINX_AUTH=off): learned, the
# method's name was redacted in every later text ("the server asks for scram-sha-256")
_AUTH_METHOD = re.compile(
    r"(?i:(?:scram|hmac)-sha-?\d+(?:-plus)?|(?:cram|digest)-md5|md5|plain|login|trust|peer|ident|reject|password|"
    r"gssapi|kerberos|krb5|sspi|ntlm|negotiate|x509|cert|oauth2?|oauthbearer|xoauth2|sasl|external|anonymous|ldap|"
    r"radius|pam|iam|basic|bearer|digest|token|api[-_]?key|jwt|mtls|tls|none|on|off|yes|no|true|false|enabled|"
    r"disabled|required|optional"
    r"|\d+(?:\.\d+)+)")  # an object identifier (ssl's SERVER_AUTH = '1.3.6.1.5.5.7.3.1': an X.509 key usage)


def _holds_no_secret(name: str, value: Any) -> bool:
    """Whether ``value`` under the secret-looking name ``name`` is known to hold no secret: the shell's working
    directory (:func:`_is_working_directory`) or an authentication method's name under a name ending in AUTH
    (:data:`_AUTH_METHOD`). Neither is learned, registered from the environment or replaced."""
    if _is_working_directory(name, value):
        return True
    return isinstance(value, str) and name.rstrip()[-4:].lower() == "auth" \
        and _AUTH_METHOD.fullmatch(value.strip()) is not None


def _is_reference(value: str) -> bool:
    """Whether ``value`` (a secret-named key's, an option's or a URL's password) is a reference to a secret or a
    mask (see :data:`_REFERENCE`), ended by a sentence's end at most."""
    return _REFERENCE.fullmatch(value.rstrip(_SENTENCE_END) or value) is not None


def _option_takes_secret(name: str) -> str | None:
    """What the command line option ``name`` (starting with "-") takes: ``"secret"`` (a credential by its last
    word, see :data:`_OPTION_CREDENTIAL_WORDS`), ``"key"`` (``--key``: a credential only when its value looks like
    one) or ``None`` (its argument is no secret: ``--secret-scanning``, ``--max-token``, ``--api-key-file``)."""
    words = [word.lower() for word in _OPTION_WORDS.findall(name[-64:])]
    if not words or _OPTION_COUNT_WORDS.intersection(words) or _NOT_A_SECRET_OPTION.search(name) is not None:
        return None
    last = words[-1]
    if last == "key":
        return "secret" if len(words) > 1 and is_secret_key(name.lstrip("-")) else "key" if len(words) == 1 else None
    if last in _OPTION_CREDENTIAL_WORDS or (len(words) > 1 and last == "auth" and words[-2] != "no"):
        return "secret"
    return None
# a line of key/value pairs written with ": " (``user: bob password: <v> host: db``): a bare name after one is a key,
# not a name in prose
_PAIRS_BEFORE = re.compile(r"[ \t]*(?:[\w.\-]+:[ \t]+[^\s:]+[ \t]+)+")
_PAIR_AFTER = re.compile(r"[ \t]*(?:$|\n|\r|[\w.\-]+:(?:[ \t]|$))")


def _is_class_name(name: str) -> bool:
    """Whether ``name``, a secret-looking key name in a text, is a Python class's (see _EXCEPTION_NAME); a
    qualified one only when its class name alone is no secret's (``app.config.Password`` stays a key)."""
    if _EXCEPTION_NAME.fullmatch(name):
        return True
    return _QUALIFIED_CLASS.fullmatch(name) is not None and not is_secret_key(name.rpartition(".")[2])


def _word_before(text: str, at: int) -> int:
    """Where the word before the blanks before ``at`` starts (on the same line), -1 when there is none."""
    end = at
    while end > 0 and text[end - 1] in " \t" and at - end < 8:
        end -= 1
    if end == at or end == 0 or not (text[end - 1] in _NAME_CHARS or text[end - 1].isalnum()):
        return -1
    start = end  # (a word of any script: "Забыли пароль: нажмите здесь" read no word before the name)
    while start > 0 and (text[start - 1] in _NAME_CHARS or text[start - 1].isalnum()) and end - start < 64:
        start -= 1
    return start


# Where a quoted key can open: the start of a line, or after what opens or separates data's entries (a dict, a
# list, a call's arguments, JSON or YAML) or a key/value pair's ":" / "="; other text before the opening quote
# makes the quoted name a label in prose (see _is_quoted_label)
_KEY_OPENERS = frozenset("{[(,;:=\n")
_LABEL_LOOKBACK = 256  # how far back a quoted key's opening quote is looked for (a span name is cut to 100)


def _is_quoted_label(text: str, name_start: int, quote: str) -> bool:
    """Whether the secret-looking key name at ``name_start``, closed by ``quote``, is a quoted label in
    prose rather than a key of data: its opening quote follows a word (``span 'int password': Failed to
    parse``, the ingest's log of a rejected span; ``attribute "token": not a string``), not the start of a
    line or an entry of a dict, list, JSON or YAML (``{'api_key': ...}``, ``, "token": ...``). A label's
    value is redacted where it stands, not learned: the first word of a message after a span's or an
    attribute's quoted name was learned as a secret and redacted in every later text ("Failed")."""
    if not quote:
        return False
    mark = quote[-1]
    opening = text.rfind(mark, max(0, name_start - _LABEL_LOOKBACK), name_start)
    if opening < 0 or "\n" in text[opening:name_start]:
        return False  # no opening quote on its line near enough: a key, as before
    before = opening
    while before > 0 and text[before - 1] == "\\":  # escaped JSON's opening \" and its backslashes
        before -= 1
    while before > 0 and text[before - 1] in " \t\r":
        before -= 1
    return before > 0 and text[before - 1] not in _KEY_OPENERS


def _is_bare_name_in_prose(text: str, name_start: int, key: re.Match[str], memo: dict[Any, Any]) -> bool:
    """Whether the secret-named key at ``name_start`` is a bare name written among words before ``:``: a word
    stands before it on its line, blanks apart (``error reading token: connection refused``, ``could not
    decrypt secret: permission denied``). Its message's first word was learned as a secret and redacted in
    every later text ("connection"). Not so a name starting its line (``password: …``, YAML's ``  password:
    …``, ``Authorization: …``), after punctuation (``> X-Api-Key: …``, ``{password: …``), quoted
    (:func:`_is_quoted_label` judges those) or before ``=``: logfmt, environment files and code bind keys with it
    (``msg=connect password=… host=db``, ``export DB_PASS=…``), and a value followed by more pairs is no
    message. A YAML list item's dash (``- password: …``) is no word."""
    if key.group("q") or ":" not in key.group(0)[key.end("q") - key.start():]:
        return False
    before = _word_before(text, name_start)
    if before < 0:
        # a log line's tag before it (``[auth] token: expired session``, ``(vault) password: ...``) is as a word
        end = name_start
        while end > 0 and text[end - 1] in " \t":
            end -= 1
        return end < name_start and end > 0 and text[end - 1] in ")]"
    if not text[before].isalnum():
        return False
    line_start, whole = _line_start_near(text, name_start)
    if whole and _PAIRS_BEFORE.fullmatch(text, line_start, name_start) is not None:
        # pairs on one line (``user: bob password: <v> host: db``): a key when its value ends the line or another
        # pair follows it, and no word of the line tells of a failure (``error: read token: connection refused``)
        found = _KV_BARE.match(text, key.end())
        line_end = text.find("\n", name_start, name_start + _LINE_NEAR)
        line_end = line_end if line_end >= 0 else min(len(text), name_start + _LINE_NEAR)
        if found is not None and _PAIR_AFTER.match(text, found.end()) is not None \
                and not _failure_between(text, line_start, line_end, memo):
            return False
    return True


def _failure_between(text: str, start: int, end: int, memo: dict[Any, Any]) -> bool:
    """Whether a word of :data:`_FAILURE_WORDS` starts in ``text[start:end]``. ``memo``: the scan's (see _kv_value);
    the words are found once per text (searched again for each name, a long line cost its length per name)."""
    found = memo.get("failures")
    if found is None:
        found = memo["failures"] = [match.start() for match in _FAILURE_WORDS.finditer(text)]
    index = bisect.bisect_left(found, start)
    return index < len(found) and found[index] < end


# How far from a name its line is read (back to the line's start, on to its end): every name of a long line read
# all of it, and 64 KiB of "a: b token: x " took 64 s to scan (quadratic); a longer line is prose
_LINE_NEAR = 256


def _line_start_near(text: str, at: int) -> tuple[int, bool]:
    """(where the line holding ``at`` starts, or ``at - _LINE_NEAR`` when that is further back; whether it starts
    there)."""
    start = text.rfind("\n", max(0, at - _LINE_NEAR), at)
    if start >= 0 or at <= _LINE_NEAR:
        return start + 1, True
    return at - _LINE_NEAR, False


def _learns_in_prose(text: str, value: str, name_start: int, match_end: int, memo: dict[Any, Any]) -> bool:
    """Whether a value that is an ordinary word, after a name in prose and followed by more words, is learned:
    when what follows sets it apart (``set password: swordfish for now``, ``INFO token: <v> for user bob``) and
    nothing before it on its line tells of a failure, it is a value; otherwise a message's first word (``error
    reading token: connection refused``: learned, "connection" was redacted in every later text)."""
    if _STATE_WORD.fullmatch(value) is not None or _VALUE_ASIDE.match(text, match_end) is None:
        return False
    return not _failure_between(text, _line_start_near(text, name_start)[0], name_start, memo)


# A plain word after "is" / "was" / "set ... to" (``the password is swordfish``) is a value when it ends its clause,
# follows a name that is a credential's and not an ordinary word (not ``token``: ``the first token is hello``), and
# is no word a sentence says of a credential: a word of state, one of these, or an adjective's or participle's
# ending (``the password is hashed``, ``... is case-sensitive``, ``... is something else``)
_WEAK_PROSE_NAMES = frozenset(("token", "tokens", "cookie", "cookies", "credential", "credentials", "authorization",
                               "secret", "secrets", "auth", "pass", "pwd", "sig"))
_SENTENCE_WORDS = frozenset((
    "because", "something", "anything", "nothing", "everything", "everywhere", "somewhere", "nowhere", "elsewhere",
    "below", "above", "within", "inside", "outside", "either", "neither", "whatever", "whichever", "another",
    "itself", "yourself", "myself", "themselves", "always", "usually", "mandatory", "obligatory", "necessary",
    "important", "confidential", "personal", "different", "difficult", "simple", "complex", "complicated",
    "trivial", "common", "special", "similar", "identical", "enough", "stronger", "weaker", "longer", "shorter",
    "better", "safer", "easier", "harder", "plaintext", "cleartext", "lowercase", "uppercase", "alphanumeric",
    "numeric", "secret", "please", "there", "where", "which", "these", "those", "unknown", "whether", "really",
    "still", "already", "actually", "probably", "literally", "simply", "exactly", "correctly", "sufficient",
    "insufficient", "available", "unavailable", "working", "broken", "useless", "worthless", "nonsense", "unclear",
))
# (not -lly or -fly: names and nouns, kelly, molly, holly, butterfly, dragonfly, all among the most used passwords;
# an adverb after "is" does not end its clause)
_ADJECTIVE_END = re.compile(r"(?:ed|ing|(?<![lf])ly|able|ible|ful|less|ous|ive|ise|ize)\Z", re.IGNORECASE)
# what may follow a value that ends its clause: the end of its line, a clause's punctuation, a closing bracket
_CLAUSE_END = re.compile(r"[ \t]*(?:\Z|[\r\n]|[,;)\]}]|[.!?:\"'`](?:\s|\Z))")
# "set to" or "changed to" as _KV_KEY's verb (``the password was changed to <v>``, ``... is now set to <v>``)
_ASSIGNING_VERB = re.compile(r"(?i:set|changed|updated|reset)[ \t]+to\b")
# "set", "change" or "update" before "to" (``set the API key to <v>``): a bare "to" starts an infinitive (``you need
# the password to continue``)
_SET_TO = re.compile(r"(?i:\b(?:set|sets|setting|change|changed|changing|update|updated|reset)\b)")


def _plain_value_in_sentence(text: str, name: str, core: str, value: str, name_start: int, key: re.Match[str],
                             match_end: int, quoted: bool) -> bool:
    """Whether ``core``, an ordinary word after a credential's name and "is", "was" or "to" (see ``_KV_KEY``'s
    ``verb``), is the credential (``the password is swordfish``, ``Set the DB password to swordfish.``): see
    :data:`_WEAK_PROSE_NAMES` and :data:`_SENTENCE_WORDS`. Session 41 took no plain word there, and a password that
    is one was shown in the sentence and every later text.

    An adjective's or a participle's ending (``the password is hashed``) tells a word of the sentence only where
    the word could be one: not quoted (``the password is 'blessing'``), not capitalised after a lower-case verb
    (``the password is Blessing``: a name, as a password is written; ``Required`` is a word of state), not after
    "set ... to" (``set the DB password to darling``: what follows names the new value). Session 43 decided on the
    ending alone, and such passwords (blessing, darling, pudding, twisted, wicked, unleashed) were shown."""
    lower = core.lower()
    if name in _WEAK_PROSE_NAMES or lower in _SENTENCE_WORDS or _STATE_WORD.fullmatch(core) is not None \
            or any(hint in lower for hint in _KV_HINTS):
        return False
    verb = key.group("verb")
    assigns = _ASSIGNING_VERB.search(verb) is not None
    if not re.match(r"[ \t]*(?:is|was)\b", verb, re.IGNORECASE) and not assigns \
            and _SET_TO.search(text, _line_start_near(text, name_start)[0], name_start) is None:
        return False
    if _ADJECTIVE_END.search(core) is not None and not (
            quoted or assigns or (core[:1].isupper() and core[1:].islower() and verb.islower())
            or (verb.strip().lower() == "to")):
        return False
    return core is not value or _CLAUSE_END.match(text, match_end) is not None \
        or _VALUE_ASIDE.match(text, match_end) is not None


# A credential after its name without a separator (``token hunter2 expired yesterday``, ``password S3cret!x was
# rejected``): taken when it cannot be a word (a letter and a digit, 6 characters or more, ASCII; no ``:`` or ``=``:
# ``Secret Key:<v>`` is a pair, read at its own name; no backtick: Markdown's code in prose), is no term of the
# trade (``password sha256 hash``, ``token gpt4o``, ``auth oauth2 flow``) and ends its clause or is followed by what
# is said of it (a verb, a word of state, ``for now``)
_LOOSE_VALUE = re.compile(r"(?=[^\s]*[0-9])(?=[^\s]*[A-Za-z])[\x21-\x39\x3b\x3c\x3e-\x5f\x61-\x7e]{6,}")  # no :=`
_TERM_OF_THE_TRADE = re.compile(
    r"(?i:0x[0-9a-f]+|(?:sha|md|rsa|aes|des|hs|rs|es|ps|ed|utf|ucs|base|oauth|http|ipv|tls|ssl|pbkdf|argon|blake|crc|"
    r"x86|arm|gpt|claude|llama|gemini|mistral|qwen|phi|o\d|v\d|cl100k|p50k|r50k|o200k|win|bert|t5)[\w.\-]*)")
_SAID_OF_IT = re.compile(
    r"[ \t]+(?:(?:is|was|has|had|have|will|would|should|must|can|could|may|might|did|does|expires?|works?|"
    r"fails?|failed|worked|leaked|got|gets|keeps?)\b|" + _STATE_WORD.pattern + r"\b)")


def _loose_value(text: str, value: str, quoted: bool, match_end: int) -> bool:
    """Whether ``value``, after a credential's name and blanks (no ``:`` or ``=``), is the credential (see
    :data:`_LOOSE_VALUE`): shown before, in the sentence and every later text."""
    core = value.rstrip(_SENTENCE_END) or value
    if quoted or _LOOSE_VALUE.fullmatch(core) is None or _TERM_OF_THE_TRADE.fullmatch(core) is not None:
        return False
    return core is not value or _CLAUSE_END.match(text, match_end) is not None \
        or _VALUE_ASIDE.match(text, match_end) is not None or _SAID_OF_IT.match(text, match_end) is not None


def _hint_starts(text: str, lower: str) -> list[int]:
    """Where the words of :data:`_KV_HINTS` (and, in a text beyond ASCII, :data:`_FOREIGN_HINTS`) are in ``text``
    (``lower``: it lower-cased), in order. "pat" counts only as a name's last word after a first (``github_pat``,
    ``GITHUB_PAT``, ``githubPat``, ``GitHub PAT:``): at every "path" and "pattern" of a text the key pattern was
    tried, and prose cost 1.8 times as much to scan."""
    starts: list[int] = []
    # str.find runs at C speed; most texts hold none or few of these words
    for hint in _KV_HINTS if lower.isascii() else _KV_AND_FOREIGN_HINTS:
        at = lower.find(hint)
        while at >= 0:
            starts.append(at)
            at = lower.find(hint, at + 1)
    at = lower.find("pat", 1)  # one pass more over every text (each costs ~1 ns a character)
    while at >= 0:
        before = lower[at - 1]
        if before in "_-." or (text[at] == "P" and text[at - 1].islower()) \
                or (before == " " and lower[at + 3:at + 4] in (" ", ":", "=")):  # GitHub PAT: ...
            starts.append(at)
        at = lower.find("pat", at + 1)
    starts.sort()
    return starts


def _kv_scan(text: str, learn: bool) -> str:
    """``text`` with the values of secret-named ``key: value`` pairs replaced (and learned), and the credentials a
    command line gives by position (see :func:`_command_credentials`) replaced (learned when they cannot be a word);
    ``learn``: also learn the passwords of URLs and logins (``scheme://user:<v>@host``, ``user:<v>@host``), which
    the URL rules replace where they stand: shown whole in a later text quoting them before."""
    text = _kv_pairs(text, learn)
    if learn and "@" in text and ":" in text:
        _learn_login_passwords(text)
    if "---" in text and "|" in text:  # a Markdown table's rule under its header
        text = _table_columns(text, learn)
    if "setx" in text or (" -" in text and _COMMAND_OPTION_GATE.search(text) is not None):
        text = _command_credentials(text, learn)
    return text


# a Markdown table's rule, the line under its header: ``|---|:---:|``, ``--- | ---``
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)+\|?[ \t]*$", re.MULTILINE)
_TABLE_ROWS_MAX = 1024  # rows of one table read


def _cells(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The cells of the Markdown table's row ``text[start:end]``: (start, end) of each one's text, without the blanks
    and the marks of code or bold around it (the row's outer bars are no cells)."""
    row = text[start:end]
    lead = len(row) - len(row.lstrip(" \t"))
    bounds = [start + lead - 1 if row[lead:lead + 1] == "|" else start - 1]
    if row[lead:lead + 1] == "|":
        bounds[0] = start + lead
    at = bounds[0]
    while (at := text.find("|", at + 1, end)) >= 0:
        bounds.append(at)
    if text[bounds[-1] + 1:end].strip(" \t\r"):
        bounds.append(end)
    cells = []
    for left, right in itertools.pairwise(bounds):
        left += 1
        while left < right and text[left] in " \t":
            left += 1
        while right > left and text[right - 1] in " \t\r":
            right -= 1
        while left < right and text[left] in _CELL_MARKS and text[right - 1] in _CELL_MARKS:
            left, right = left + 1, right - 1
        cells.append((left, right))
    return cells


def _cell_holds_value(value: str) -> bool:
    """Whether a Markdown table's cell under or beside a secret's name holds its value: one token, no ordinary word
    and no code (a table of parameters gives each one's type and description: ``Optional[str]``, ``SecretStr``,
    ``os.environ``, ``required``), no reference (``$DB_PASS``)."""
    if not value or value == REDACTED or _BLANK.search(value) is not None or _PLAIN_WORD.fullmatch(value) is not None:
        return False
    if "[" in value or "(" in value or (_IDENTIFIER.fullmatch(value) is not None and _DIGIT.search(value) is None):
        return False
    return not _is_reference(value)


def _table_columns(text: str, learn: bool) -> str:
    """``text`` with the cells of a Markdown table's columns whose header names a secret (``| user | password |``,
    its rule, then ``| bob | <v> |``) replaced, learned where ``learn``: read row by row, the key/value scan saw
    no name before the value. A cell of an ordinary word (``| token | required |``) or of code is kept."""
    spans = []
    for rule in _TABLE_RULE.finditer(text):
        head_end = rule.start() - 1
        if head_end <= 0 or not _holds_a_hint(text[max(0, head_end - 1024):head_end].lower()):
            continue
        head = _cells(text, text.rfind("\n", 0, head_end) + 1, head_end)
        columns = [index for index, (left, right) in enumerate(head) if is_secret_key(text[left:right])]
        at = rule.end() + 1
        for _ in range(_TABLE_ROWS_MAX if columns else 0):
            end = text.find("\n", at)
            end = len(text) if end < 0 else end
            if at >= end or "|" not in text[at:end]:
                break
            cells = _cells(text, at, end)
            for index in columns:
                if index < len(cells):
                    left, right = cells[index]
                    value = text[left:right]
                    if not _cell_holds_value(value):
                        continue
                    if learn and len(value) >= _MIN_SECRET_LEN:
                        learn_secret(value)
                    spans.append((left, right))
            at = end + 1
    return _replaced(text, sorted(spans), REDACTED) if spans else text


def _learnable(value: str, login: str) -> bool:
    """Whether a password found by its place (a URL's, a command line's) is learned, not only replaced there: no
    reference or mask (``$DB_PASS``, ``*****``), no placeholder naming a secret (``user:password``,
    ``-p<your_password>``); an ordinary word only when it is no other part of its ``login`` (the URL or the command
    around it: ``postgres://postgres:postgres@db``, ``postgresql://app:postgres@db``: "postgres" would be redacted in
    every later text, inside ``postgresql`` too), no default or example password (:data:`_DEFAULT_PASSWORDS`) and no
    word of state (``user:expired@db``). Session 42 learned no ordinary word there: a plain-word password was replaced
    in its URL and shown in a later text quoting it alone."""
    lower = value.lower()
    if len(value) < _MIN_SECRET_LEN or REDACTED in value or _is_reference(value) \
            or any(hint in lower for hint in _KV_HINTS):
        return False
    if _PLAIN_WORD.fullmatch(value) is None:
        return True
    return login.lower().count(lower) == 1 and lower not in _DEFAULT_PASSWORDS and lower not in _SENTENCE_WORDS \
        and _STATE_WORD.fullmatch(value) is None


# passwords of plain words that tutorials, compose files and images' defaults write in URLs and command lines (no
# user's secret; learned, the word would be redacted in every later text): a default password is as public as the
# image that ships it
_DEFAULT_PASSWORDS = frozenset((
    "changeme", "changeit", "example", "admin", "administrator", "guest", "postgres", "postgresql", "mysql", "mariadb",
    "root", "toor", "default", "letmein", "welcome", "qwerty", "foobar", "foobared", "testing", "tester", "sample",
    "dummy", "demo", "user", "username", "master", "oracle", "tiger", "manager", "system", "redis", "mongo", "mongodb",
    "rabbitmq", "minioadmin", "airflow", "superset", "keycloak", "grafana", "jenkins", "docker", "vagrant", "ubuntu",
    "raspberry", "openai", "anonymous", "nobody", "public", "private", "insecure", "localhost", "database",
))
_LOGIN_AROUND = 64  # characters each side of a password read as its login (the user, the scheme, the host)


def _login_around(text: str, start: int, end: int) -> str:
    """The text read as the login of the password at ``text[start:end]`` (:func:`_learnable`)."""
    return text[max(0, start - _LOGIN_AROUND):end + _LOGIN_AROUND]


def _learn_login_passwords(text: str) -> None:
    """Learn the passwords of ``scheme://user:<v>@host`` (any scheme) and ``user:<v>@host`` in ``text`` (see
    :func:`_learnable`)."""
    if "://" in text:
        for match in _URL_CREDENTIALS.finditer(text):
            password = match.group()[3:-1].partition(":")[2]
            if _learnable(password, _login_around(text, match.start(), match.end())):
                learn_secret(password)
                if "%" in password:  # (a URL's user information is percent-encoded: scheme://bob:p%40ss@host)
                    _learn_url_decoded(password)
    for start, end in _bare_credential_spans(text):
        if _learnable(text[start:end], _login_around(text, start, end)):
            learn_secret(text[start:end])


# a word of letters of any script (``нажмите``, ``olvidada``, ``请输入``): a word of the sentence as an ASCII one is
_LETTERS_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")


def _is_plain_letters(word: str) -> bool:
    """Whether ``word`` (beyond ASCII) is an ordinary word, as :data:`_PLAIN_WORD` tells for ASCII: letters of any
    script, no capital inside (``Забыли пароль: нажмите здесь`` taught "нажмите", redacted in every later text)."""
    return _LETTERS_WORD.fullmatch(word) is not None and word[1:] == word[1:].lower()


# Credentials a command line gives by position, after the command that reads them so: mysql's and MariaDB's
# ``-p<v>`` (attached; ``-p <v>`` is the database to mysql, replaced there only: written as the password often),
# sshpass's ``-p <v>`` / ``-p<v>``, curl's ``-u user:<v>`` / ``--user user:<v>`` / ``--proxy-user``, a registry's or
# a cloud's login ``-p <v>`` (docker, podman, buildah, nerdctl, helm registry, az), GitHub's ``gh secret set NAME
# --body <v>`` (``-b <v>``, ``--body=<v>``), Windows' ``setx NAME "<v>"`` (a secret's name: see
# _command_credentials), SQL Server's ``sqlcmd -P <v>`` (bcp, osql), ``redis-cli -a <v>``, OpenLDAP's ``-w <v>``,
# ``zip -P <v>``, 7-Zip's ``-p<v>`` and smbclient's ``-U user%<v>``. A command runs to the end of its line or the next
# ``;``, ``|``, ``&``
_COMMAND = re.compile(r"(?<![\w./\-])(?P<cmd>mysql(?:dump|admin|import|check|sh|binlog|slap)?|mariadb(?:-dump|-admin)?"
                      r"|sshpass|curl|setx|(?:docker|podman|buildah|nerdctl|az|helm[ \t]+registry)[ \t]+login"
                      r"|gh[ \t]+secret[ \t]+set|sqlcmd|bcp|osql|(?:redis|valkey|keydb)-cli"
                      r"|ldap(?:search|modify|add|delete|passwd|whoami|compare|modrdn|exop)|zip|unzip|zipcloak|7z[ar]?"
                      r"|smbclient|ConvertTo-SecureString)(?:\.exe)?(?=[ \t])[^\n;|&]{0,1024}")
_ARGUMENT = r"""(?P<q>['"]?)(?P<v>[^\s'"]+|(?<=['"])[^'"\n]+)(?P=q)"""


def _user_and_password(options: str, separator: str) -> re.Pattern[str]:
    """An option giving ``user<separator><v>`` (curl's ``-u bob:<v>``, smbclient's ``-U bob%<v>``), ``v`` the
    password."""
    return re.compile(rf"[ \t](?:{options})(?:[ \t]+|=)?(?P<q>['\"]?)[^\s{separator}'\"]*{separator}"
                      r"(?P<v>[^\s'\"]+|(?<=['\"])[^'\"\n]+)(?P=q)")


_COMMAND_OPTIONS = {
    "mysql": re.compile(r"[ \t]-p(?:" + _ARGUMENT + r"|[ \t]+(?P<db>[^\s\-'\"][^\s'\"]*))"),
    "sshpass": re.compile(r"[ \t]-p[ \t]*" + _ARGUMENT),
    "curl": _user_and_password("-u|-U|--user|--proxy-user", ":"),
    "login": re.compile(r"[ \t]-p(?:[ \t]+|=)" + _ARGUMENT),  # (--password <v>: any option named so, see _kv_pairs)
    "gh": re.compile(r"[ \t](?:-b|--body)(?:[ \t]+|=)" + _ARGUMENT),
    "setx": re.compile(r"[ \t]+(?P<name>[\w.\-]{1,128})[ \t]+" + _ARGUMENT),
    "securestring": re.compile(r"[ \t]+(?:-String[ \t]+)?" + _ARGUMENT, re.IGNORECASE),
    "sqlcmd": re.compile(r"[ \t]-P[ \t]*" + _ARGUMENT),
    "redis": re.compile(r"[ \t]-a[ \t]+" + _ARGUMENT),
    "ldap": re.compile(r"[ \t]-w[ \t]*" + _ARGUMENT),
    "zip": re.compile(r"[ \t]-P[ \t]+" + _ARGUMENT),
    "7z": re.compile(r"[ \t]-p" + _ARGUMENT),
    "smbclient": _user_and_password("-U|--user", "%"),
}
# a command's kind by its first word's start (others: a login)
_COMMAND_KINDS = (("mysql", "mysql"), ("mariadb", "mysql"), ("sshpass", "sshpass"), ("curl", "curl"), ("setx", "setx"),
                  ("gh", "gh"), ("sqlcmd", "sqlcmd"), ("bcp", "sqlcmd"), ("osql", "sqlcmd"), ("redis", "redis"),
                  ("valkey", "redis"), ("keydb", "redis"), ("ldap", "ldap"), ("zip", "zip"), ("unzip", "zip"),
                  ("7z", "7z"), ("smbclient", "smbclient"), ("ConvertTo", "securestring"))
# the kinds whose value follows the command (matched there, not searched for): setx's name and value, PowerShell's
# ``ConvertTo-SecureString "<v>" -AsPlainText`` (without -AsPlainText the text is an encrypted string's, no secret)
_VALUE_AFTER_COMMAND = frozenset(("setx", "securestring"))
# the options above that give a credential (the commands all take theirs after a blank, " -", but setx): a text
# holding none is not searched (a pattern with a literal start: 11 of 32,800 paragraphs of the corpus hold one; a
# substring search per command's name cost 4 ns a character more)
_COMMAND_OPTION_GATE = re.compile(r" -(?:[pPuUabw]|-body|-user|-proxy-user|AsPlainText)")


def _command_credentials(text: str, learn: bool) -> str:
    """``text`` with the credentials of :data:`_COMMAND` lines replaced, learned when :func:`_learnable`."""
    spans = []
    for command in _COMMAND.finditer(text):
        name = command.group("cmd")
        kind = next((kind for word, kind in _COMMAND_KINDS if name.startswith(word)), "login")
        pattern, bounds = _COMMAND_OPTIONS[kind], (command.end("cmd"), command.end())
        if kind == "securestring" and "-asplaintext" not in command.group().lower():
            continue
        options = filter(None, (pattern.match(text, *bounds),)) if kind in _VALUE_AFTER_COMMAND \
            else pattern.finditer(text, *bounds)
        for option in options:
            group = "v" if option.group("v") is not None else "db"
            value = option.group(group)
            if value == REDACTED or _is_reference(value) or (kind == "setx" and not is_secret_key(option["name"])):
                continue
            if learn and group == "v" and _learnable(value, command.group()):
                learn_secret(value)
            spans.append(option.span(group))
    return _replaced(text, spans, REDACTED) if spans else text


# what a secret's name given as data follows, by _KV_KEY's group (see there)
_DATA_NAME_FIELDS = {
    "named": re.compile(r"""(?i:name|key|variable|var|param|parameter|env)(?:\\*["']?[ \t]*[:=][ \t]*\\*["']?|>)\Z"""),
    "subscript": re.compile(r"""\[[ \t]*\\*["']\Z"""),
    # (and a configuration's setter, the name its second argument: ``config.set("db", "password", "<v>")``)
    "argument": re.compile(r"""(?:(?:setdefault|setenv|putenv|__setitem__)\(|\bset\([ \t]*\\*["'][^"'\\\n]{0,64}"""
                           r"""\\*["'][ \t]*,)[ \t]*\\*["']\Z"""),
    # (a Markdown table's first cell, the name perhaps in code or bold: ``| `api_key` | <v> |``)
    "cell": re.compile(r"""(?:^|\n)[ \t]*\|[ \t]*[`*]{0,3}\Z"""),
}
# _KV_KEY's groups whose ``", "`` between the name and the value is a dict's or a call's, no list's items
_ARGUMENTS_BEFORE = frozenset(("named", "argument", "call"))
# the end of a Markdown table's cell (its value is the text up to it, without code's or bold's marks)
_CELL_END = re.compile(r"""[ \t]*\|""")
_CELL_MARKS = "`*"
# a setter's value is its last argument: a string, then the call's end
_CALL_END = re.compile(r"""[ \t]*\)""")
# an XML element's end after its text (blanks, then "</")
_XML_CLOSE = re.compile(r"\s*(?:</|&lt;/)")
# the opening of an XML element just before its name: "<", or "<" and a namespace's prefix (``<ns:password>``)
_XML_OPEN = re.compile(r"(?:<|&lt;)(?:[A-Za-z_][\w.\-]{0,30}:)?\Z")
# a "value" opened by the quote that ends a serialised string (a message's text ending with ``api_key=``) and running
# into the next item (``"}]}, {"role": ...``): replaced, the JSON broke and the whole history was left out
_ITEMS_CLOSE = re.compile(r"[}\]]+, [{\[\"]")


def _kv_pairs(text: str, learn: bool, pairs: list[tuple[int, int, int, bool]] | None = None) -> str:
    """``text`` with the values of secret-named ``key: value`` pairs replaced (and learned); ``pairs``: also told
    each replaced value's (name's start, value's start, value's end, whether it would be learned)."""
    lower = text.lower()
    if len(lower) != len(text):  # a character whose lower case is longer ("İ"): keep the offsets
        lower = text.translate(_ASCII_LOWER)
    starts = _hint_starts(text, lower)
    if not starts:
        return text
    arns = [m.span() for m in _ARN.finditer(text)] if "arn:" in lower else ()
    memo: dict[Any, Any] = {}
    out: list[str] = []
    only_here: set[str] = set()  # messages' first words replaced, not learned (see _replace_in_the_rest)
    last = 0
    run_end = prev = -1
    key: re.Match[str] | None = None
    for start in starts:
        if start < last:
            continue
        if start < run_end:
            # Another hint inside the run of name characters just tried: its key name ends
            # where that run ends, before the same text, so the pattern answers the same
            # (one match per run, not per hint: linear on "token_token_..."); only a
            # non-ASCII letter in between can start a different name (see name_start below),
            # a suffix of the name judged before, which can only be secret as a whole short
            # name (_SHORT_NAME_MAX): judging each suffix was quadratic ("keyé" repeated)
            if key is None or run_end - start > _SHORT_NAME_MAX or text[prev:start].isascii():
                continue
        else:
            key = _KV_KEY.match(text, start)
            run_end = key.end("name") if key is not None else _NAME_RUN.match(text, start).end()
        prev = start
        if key is None:
            continue
        name_start = start
        while name_start > 0 and text[name_start - 1] in _NAME_CHARS:
            name_start -= 1
        flag = key.group("flag") is not None
        if key.group("tag") is not None and _XML_OPEN.search(text, max(0, name_start - 64), name_start) is None:
            continue  # (a closing tag, "</password>", or a name before ">" that opens no element)
        if key.lastgroup in _DATA_NAME_FIELDS and _DATA_NAME_FIELDS[key.lastgroup].search(
                text, max(0, name_start - 64), name_start) is None:
            continue  # (no name's field, subscript or setter before it: "password", "value": ... is a list of words)
        option = None
        if text[name_start] == "-" and (flag or "=" in key.group(0)[key.end("q") - start:]):
            # a command line's option (--password <v>, --api-key=<v>): judged by its last word, not as a key
            option = _option_takes_secret(text[name_start:run_end])
            if option is None:
                continue  # --secret-scanning enabled, --max-token 4096, --api-key-file <path>, -psecretword <db>
        elif flag and _LOOSE_VALUE.match(text, key.end()) is None:
            continue  # a name and a word in prose ("the token expired"): no value without a separator (_loose_value)
        if arns and any(a < name_start < b for a, b in arns):
            continue  # "secretsmanager:" or ":secret:" inside an ARN: a service and a resource type
        # the name is judged before the value is matched: a value runs to the end of its line
        # or further, matching it for every key (secret or not) would be quadratic
        prose = False
        if option is None and not is_secret_key(text[name_start:run_end]):
            # a key written as words ("API key: ...", "private key = ...", "Your secret key: ..."): the word
            # before, joined by blanks, makes the name
            name_start = _word_before(text, name_start)
            if name_start < 0 or not is_secret_key(text[name_start:run_end]):
                continue
            prose = True
        prose = prose or key.group("owner") is not None
        found = _kv_value(text, key.end(), memo) if key.lastgroup != "cell" else _cell_value(text, key.end())
        if found is None:
            continue
        quoted, value_start, value_end, match_end = found
        value = text[value_start:value_end]
        if not value or value == REDACTED or (not quoted and value in _JSON_LITERALS):
            continue
        # never across two serialised list items (see _redacted_json_list); the ", " between a name given as data
        # and "value" is a dict's (an item's JSON escapes a quote inside it: '", "value": ' starts no string item),
        # between a call's arguments the call's
        if '", "' in text[key.end() if key.lastgroup in _ARGUMENTS_BEFORE else start:match_end] \
                or (quoted and _ITEMS_CLOSE.match(text, value_start) is not None):
            continue
        if option is not None:
            if _OPTION_SPEC.match(value) is not None or (
                    option == "key" and (quoted or _KEY_OPTION_VALUE.fullmatch(value) is None)):
                continue  # docker build --secret id=npmrc,src=..., sort --key 2,2n, openssl -key server.key
        elif flag and not _loose_value(text, value, quoted, match_end):
            continue  # a name and a word in prose ("the token expired")
        elif key.group("arrow") is not None \
                and not (quoted and (key.group("q") or text[name_start - 1:name_start] == ":")):
            continue  # a JavaScript arrow function's parameter (password => password.trim()), a value of code
        elif key.lastgroup in ("subscript", "argument") and not quoted:
            continue  # env["HTTP_COOKIE"] = cookie_str: a variable of code
        elif key.lastgroup == "call" and not (quoted and _CALL_END.match(text, match_end) is not None
                                              and text[name_start:run_end].rpartition(".")[2][:3].lower() == "set"):
            continue  # get_password("svc", "user"), a setter's argument before others, a variable's
        elif key.group("pointer") is not None and not quoted and not _loose_value(text, value, quoted, match_end):
            continue  # token -> next_token, password -> hashed: code or a sentence's words
        elif key.lastgroup == "cell" and not _cell_holds_value(value):
            continue  # | api_key | string | The key |: a table of parameters, their types and descriptions
        elif key.lastgroup == "tag" and _XML_CLOSE.match(text, value_end) is None:
            continue  # the <auth> element, trailer.<token>.command: no element's text
        # a message (more words after the value on its line, starting with an ordinary word) after an exception's
        # type, a key in prose (written as words, or a bare name after a word before ":") or a quoted label (a
        # span's or an attribute's name in a log line) is redacted here only; a value alone after such a name, or
        # one with a digit, an inner capital or a symbol, is learned: a dotted configuration key reads as a class's
        # name (secrets.Prod: ..., db.credentials.Primary = ...), an exception may hold nothing but the secret
        # (InvalidApiKeyError: <the key>) and a value after a label or in prose may be one (setting 'db_password':
        # <it>, the password: <it>, my token: hunter2 as before)
        # (a bare value's sentence end is not the value's: "my password: <v>." learns <v> too, and is judged without)
        core = value if quoted else value.rstrip(_SENTENCE_END) or value
        plain = _PLAIN_WORD.fullmatch(core) is not None or (not core.isascii() and _is_plain_letters(core))
        by_name = message = False
        if key.group("verb") is not None:
            # "the password is <v>", "set the API key to <v>": a value only where it cannot be a word of the sentence
            # ("the password is incorrect", "the key to success"): holding a digit, an inner capital or a symbol, as
            # long as a learned value. Not a quoted word either: a model explaining a tokenizer writes "the next
            # token is 'because'"; nor after a short name that is as often a word ("the secret is `normalize()`
            # first", "the pwd is /work/project": the shell's working directory)
            name = text[name_start:run_end].lower()
            if len(core) < _MIN_SECRET_LEN or name in _NOT_NAMES_IN_PROSE or (plain and not _plain_value_in_sentence(
                    text, name, core, value, name_start, key, match_end, quoted)):
                continue
            learns = True
        elif plain and (prose or _is_bare_name_in_prose(text, name_start, key, memo)):
            # an ordinary word after a name in prose: a word of state (expired, invalid) never, a message's first
            # word neither (see _learns_in_prose); a word alone after the name is a value
            if _MESSAGE_GOES_ON.match(text, match_end) is not None:
                learns = _learns_in_prose(text, core, name_start, match_end, memo)
                message = True
            else:
                learns = _STATE_WORD.fullmatch(core) is None
        elif plain and (_is_class_name(text[name_start:run_end]) or _is_quoted_label(text, name_start, key.group("q"))):
            # after an exception's type or a quoted label (a log line's span or attribute name) an ordinary word
            # followed by more words is the message's
            learns = _MESSAGE_GOES_ON.match(text, match_end) is None and _STATE_WORD.fullmatch(core) is None
            message = not learns
        else:
            # an ordinary word as a call's keyword argument (f(token=content), connect(host, password=value)) is a
            # variable of the code a model writes: redacted here, not learned ("value" was redacted in every later text)
            learns = not (plain and not quoted and _is_call_argument(text, name_start, value_end))
            by_name = True  # (and by the name's kind, judged only when learning: see below)
        # (judged last: most names are passed over above, and these read the value again)
        if not quoted and _names_code(text, value, value_end):
            continue  # password=password, api_key=self.api_key, token: Optional[str], key=os.environ.get("X")
        key_name = text[name_start:run_end]
        if _holds_no_secret(key_name, value):
            # PWD=/work/project in a printed environment: learned, every later path of it was redacted (and
            continue  # SMTP_AUTH=CRAM-MD5: a method)
        if _is_reference(value) or (not quoted and value == "$" and _REFERENCE.match(text, value_start)):
            continue  # --token $OPENAI_TOKEN, password=${DB_PASS}: a variable's name, kept readable and not learned
        teaches = (learn or pairs is not None) and learns and len(value) >= _MIN_SECRET_LEN \
            and _STATE_WORD.fullmatch(core) is None \
            and not (by_name and (_names_a_constant(key_name, core) or _names_what_is_no_secret(
                key_name, core, text[max(0, name_start - 64):name_start]))) \
            and not _is_code_or_example(text, key, value, quoted, value_end, name_start)
        if pairs is not None:
            pairs.append((name_start, value_start, value_end, teaches))
        if learn and teaches:
            # (a word of state is never learned, whatever the name's place: ``token: expired`` at a line's start,
            # ``password: required`` in YAML, ``{"api_key": "missing"}`` taught "expired", "required", "missing",
            # then redacted in every later text, inside "unexpired" too; still replaced here)
            scheme, _, token = value.partition(" ")
            learn_secret(token.strip() if token and scheme.lower() in ("bearer", "basic", "token") else value)
            if token and scheme.lower() == "basic":
                _learn_basic_password(token.strip())
            _register_login_password(value, learn_secret)
            if core is not value:
                learn_secret(core)
            if "%" in value:
                _learn_url_decoded(value)
        elif message and not learns and len(core) >= _MIN_SECRET_LEN and _STATE_WORD.fullmatch(core) is None:
            only_here.add(core)
        out.append(text[last:value_start])
        quote = key.group("q")
        # a bare value after a quoted key (JSON number, unquoted YAML) stays valid JSON when quoted
        out.append(REDACTED if quoted or not quote else f"{quote}{REDACTED}{quote}")
        last = value_end
    if not out:
        return text
    out.append(text[last:])
    return _replace_in_the_rest("".join(out), only_here)


def _cell_value(text: str, at: int) -> tuple[bool, int, int, int] | None:
    """(quoted, value start, value end, end) of a Markdown table's cell starting at ``at``: its text up to the next
    ``|`` on its line, without the marks of code or bold around it; ``None`` for an empty cell or a row's last."""
    line_end = text.find("\n", at)
    end = _CELL_END.search(text, at, len(text) if line_end < 0 else line_end)
    if end is None:
        return None
    start, stop = at, end.start()
    while start < stop and text[start] in _CELL_MARKS and text[stop - 1] in _CELL_MARKS:
        start, stop = start + 1, stop - 1
    return (False, start, stop, end.start()) if start < stop else None


def _learn_basic_password(token: str) -> None:
    """Learn the password of an HTTP Basic credential (base64 of ``user:password``): learned as its base64 alone,
    the password quoted later (a tool's error, the client's log of its login) was shown."""
    with contextlib.suppress(ValueError):
        login = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
        _, colon, password = login.partition(":")
        if colon and _learnable(password, login):
            learn_secret(password)


_BLANK = re.compile(r"\s")


def _learn_url_decoded(value: str) -> None:
    """Learn what a percent-encoded ``value`` stands for: a form's ``password=Zorb%21q7`` is ``Zorb!q7`` in every
    other text (learned as written, the password itself was shown there), and a value that ran on past an encoded
    ``&`` (a query inside a query, ``password%3D<v>%26next%3D1`` decoded once) is ``<v>`` up to it."""
    head = value.split("%26", 1)[0]
    for form in {head, unquote(head)} - {value}:
        if not _BLANK.search(form):  # (pkcs11:token=Root%20CA%20Certificates names a token: no words learned)
            learn_secret(form)


def _replace_in_the_rest(text: str, words: set[str]) -> str:
    """``text`` with every other whole occurrence of ``words`` replaced: a message's first word after a credential's
    name (``password for alice: Zorblaxq reset by admin``) is replaced there and not learned (in ordinary text such
    a word is a message's: the corpus count), but shown where the same text quoted it again, it gave away what the
    first place hid. Later texts are not touched (it is not learned)."""
    if not words:
        return text
    found = _compile(words)  # trie-shaped: 1,400 distinct words in 60 KB cost 40 ms as one alternation, 14 as this
    pattern = re.compile(r"(?<![\w.\-])(?:" + found.pattern + r")(?![\w\-])")
    return pattern.sub(REDACTED, text)


def _kv_value(text: str, pos: int, memo: dict[Any, Any]) -> tuple[bool, int, int, int] | None:
    """(quoted, value start, value end, end) of the value of a key/value pair at ``pos``; ``None``
    when there is none or its quote does not close on its line. ``memo``: one per scan of ``text``,
    asked with growing ``pos`` (it also keeps the backslashes counted before a quote, by position).

    A quoted value ends at its quote's first unescaped repetition (:func:`_closes`): a quote after
    an odd number of backslashes (``"p1\\"q"`` in JSON, ``'ab\\'cd'`` in a Python repr) and,
    outside escaped JSON, a doubled quote (``'ab''cd'`` in SQL, ``"ab""cd"`` in CSV) are part of
    the value (ended at the first quote, the value's tail was shown). Whether a quote closes
    depends on the quote and the backslashes before it, not on where the value started, so a
    value that does not close is remembered for the rest of its line (one search per kind of
    quote and line: a regex closing each value, ``(\\*["']).*?\\1``, took 3.8 s on 64 KiB of
    keys with unclosed quotes)."""
    quote = _VALUE_QUOTE.match(text, pos)
    if quote is None:
        bare = _KV_BARE.match(text, pos)
        if bare is None:
            return None
        end = bare.end()
        # a quote or backslashes inside a bare value: the value goes on (_KV_BARE_MORE)
        while (more := _KV_BARE_MORE.match(text, end)) is not None:
            end = more.end()
        return False, pos, end, end
    start = quote.end()
    closing = quote.group()  # the memo's key: the quote and the backslashes before it
    mark, level = closing[-1], len(closing) - 1
    line_end = memo.get("\n", -1)
    if line_end < start:  # the end of the line this value starts on
        line_end = text.find("\n", start)
        memo["\n"] = line_end = len(text) if line_end < 0 else line_end
    doubled = not level
    at = start
    if doubled and start < line_end and text[start] == mark:
        # the value starts with quotes: its opening quote takes part in their pairing, a search
        # from an earlier position saw them paired differently (not remembered)
        run = _quote_run(text, at, mark, line_end)
        if run % 2:
            return True, start, at + run - 1, at + run
        at += run
    if memo.get(closing) == line_end:
        return None  # not found from an earlier position of this line on
    while True:
        at = text.find(mark, at, line_end)
        if at < 0:
            memo[closing] = line_end
            return None
        if text[at - 1] == "\\":  # (a quote after no backslash closes at every level)
            slashes = memo.get(at)
            if slashes is None:  # counted once per scan: later values search the same quotes
                slashes = 1
                while text[at - 1 - slashes] == "\\":
                    slashes += 1
                memo[at] = slashes
            if not _closes(slashes, level):
                at += 1
                continue
            end = at - min(slashes, level)
        else:
            end = at
        if doubled and at + 1 < line_end and text[at + 1] == mark:
            run = _quote_run(text, at, mark, line_end)
            if run % 2 == 0:  # doubled quotes, each pair one quote of the value
                at += run
                continue
            end = at = at + run - 1
        return True, start, end, at + 1


def _quote_run(text: str, at: int, mark: str, end: int) -> int:
    """The number of ``mark`` quotes in a row at ``at`` (before ``end``)."""
    run = 1
    while at + run < end and text[at + run] == mark:
        run += 1
    return run


def _closes(slashes: int, level: int) -> bool:
    """Whether a quote after ``slashes`` backslashes ends a value opened by the same quote after
    ``level`` backslashes: JSON inside a JSON string (``level`` 1, 3, 7...) is decoded a level at a
    time, each taking half the backslashes; a quote that ends the enclosing string ends the value."""
    while level % 2:
        if slashes % 2 == 0:
            return True  # unescaped at an outer level: the string holding the value ends there
        slashes //= 2
        level //= 2
    return slashes % 2 == 0


# an Amazon Resource Name: arn:partition:service:region:account:resource
_ARN = re.compile(r"(?<![\w.\-])arn:aws[\w\-]*:[\w\-]+:[\w\-]*:\d*:[^\s\"'<>,;]+", re.IGNORECASE)
_JSON_LITERALS = frozenset({"null", "true", "false", "None", "True", "False"})


def redact(text: str | None) -> str | None:
    """Replace every secret in ``text`` by ``[REDACTED]``: values of secret-named key/value
    pairs (learned on the way), registered and learned secrets, and secret-shaped tokens."""
    if not text or not isinstance(text, str):
        return text
    return _redact_with(_known_pattern, text)


def _redact_with(known: re.Pattern[str] | _Patterns | None, text: str) -> str:
    if len(text) < _MIN_SECRET_LEN and _whole_pieces and text in _whole_pieces:
        return REDACTED
    if not text.isascii() and _needs_folding(text):
        # invisible characters, fullwidth forms, Unicode tags or look-alike letters inside a word:
        # searched folded too, and shown folded only where that hides more (a key split by U+200B)
        before = _known_pattern
        as_written = _redact_escaped(known, text)
        folded = _redact_escaped(_known_pattern if _known_pattern is not before else known, text.translate(_FOLD))
        count, written = folded.count(REDACTED), as_written.count(REDACTED)
        # as many replacements, but fewer characters left visible (part of the key was learned as written)
        if count > written or (count and count == written and len(folded) < len(as_written.translate(_FOLD))):
            return folded
        return as_written
    return _redact_escaped(known, text)


# what an attacker (a prompt-injected model, code echoing a key) can slip into a key to break its
# match: zero-width and other invisible format characters (removed), fullwidth ASCII, Unicode tag
# characters (U+E0020-E007E spell ASCII invisibly: "ASCII smuggling") and Cyrillic/Greek letters
# that look Latin (mapped to ASCII)
_INVISIBLE_BMP = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
                  "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0")
_INVISIBLE = _INVISIBLE_BMP + "\U000e0000-\U000e001f\U000e007f"
_LOOKALIKES = ("\u0430a\u0435e\u043eo\u0440p\u0441c\u0443y\u0445x\u0456i\u0458j\u0455s\u0501d\u051bq\u051dw"
               "\u0410A\u0412B\u0415E\u041aK\u041cM\u041dH\u041eO\u0420P\u0421C\u0422T\u0425X\u0423Y\u0406I"
               "\u0408J\u0405S\u03bfo\u03bdv\u0391A\u0392B\u0395E\u0396Z\u0397H\u0399I\u039aK\u039cM\u039dN"
               "\u039fO\u03a1P\u03a4T\u03a5Y\u03a7X")
_FOLD: dict[int, int | None] = {
    **{ord(_LOOKALIKES[i]): ord(_LOOKALIKES[i + 1]) for i in range(0, len(_LOOKALIKES), 2)},
    **{code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)},
    **{code: code - 0xE0000 for code in range(0xE0020, 0xE007F)},
    **{code: None for code in itertools.chain.from_iterable(
        range(ord(a), ord(b) + 1) if b else (ord(a),)
        for a, b in re.findall(r"(.)(?:-(.))?", _INVISIBLE))},
}
_LOOKALIKE_SET = re.escape(_LOOKALIKES[0::2])
# three searches, each a single character class first (one class holding the astral tag range, or
# alternatives starting with ASCII letters, cost 2-3x more on prose); the look-alike one starts at
# the look-alike, so English text with an emoji or an accent skips through it at C speed
_INVISIBLE_GATE = re.compile(rf"[{_INVISIBLE_BMP}\uff01-\uff5e]")
_TAG_GATE = re.compile(r"[\U000e0000-\U000e007f]")
_LOOKALIKE_GATE = re.compile(rf"[{_LOOKALIKE_SET}](?:(?<=[A-Za-z0-9_\-].)|(?=[A-Za-z0-9_\-]))")


def _needs_folding(text: str) -> bool:
    return (_INVISIBLE_GATE.search(text) is not None or _LOOKALIKE_GATE.search(text) is not None
            or _TAG_GATE.search(text) is not None)


# line breaks an encoding puts inside a key: quoted-printable's soft breaks ("=" ending a line of
# an e-mail body or MIME part, cut at 76 characters) and base64 wrapped at 60+ characters a line
# (MIME 76, PEM and openssl 64): the key, or a registered key's encoded form, was in neither line
_SOFT_BREAK = re.compile(r"=\r?\n|=(?:\\r)?\\n")
_WRAPPED_BASE64 = re.compile(r"\n(?:(?<=[A-Za-z0-9+/]{60}\n)|(?<=[A-Za-z0-9+/]{60}\r\n))(?=[A-Za-z0-9+/])")
_WRAPPED_BASE64_ESCAPED = re.compile(r"\\n(?<=[A-Za-z0-9+/]{60}\\n)(?=[A-Za-z0-9+/])")  # inside JSON: "\n"
# either kind, in one scan from each "\n" (a literal first character), one look behind it before
# the four: two substring tests and a scan cost texts with lines +6 %, this +2 %; the same for
# JSON-escaped line breaks, in texts holding a backslash
_WRAP_GATE = re.compile(r"\n(?<=[=A-Za-z0-9+/\r]\n)"
                        r"(?:(?<==\n)|(?<==\r\n)|(?<=[A-Za-z0-9+/]{60}\n)|(?<=[A-Za-z0-9+/]{60}\r\n))")
_WRAP_GATE_ESCAPED = re.compile(r"\\n(?<=[=A-Za-z0-9+/r]\\n)"
                                r"(?:(?<==\\n)|(?<==\\r\\n)|(?<=[A-Za-z0-9+/]{60}\\n)|(?<=[A-Za-z0-9+/]{60}\\r\\n))")


def _is_wrapped(text: str) -> bool:
    return ("\n" in text and _WRAP_GATE.search(text) is not None) or (
        "\\" in text and _WRAP_GATE_ESCAPED.search(text) is not None)


def _unwrapped(text: str) -> str:
    """``text`` with soft line breaks and the line breaks of wrapped base64 removed (as written,
    or JSON-escaped)."""
    if "=\n" in text or "=\r\n" in text or "=\\" in text:
        text = _SOFT_BREAK.sub("", text)
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    if "\\r\\n" in text:
        text = text.replace("\\r\\n", "\\n")
    text = _WRAPPED_BASE64.sub("", text)
    return _WRAPPED_BASE64_ESCAPED.sub("", text) if "\\" in text else text


# form-encoded prose (a query's or a form body's text, ``q=my+password+is+<v>``): "+" stands for a blank there, and
# as written no name was followed by the blanks and the verb prose takes (the value was shown, there and later)
_FORM_PROSE = re.compile(r"\+(?i:is|was|to|now|for|of)\+")


def _redact_escaped(known: re.Pattern[str] | _Patterns | None, text: str) -> str:
    wrapped = _is_wrapped(text)
    form = "+" in text and _FORM_PROSE.search(text) is not None
    if "\\" in text or "%" in text or "&" in text or wrapped or form:
        decoded = _unwrapped(text) if wrapped else text
        if form:  # before "%2B" is decoded: that one is a "+" (a known secret holding one replaced first)
            decoded = (_replace_known(known, decoded) if known is not None else decoded).replace("+", " ")
        if "\\" in decoded:
            decoded = _unescaped(_JSON_ESCAPED, known, decoded)
        if "%" in decoded:
            if "%25" in decoded:  # encoded twice (pass%2577ord=<v>: "%" itself escaped, then "w")
                decoded = (_replace_known(known, decoded) if known is not None else decoded).replace("%25", "%")
            decoded = _unescaped(_URL_ESCAPED, known, decoded)
        if "&#" in decoded or "&quot;" in decoded or "&apos;" in decoded:
            decoded = _unescaped(_HTML_ESCAPED, known, decoded)
        if decoded != text:
            # the decoded form only where it hides more (an escaped key): other escapes, as
            # in a URL's %41 or a JSON \u0041, are telemetry's to keep as the app wrote them
            before = _known_pattern
            as_written = _redact_plain(known, text)
            unescaped = _redact_plain(_known_pattern if _known_pattern is not before else known, decoded)
            redacted = unescaped.count(REDACTED)
            if redacted > as_written.count(REDACTED):
                return unescaped
            # as many replacements, but the decoded form's may hide more of the text (a key whose
            # first half was learned as written and whose whole shows only decoded): fewer
            # characters left visible, counted decoded in both
            if redacted and len(unescaped) < len(_decoded(_unwrapped(as_written) if wrapped else as_written)):
                return unescaped
            return as_written
    return _redact_plain(known, text)


def _redact_plain(known: re.Pattern[str] | _Patterns | None, text: str) -> str:
    before = _known_pattern
    text = _kv_scan(text, learn=True)
    if _known_pattern is not before:  # learned a value here: catch its other occurrences too
        known = _known_pattern
    # before known secrets: one replaced inside a blob (an encoded form) would cut the blob short
    text = _redact_encoded(text)
    if known is not None:
        text = _replace_known(known, text)
        if _pieced_max_len:
            text = _replace_pieces(text)
    text = _SECRET_SHAPES.sub(REDACTED, text)
    for gate, shapes in _GATED_GROUPS:
        if gate is None or gate.search(text) is not None:
            for hint, shape in shapes:
                if hint in text:
                    text = shape.sub(REDACTED, text)
    if ".eyJ" in text:
        text = _redact_glued_tokens(text)
    if "@" in text:
        if "://" in text:
            text = _URL_TOKEN_USER.sub(f"://{REDACTED}@", text)
        if ":" in text:
            text = _redact_bare_credentials(text)
        if "/" in text:
            text = _redact_oracle_logins(text)
    if "://" in text:
        text = _URL_CREDENTIALS.sub(f"://{REDACTED}@", text)
        if "?" in text and "=" in text:
            text = _URL_QUERY_SECRETS.sub(rf"\g<name>={REDACTED}", text)
        if "hook" in text:
            text = _URL_PATH_SECRETS.sub(rf"\g<path>{REDACTED}", text)
    if _context_pattern is not None:
        text = _context_pattern.sub(REDACTED, text)
    return text


# A JSON Web Token glued after letters or digits (``tokeneyJ...``, ``x9eyJ...``), which the shape (at a run's start)
# does not take: found by its second part, ``.eyJ`` (a literal: a fast scan), with the run before it taken once (an
# atomic group, a lookahead's capture) from the run's start only; its first part is the run from its first ``eyJ``.
# Tried from every ``eyJ`` of the run, the first part was scanned to the run's end from each (quadratic)
_GLUED_TOKEN = re.compile(r"(?<![A-Za-z0-9_\-])(?=([A-Za-z0-9_\-]*))\1\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")


def _redact_glued_tokens(text: str) -> str:
    """``text`` with each JSON Web Token glued after other characters of its alphabet replaced (from its ``eyJ``)."""
    spans = []
    for match in _GLUED_TOKEN.finditer(text):
        at = text.find("eyJ", match.start(), match.end(1))
        if at > match.start() and match.end(1) - at >= 11:
            spans.append((at, match.end()))
    return _replaced(text, spans, REDACTED) if spans else text


def _redact_encoded(text: str) -> str:
    """``text`` with each base64 blob (:data:`_BLOB`) and each base64 or hex run of plain text
    (:data:`_ENCODED_TEXT`) that holds a secret replaced; a value under a secret's name in one is learned."""
    if ("H4sI" in text or "LS0t" in text or "Qlpo" in text or "/Td6WFo" in text
            or _BLOB_E.search(text) is not None):
        text = _redact_blobs(text)
    runs = text.encode("ascii", "replace").translate(_RUN_BYTES)  # (one byte a character: positions kept)
    return _redact_encoded_text(text, runs) if _LONG_RUN in runs else text


# base64 blobs a secret hides in with no fixed form: gzip (H4sI) or zlib (eJ., eN.) compressed data,
# whose bytes depend on the whole stream, and base64 of a PEM block ("-----BEGIN") or of a JSON
# object ('{"', '{ "', '{\n') holding a secret by name or shape. Found by their fixed first
# characters; wrapped lines (as written, or JSON-escaped) are followed while they are full.
# Also bzip2 ("BZh1"-"BZh9": Qlpo[M-O]), xz (/Td6WFo) and zlib's other levels (eA[E-H]: level 1,
# eF[4-7]: 2-5).
_BLOB = re.compile(
    r"(?:(?<![A-Za-z0-9+/_\-])|(?<=\\[nrt]))"
    r"(?P<magic>H4sI|eJ[w-z]|eN[o-r]|eA[E-H]|eF[4-7]|Qlpo[M-O]|/Td6WFo|LS0tLS1|eyJ|eyAi|ewo)"
    r"(?:[A-Za-z0-9+/_\-]|\r?\n|\\r\\n|\\n)+={0,2}")
# the magics that start with "e", as one pattern with a literal first character (a fast scan); seven
# substring tests cost 1.8 us per 250 characters, this and two tests 1.35
_BLOB_E = re.compile(r"e(?:yJ|yAi|wo|J[w-z]|N[o-r]|A[E-H]|F[4-7])")
_BLOB_LINE = re.compile(r"\r?\n|\\r\\n|\\n")
_BLOB_MIN = 16  # base64 characters (12 bytes): shorter runs hide no key worth the decode
_BLOB_OUT = 1 << 16  # decoded / decompressed bytes searched (a decompression bomb stops there)
_B64_STANDARD = str.maketrans("-_", "+/")
_blob_depth = threading.local()


def _redact_blobs(text: str) -> str:
    """``text`` with each base64 blob that decodes (and decompresses) to text holding a secret
    replaced whole; the decoded text is searched as :func:`redact` searches any text."""
    depth = getattr(_blob_depth, "value", 0)
    if depth >= 2:  # a blob inside a blob inside a blob: not followed further
        return text
    spans = []
    for match in _BLOB.finditer(text):
        start, end = match.span()
        blob = match.group()
        line_end = 0
        width = None
        for line in _BLOB_LINE.finditer(blob):  # wrapped: lines as long as the first, then a last one
            size = line.start() - line_end
            if width is None:
                width = size
            if size != width or line.end() == len(blob):
                break
            line_end = line.end()
        else:
            line_end = len(blob)
        if line_end < len(blob):  # the blob ends with the line after line_end
            cut = _BLOB_LINE.search(blob, line_end)
            end = start + (cut.start() if cut is not None else len(blob))
            blob = blob[:end - start]
        blob = _BLOB_LINE.sub("", blob)
        if len(blob) >= _BLOB_MIN and _blob_holds_secret(match.group("magic"), blob, depth):
            spans.append((start, end))
    return _replaced(text, spans, REDACTED) if spans else text


def _blob_holds_secret(magic: str, blob: str, depth: int) -> bool:
    try:
        compressed = magic == "H4sI" or magic[:2] in ("eJ", "eN", "eA", "eF") or magic[0] in "Q/"
        blob = blob.translate(_B64_STANDARD).rstrip("=")
        if not compressed:
            blob = blob[: 4 * (_BLOB_OUT // 3)]
        blob = blob[: len(blob) - len(blob) % 4 if len(blob) % 4 == 1 else len(blob)]
        raw = base64.b64decode(blob + "=" * (-len(blob) % 4))
        if compressed:
            if magic[0] == "Q":
                import bz2

                raw = bz2.BZ2Decompressor().decompress(raw, _BLOB_OUT)
            elif magic[0] == "/":
                import lzma

                raw = lzma.LZMADecompressor().decompress(raw, _BLOB_OUT)
            else:
                try:
                    raw = zlib.decompressobj(31 if magic == "H4sI" else 15).decompress(raw, _BLOB_OUT)
                except zlib.error:  # not compressed data after all
                    return False
        inner = raw[:_BLOB_OUT].decode("utf-8", "replace")
    except Exception:
        return False
    return _holds_secret(inner, depth)


def _holds_secret(inner: str, depth: int) -> bool:
    """Whether ``inner``, decoded from a blob or an encoded text found at ``depth``, holds a secret (by name, shape
    or as known; a value under a secret's name is learned on the way)."""
    if not inner:
        return False
    _blob_depth.value = depth + 1
    try:
        return (_redact_with(_known_pattern, inner) or "").count(REDACTED) > inner.count(REDACTED)
    finally:
        _blob_depth.value = depth


# Base64 or hex of plain text, which no magic above opens: ``cGFzc3dvcmQ9...`` (``password=<v>``), an API key or
# ``api_key: <k>`` a tool base64-encodes or hex-dumps. Only the forms of text are taken, the whole run between
# characters of neither: each 4 characters of base64 of bytes 0x09-0x7e (tab, line breaks, printable ASCII) have a
# first character of 26, a second of 28 and a third of 32 (see the classes), so a random base64 run of 16 or more
# is taken about once in 40,000 and an English word of 16 letters rarely (every 4th letter among A-F, I-Z); hex of
# such bytes has a first digit 2-7 (0 before a tab or a line break) in each pair. Decoded and searched as any text;
# the run is replaced whole where that finds a secret (a value under a secret's name is learned there).
_ENCODED_TEXT = re.compile(
    r"(?<![A-Za-z0-9+/_\-])(?:"
    r"(?P<b64>(?:[CDI-Za-f][A-HQ-Xg-nw-z0-3][ABEFIJMNQRUVYZcdghklopstwx014589][A-Za-z0-9+/_\-]){4,}"
    r"(?:[A-Za-z0-9+/_\-]{2,3})?={0,2})"
    r"|(?:[2-7][0-9a-f]|0[9ad]){12,}|(?:[2-7][0-9A-F]|0[9AD]){12,})(?![A-Za-z0-9+/=_\-])")
_ENCODED_TEXT_MAX = 4 * (_BLOB_OUT // 3)  # characters of one run decoded (as a blob's)
# Such a run starts with 16 letters or digits in a row ("+/-_" stand for 4 bytes only: ">", "?", "~" and DEL at a
# group's third byte): found in the text's bytes mapped to "a" (a letter or digit) and " " (any other) by
# bytes.translate and a substring search, the pattern tried there only. Searched for over the whole text, it cost half
# as much again as the rest of the redaction of prose and code (each letter started an attempt)
_RUN_BYTES = bytes(0x61 if chr(code).isascii() and chr(code).isalnum() else 0x20 for code in range(256))
_LONG_RUN = b"a" * 16


def _redact_encoded_text(text: str, runs: bytes) -> str:
    """``text`` with each base64 or hex run of plain text (:data:`_ENCODED_TEXT`) that holds a secret replaced;
    ``runs``: ``text`` mapped by :data:`_RUN_BYTES`. A run that is no such whole run is searched as one of UTF-8
    text and for base64 of text glued to other characters of its alphabet (:func:`_other_encoded_spans`)."""
    depth = getattr(_blob_depth, "value", 0)
    if depth >= 2:
        return text
    spans: list[tuple[int, int]] = []
    done = 0  # where the last run looked at ends (each character is in one run)
    at = runs.find(_LONG_RUN)
    while at >= 0:  # ``at`` starts a run of letters and digits (the first 16 in a row)
        end = runs.find(b" ", at)
        nxt = runs.find(_LONG_RUN, end) if end >= 0 else -1
        if at < done:
            at = nxt
            continue
        match = _ENCODED_TEXT.match(text, at)
        if match is None:
            stop = _B64_RUN.match(text, at).end()
            # (no digit: an identifier, AgentDescriptionGuard, some_long_identifier_name, most runs here; each looked
            # at cost a sixth more of the redaction of source code. Base64 of 16 characters of text or more holds a
            # digit but rarely: letters alone, each 4 characters' second and third among 54 and 26 of 64)
            done = _other_encoded_spans(text, at, done, stop, depth, spans) \
                if _DIGIT.search(text, at, stop) is not None else stop
            at = runs.find(_LONG_RUN, done) if nxt >= 0 else -1
            continue
        at, done = nxt, match.end()
        raw = _decoded_run(match.group()[:_ENCODED_TEXT_MAX], match.group("b64") is None)
        if raw is not None and _holds_secret(raw.decode("ascii", "replace"), depth):
            spans.append(match.span())
    return _replaced(text, sorted(spans), REDACTED) if spans else text


def _decoded_run(run: str, hexadecimal: bool) -> bytes | None:
    """The bytes of a base64 (standard or URL-safe, padded or not) or hex ``run``; ``None`` if it is neither."""
    try:
        if hexadecimal:
            return bytes.fromhex(run[:len(run) - len(run) % 2])
        run = run.translate(_B64_STANDARD).rstrip("=")
        return base64.b64decode(run[:len(run) - len(run) % 4 if len(run) % 4 == 1 else len(run)]
                                + "=" * (-len(run) % 4))
    except ValueError:
        return None


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_\-]*={0,2}")
_HEX_RUN = re.compile(r"(?:[0-9a-f]{2}){12,}|(?:[0-9A-F]{2}){12,}")
_HEX_TEXT = re.compile(r"(?:[2-7][0-9a-f]|0[9ad]){12,}|(?:[2-7][0-9A-F]|0[9AD]){12,}")  # (_ENCODED_TEXT's hex)
# base64 of text, at any offset inside a longer run: 4 groups of 4 characters or more, each as _ENCODED_TEXT's (the
# leftmost 4 in a row at an alignment start its text: a group before them would have made them start earlier)
_TEXT_GROUPS = re.compile(r"(?:[CDI-Za-f][A-HQ-Xg-nw-z0-3][ABEFIJMNQRUVYZcdghklopstwx014589][A-Za-z0-9+/_\-]){4,}")
_TEXT_GROUPS_LONG = 32  # characters: groups of text this many in a row are the run's text (searched on past them)
# UTF-8 text: printable ASCII, tabs, line breaks and well-formed sequences (a first test without an exception; the
# characters beyond ASCII are then checked to be printable once decoded)
_UTF8_TEXT = re.compile(rb"(?:[\t\n\r\x20-\x7e]|[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                        rb"|[\xf0-\xf4][\x80-\xbf]{3})*")
_LINE_BREAKS = str.maketrans("", "", "\t\n\r")


def _other_encoded_spans(text: str, at: int, done: int, end: int, depth: int, spans: list[tuple[int, int]]) -> int:
    """Add to ``spans`` the base64 or hex holding a secret in the run of base64's alphabet around ``at`` (after
    ``done``) that is no whole run of ASCII text: the whole run as UTF-8 text (``contraseña: ...``, a Cyrillic or
    CJK message: its bytes beyond ASCII are no text's by _ENCODED_TEXT's classes), and base64 of text glued to
    other characters of the alphabet (``x_<run>``, a path's segment after "/", ``<run>x9``, or a run whose first 16
    characters hold "+/-_"): its start or end was not known and the run was not decoded. ``end``: the run's end
    (returned)."""
    start = at
    lowest = max(done, at - _ENCODED_TEXT_MAX)
    while start > lowest and text[start - 1] in _B64_CHARS:
        start -= 1
    run = text[start:min(end, start + _ENCODED_TEXT_MAX)]
    raw = _decoded_run(run, _HEX_RUN.fullmatch(run) is not None)
    if raw is not None and not raw.isascii() and _UTF8_TEXT.fullmatch(raw) is not None:
        with contextlib.suppress(UnicodeDecodeError):  # (an overlong form or a surrogate)
            decoded = raw.decode("utf-8")
            if decoded.translate(_LINE_BREAKS).isprintable() and _holds_secret(decoded, depth):
                spans.append((start, end))
                return end
    pos = start
    while (found := _TEXT_GROUPS.search(text, pos, end)) is not None:
        stop = min(found.end() + 3, end)  # with the last group's 2 or 3 characters and its padding
        raw = _decoded_run(text[found.start():stop], False)
        if raw is not None and _holds_secret(raw.decode("ascii", "replace"), depth):
            while stop < end and text[stop] == "=":
                stop += 1
            spans.append((found.start(), stop))
            pos = stop
        else:  # (a few short ones may be chance, at another alignment than the text's: the next position too)
            pos = found.end() if found.end() - found.start() >= _TEXT_GROUPS_LONG else found.start() + 1
    pos = start
    # hex of text glued to other letters or digits (``id<hex>``, ``x_<hex>zz``, a path's segment): pairs of text's
    # bytes from where they begin (the glue's last character may make one pair more at another alignment: the next
    # position is tried when that one holds nothing)
    while (found := _HEX_TEXT.search(text, pos, end)) is not None:
        raw = _decoded_run(found.group(), True)
        if raw is not None and _holds_secret(raw.decode("ascii", "replace"), depth):
            spans.append(found.span())
            pos = found.end()
        else:
            pos = found.start() + 1
    return end


def _redact_bare_credentials(text: str) -> str:
    """``text`` with the password of each ``user:password@host`` written without a scheme replaced
    (a password of letters alone is taken for an address: ``Contact:alice@example.org``)."""
    spans = _bare_credential_spans(text)
    return _replaced(text, spans, REDACTED) if spans else text


def _bare_credential_spans(text: str) -> list[tuple[int, int]]:
    """Where the passwords of ``user:password@host`` written without a scheme are in ``text``."""
    spans = []
    for match in _BARE_CREDENTIALS.finditer(text):
        at = match.start()
        user = _BARE_USER.search(text, max(0, at - 65), at)
        if user is not None and user.group().lower() not in _NOT_USERS:
            spans.append(match.span("pw"))
    return spans


def _redact_oracle_logins(text: str) -> str:
    """``text`` with the password of each Oracle ``user/password@service`` login replaced."""
    spans = []
    for index, match in enumerate(_ORACLE_LOGIN.finditer(text)):
        if index == 0:  # once, at the first: no word, no login (one regex of the 14 words cost 10 ms per 64 KiB)
            lower = text.lower()
            if not any(word in lower for word in _ORACLE_WORD_PARTS):
                return text
        at = match.start()
        if _ORACLE_USER_BEFORE.match(text[max(0, at - 120):at][::-1]) is not None:
            spans.append(match.span("pw"))
    return _replaced(text, spans, REDACTED) if spans else text


# Pieces of long registered secrets (a PEM private key, a service account's JSON, an Azure AD token: 1-20 K
# characters) as a text may hold them: the head of one cut by a client's own length limit, a part quoted in a
# message. Matched whole only, 1,024 characters and more of a 5,000-character key cut at 4,096 were shown. Each
# secret of _PIECED_MIN characters or more is indexed by a piece of _PIECE characters in each block of _PIECE (the
# one starting at the block's first digit, holding a letter too: not a JSON key's or a PEM header's words, which
# other texts share), so a part of 3 * _PIECE characters or more holds one whole; a piece found is widened to all
# the text that goes on as its secret does. A piece starts with a digit so that the search skips every other
# character at C speed: pieces at every multiple of _PIECE, their first characters as varied as base64's, cost
# 0.26 ms per 2 KB of prose with 4 PEM keys registered (a digit first: 0.01 ms). Secrets shorter than _PIECED_MIN
# (API keys) cost nothing more. Like encoded forms, only the first _ENCODED_MAX secrets of that size are indexed
# (an application's few keys and documents, not a service's tokens of every hour).
_PIECE = 32
_PIECED_MIN = 512
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")
# (the _known dict indexed, how many of its values, piece -> [(secret, offset)], their pattern)
_piece_state: tuple[Any, int, dict[str, list[tuple[str, int]]], re.Pattern[str] | None] = (None, 0, {}, None)
_pieced_max_len = 0  # the longest secret registered, past _PIECED_MIN (0: no pieces, nothing searched)


def _piece_index() -> tuple[dict[str, list[tuple[str, int]]], re.Pattern[str] | None]:
    """The pieces of the registered secrets (see _PIECE), extended with those registered since the last call."""
    global _piece_state
    known, count, index, pattern = _piece_state
    current = _known
    if known is current and count == len(current):
        return index, pattern
    with _lock:
        if known is not current or count > len(current):  # another registry (a test's copy): indexed afresh
            count, index = 0, {}
        else:
            index = {piece: list(places) for piece, places in index.items()}
        grew = False
        indexed = len({secret for places in index.values() for secret, _ in places})
        for value in itertools.islice(current, count, None):
            if len(value) < _PIECED_MIN or value in _forms or indexed >= _ENCODED_MAX:
                continue  # (an encoded form: its secret is indexed)
            indexed += 1
            for block in range(0, len(value) - _PIECE + 1, _PIECE):
                digit = _DIGIT.search(value, block, block + _PIECE)
                offset = digit.start() if digit is not None else len(value)
                piece = value[offset:offset + _PIECE]
                if len(piece) == _PIECE and _LETTER.search(piece) is not None:
                    index.setdefault(piece, []).append((value, offset))
                    grew = True
        if grew or known is not current:
            pattern = _compile(index) if index else None
        _piece_state = (current, len(current), index, pattern)
        return index, pattern


def _replace_pieces(text: str) -> str:
    """``text`` with every part of a long registered secret that holds one of its pieces replaced (see _PIECE)."""
    index, pattern = _piece_index()
    if pattern is None:
        return text
    spans: list[tuple[int, int]] = []
    reach = 0
    for found in pattern.finditer(text):
        start, end = found.span()
        if start < reach:
            continue  # inside a part replaced already
        best = (start, end)
        for secret, offset in index.get(found.group(), ()):
            # widen: back while the text goes on as the secret (under one piece), then forwards (binary search)
            back = 0
            while back < min(start, offset) and text[start - back - 1] == secret[offset - back - 1]:
                back += 1
            low, high = 0, min(len(text) - end, len(secret) - offset - _PIECE)
            while low < high:
                middle = (low + high + 1) // 2
                if text[end:end + middle] == secret[offset + _PIECE:offset + _PIECE + middle]:
                    low = middle
                else:
                    high = middle - 1
            if end + low - (start - back) > best[1] - best[0]:
                best = (start - back, end + low)
        spans.append(best)
        reach = best[1]
    return _replaced(text, spans, REDACTED) if spans else text


def _replace_known(known: re.Pattern[str] | _Patterns, text: str) -> str:
    replaced = known.sub(REDACTED, text)
    if replaced is not text:  # a known secret was there (re returns the very text otherwise)
        replaced = _with_overlapping_shapes(known, text, replaced)
    return replaced


def _with_overlapping_shapes(known: re.Pattern[str] | _Patterns, text: str, replaced: str) -> str:
    """``text`` with its known secrets replaced (``replaced``), and also each key shape that
    overlaps one of them: a learned secret that is a key's start (``sk-proj-``, learned from a
    key cut right after it) would otherwise leave the rest of every later key of that shape
    unmatched, its random part shown whole after ``[REDACTED]``."""
    shapes = [_SECRET_SHAPES, *(shape for hint, shape in _GATED_SHAPES if hint in text)]
    found = [m.span() for shape in shapes for m in shape.finditer(text)]
    if not found:
        return replaced
    patterns = known.patterns if isinstance(known, _Patterns) else (known,)
    secrets = [m.span() for pattern in patterns for m in pattern.finditer(text)]
    if not any(s < b and a < e for a, b in found for s, e in secrets):
        return replaced  # side by side: replaced one after the other, as before
    return _replaced(text, secrets + found, REDACTED)


def _unescaped(pattern: re.Pattern[str], known: re.Pattern[str] | _Patterns | None, text: str) -> str:
    """``text`` with ``pattern``'s escapes decoded; a known secret that holds such an escape
    itself (a password ``x%5fy``) is replaced before, or decoding would hide it."""
    unescape = _unescape_html if pattern is _HTML_ESCAPED else _unescape
    decoded = pattern.sub(unescape, text)
    if decoded == text or known is None:
        return decoded
    return pattern.sub(unescape, _replace_known(known, text))


def _unescape_html(match: re.Match[str]) -> str:
    """:func:`_unescape` for an HTML character reference, hexadecimal, decimal or a quote's name; a quote is decoded
    too (HTML-escaped text holds no quote of its own: the decoded one is a key's or a value's)."""
    if match.group(3):
        return _HTML_QUOTES[match.group(3)]
    hexadecimal = match.group(1)
    char = chr(int(hexadecimal, 16) if hexadecimal else int(match.group(2)))
    return char if char in _PLAIN_CHARS or char in "\"'" else match.group()


def _unescape(match: re.Match[str]) -> str:
    """The character an escape stands for when keys are made of it; other escapes (quotes,
    backslashes, separators) stay, so JSON stays JSON and no match runs across items."""
    code = match.group(1)
    if code is None:
        return "/"
    char = chr(int(code, 16))
    return char if char in _PLAIN_CHARS else match.group()


_caches: list[RedactionCache] = []


class _Memo:
    __slots__ = ("chars", "entries", "known")

    def __init__(self, known: re.Pattern[str] | _Patterns | None) -> None:
        self.known = known
        self.entries: dict[str, str] = {}
        self.chars = 0


class RedactionCache:
    """Memo of :func:`redact` for strings that come back again and again (a chat's message
    history is sent on every LLM call; attribute values repeat across spans).

    Each memo belongs to the set of known secrets it was computed with: registering or
    learning a new secret makes the next lookup start an empty memo, so a cached result
    never lets a secret through. Strings longer than ``max_len`` are not memoised; the memo
    is emptied when its keys and values exceed ``max_chars`` characters in total (a memory
    bound).
    """

    __slots__ = ("_memo", "max_chars", "max_len", "names")

    def __init__(self, max_len: int, max_chars: int, names: bool = False) -> None:
        self.max_len = max_len
        self.max_chars = max_chars
        self.names = names  # results cut by bounded_name, made encodable (a memo hit is returned as stored)
        self._memo = _Memo(_known_pattern)
        _caches.append(self)  # module-level singletons: emptied when a whole piece is learned

    def entries(self) -> dict[str, str]:
        """The memo for the currently known secrets: text -> redacted text (read-only use)."""
        return self._current().entries

    def _current(self) -> _Memo:
        memo = self._memo  # one read: another thread may replace it at any time
        known = _known_pattern
        if memo.known is not known:
            memo = self._memo = _Memo(known)
        return memo

    def redact(self, text: str) -> str:
        """``redact(text)``, memoised."""
        memo = self._memo  # a hit of the current memo first: the memo holds no empty or over-long text
        if memo.known is _known_pattern:
            out = memo.entries.get(text)
            if out is not None:
                return out
        if not text:
            return text
        if len(text) > self.max_len:
            out = _redact_with(_known_pattern, text[:_scan_bound()] if self.names else text)
            return bounded_name(encodable(out)) if self.names else out
        memo = self._current()
        out = memo.entries.get(text)
        if out is None:
            # the secrets this memo stands for (or newer ones learned from this very text)
            out = _redact_with(memo.known, text)
            if self.names:
                out = bounded_name(encodable(out))
            if memo.known is not _known_pattern:
                return out  # learned something: this memo is stale, the next lookup starts afresh
            memo.chars += len(text) + len(out)
            if memo.chars > self.max_chars:
                memo = self._memo = _Memo(memo.known)
                memo.chars = len(text) + len(out)
            memo.entries[text] = out
        return out


# message histories: every string of every message, on every LLM call with content capture on
_scrub_cache = RedactionCache(max_len=8192, max_chars=4_000_000)
# JSON texts of list items (a chat's messages), for redact_list
_item_cache = RedactionCache(max_len=8192, max_chars=4_000_000)
# names the application or a provider chooses (agents, models): few, asked on every call
_name_cache = RedactionCache(max_len=4096, max_chars=1_000_000, names=True)


def redact_name(name: str) -> str:
    """:func:`redact` and :func:`bounded_name` for a name (an agent's, a model's, a finish reason),
    memoised: an agent named, or a model written, with a key in it (``gpt-4o?api_key=...``) went
    into span names, attributes and rows, and a model server's 1 MB model name went whole onto
    every model-call metric."""
    return _name_cache.redact(name) if type(name) is str else name


# redact_name for a text whose type is exactly ``str`` (a response's model, on every model call): the memo's own
# method, one Python call less
redact_str_name: Callable[[str], str] = _name_cache.redact


MAX_NAME = 256


def bounded_name(name: str) -> str:
    """``name`` (an agent's or tool's: the app's or the model's text) cut to :data:`MAX_NAME`
    characters, a hash of the whole keeping cut names apart: a 1 MiB name was copied whole into
    span names, attributes and several DB columns per span."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{name[:MAX_NAME - 16]}...{digest}"


def encodable(text: str) -> str:
    """``text`` with lone surrogates as ``\\xNN`` / ``\\udNNN`` escapes: an environment value holding
    bytes that are not UTF-8 (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) is kept by Python
    as surrogates, and a model server's JSON may hold ``"\\ud800"``; the OTLP encoder refuses them: it
    logged a traceback for every batch and sent the spans without that attribute (``service.name``
    lost), or failed the batch (a span name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate no byte became (not from the OS)
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# An id as model servers write them: a provider's prefix or none (OpenAI's chatcmpl-/call_, Anthropic's
# toolu_/msg_, the Responses API's resp_/fc_, Bedrock's tooluse_; Mistral's bare ids) then letters and digits
# or a UUID (Groq's, vLLM's); no key shape starts with such a prefix, and none is letters and digits alone
# with a "-" or "_" after the prefix (sk-proj-..., ghp_..., gsk_...)
# (of the key shapes only Google's, AIza + letters and digits, and AWS's access key ids, AKIA/ASIA + 16
# upper-case letters and digits, can be an ordinary id's letters and digits: both sent to the full path,
# in the same one look-ahead of the same one match)
_ORDINARY_ID = re.compile(r"(?!.*(?:AIza|A[KS]IA[0-9A-Z]{16}))"
                          r"(?:(?:chatcmpl|call|toolu|tooluse|msg|resp|fc|run|req|cmpl)[_\-])?"
                          r"(?:[A-Za-z0-9]{1,64}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})")


def redact_id(value: str) -> str:
    """:func:`redact` and :func:`bounded_name` for an id a model server writes (a response's, a tool
    call's), read to :func:`_scan_bound` characters. Unique per call, so never memoised; an ordinary id
    (see ``_ORDINARY_ID``: at most 77 characters) holding no registered secret and no key shape is
    returned as it is, after two searches in C (a server knows the key it was sent and may echo it)."""
    if _ORDINARY_ID.fullmatch(value) is not None:
        known = _known_pattern
        if known is None or known.search(value) is None:
            return value
    return bounded_name(encodable(_redact_with(_known_pattern, value[:_scan_bound()])))


def redact_list(items: Sequence[str]) -> str:
    """``redact("[" + ", ".join(items) + "]")`` for ``items``, the JSON texts of a list's items (a
    chat's messages, sent again on every model call): each item's text redacted once per set of
    known secrets (a memo, emptied when a secret is learned, like :class:`RedactionCache`'s).

    The same text exactly: redacting the whole joined text is redacting each item alone when no
    match can cross from one item into the next, and the whole text is redacted instead when one
    could (see :func:`_joins_safely`, :func:`_item_flag`), or when an item teaches a new secret
    (the items before it were redacted without it).
    """
    return redact_list_from(items, None)[0]


def redact_list_from(items: Sequence[str], prior: tuple[Any, Any, list[str]] | None) -> tuple[str, Any]:
    """(:func:`redact_list` of ``items``, a state for a later call whose items begin with these).

    ``prior``: the state a call returned for ``items[:n]``, the same texts (a chat's history
    rendered again, grown by a few messages): the first ``n`` items' redactions are reused when the
    known secrets and learned pieces are still those they were made with, so only the new items
    are looked at. The state is ``None`` when the items cannot be resumed from (an item that is
    not a closed JSON object, the whole text redacted instead, a secret learned meanwhile)."""
    known, context = _known_pattern, _context_pattern
    if items and _joins_safely(known, context):
        redact_item = _item_cache.redact
        flags = _item_flags
        start = 0
        out: list[str] = []
        if prior is not None and prior[0] is known and prior[1] is context and len(prior[2]) <= len(items):
            out = list(prior[2])  # every one of them flagged _JOINS
            start = len(out)
        joins = True
        last = len(items) - 1
        for index in range(start, last + 1):
            item = items[index]
            flag = flags.get(item)
            if flag is None:
                flag = _item_flag(item)
            if flag is not _JOINS:
                if flag is _CROSSES or index != last:
                    break
                joins = False
            out.append(redact_item(item))
        else:
            if _known_pattern is known and _context_pattern is context:
                return "[" + ", ".join(out) + "]", (known, context, out) if joins else None
    return redact("[" + ", ".join(items) + "]") or "[]", None


def redact_list_tail(state: tuple[Any, Any, list[str]] | None, start: int, head: str | None) -> str | None:
    """:func:`redact_list` of ``[head, *items[start:]]`` (``head`` left out when ``None``) where
    ``state`` is what :func:`redact_list_from` returned for ``items``: a history's newest messages
    and one older message cut to fit, redacted again only where ``head`` is concerned. ``None``
    when the state is stale (a secret learned since) or ``head`` cannot be joined that way."""
    known, context = _known_pattern, _context_pattern
    if state is None or state[0] is not known or state[1] is not context:
        return None
    out = state[2][start:]
    if head is not None:
        flag = _item_flags.get(head)
        if flag is None:
            flag = _item_flag(head)
        if flag is _CROSSES or (flag is _OPEN and out):
            return None
        out.insert(0, _item_cache.redact(head))
        if _known_pattern is not known or _context_pattern is not context:
            return None
    return "[" + ", ".join(out) + "]" if out else None


# The joined text differs from its items only at "[", "]" and the ", " between two items, which
# every item (a JSON object) meets with "{" or "}". Fixed patterns never match across those:
# secret shapes, URL credentials, key/value names exclude the characters; what can, is below.
_JOINS, _OPEN, _CROSSES = "joins", "open", "crosses"
_item_flags: dict[str, str] = {}
_ITEM_FLAGS_MAX = 4096
_QUOTE_START = re.compile(r"""\\*["']""")
_join_state: tuple[Any, Any, bool] = (None, None, True)
_PATTERN_MARKS = (",", "[", "]", "{")


def _item_flag(item: str) -> str:
    """Whether a redaction match can start in ``item`` and end past it (depends on the text alone):
    ``_CROSSES`` for an item that is no JSON object, holds a private key's start (its pattern runs
    to the end of the text when the END line is missing) or a character whose lower case is longer
    (the joined text's key/value scan then lower-cases only ASCII); ``_OPEN`` for an item with a
    secret-named key whose quoted value does not close in it (in the joined text the value runs
    on to the next such quote, in a later item)."""
    flag = _JOINS
    if item[:1] != "{" or item[-1:] != "}" or "PRIVATE KEY-----" in item:
        flag = _CROSSES
    else:
        lower = item.lower()
        if len(lower) != len(item):
            flag = _CROSSES
        elif _kv_open(item, lower):
            flag = _OPEN
    if len(item) <= _item_cache.max_len:
        if len(_item_flags) >= _ITEM_FLAGS_MAX:
            _item_flags.clear()  # a bound, not a cache policy
        _item_flags[item] = flag
    return flag


def _kv_open(text: str, lower: str) -> bool:
    """Whether a secret-named key in ``text`` (as :func:`_kv_scan` finds them) is followed by a
    quote whose value does not close in ``text``. Each run of name characters is matched once,
    as :func:`_kv_scan` does (matched from every hint, ``"key" * 13000 + ":"`` took 32 s)."""
    starts = _hint_starts(text, lower)
    run_end = prev = -1
    key: re.Match[str] | None = None
    open_value = False
    memo: dict[Any, Any] = {}
    for at in starts:
        if at < run_end:  # the same run, the same value: only a short name after a non-ASCII letter
            if key is None or not open_value or run_end - at > _SHORT_NAME_MAX or text[prev:at].isascii():
                continue
        else:
            key = _KV_KEY.match(text, at)
            run_end = key.end("name") if key is not None else _NAME_RUN.match(text, at).end()
            if key is None:
                continue
            end = key.end()
            open_value = _QUOTE_START.match(text, end) is not None and _kv_value(text, end, memo) is None
            if not open_value:
                continue
        prev = at
        name_start = at
        while name_start > 0 and text[name_start - 1] in _NAME_CHARS:
            name_start -= 1
        if is_secret_key(text[name_start:run_end]):
            return True
    return False


def _joins_safely(known: re.Pattern[str] | _Patterns | None, context: re.Pattern[str] | None) -> bool:
    """Whether no known secret and no learned piece's context can match across two items: none
    holds ",", "[", "]" or "{" (read from the compiled patterns themselves, so the answer belongs
    to the very patterns it was computed from)."""
    global _join_state
    state = _join_state
    if state[0] is known and state[1] is context:
        return state[2]
    patterns: list[re.Pattern[str]] = []
    if isinstance(known, _Patterns):
        patterns.extend(known.patterns)
    elif known is not None:
        patterns.append(known)
    if context is not None:
        patterns.append(context)
    safe = not any(mark in pattern.pattern for pattern in patterns for mark in _PATTERN_MARKS)
    _join_state = (known, context, safe)
    return safe
_secret_key_names: dict[str, bool] = {}


def is_secret_key(name: str) -> bool:
    """Whether a dict key or attribute name holds a secret (``api_key``, ``*token``,
    ``*password*``, ``*secret*``, ``authorization``, ``cookie``, ...)."""
    known = _secret_key_names.get(name)
    if known is None:
        # a name padded with white space is the same name ("Authorization " in tool arguments:
        # no key/value scan of the text took its value either)
        stripped = name.strip()
        known = bool(_SECRET_KEY_NAME.match(name) or _SECRET_KEY_NAME.match(stripped)
                     or (_ENV_STYLE_SECRET_NAME.fullmatch(stripped) is not None and not _names_data_key(stripped))
                     or _holder_secret_name(stripped)
                     # words apart ("API key", "Private Key"): the name joined as an identifier would be
                     or (" " in stripped and _SECRET_KEY_NAME.match(_BLANKS.sub("_", stripped))))
        if len(name) > 256:  # a name that long is data, not a key: never kept (memory bound)
            return known
        if len(_secret_key_names) >= 4096:
            _secret_key_names.clear()
        _secret_key_names[name] = known
    return known


def scrub(value: Any, _depth: int = 0) -> Any:
    """Deep copy of ``value`` with secret-named keys' values replaced (and learned) and
    strings (keys too) redacted."""
    if _depth > 20:
        return "[too deep]"
    if isinstance(value, str):
        return _scrub_string(value) if type(value) is not SentBytes else _scrub_sent(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            _scrub_entry(out, key, item, _depth)
        if "value" in value and _names_a_secret(value):
            learn_secrets_in({"password": value["value"]})
            out["value"] = REDACTED
        return out
    if isinstance(value, (list, tuple)):
        return [scrub(item, _depth + 1) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(repr(value))


# the keys of the GenAI message schema's dicts (instrumentation._messages builds them), those that
# are no secret-named key (all of them: checked here, not assumed)
_SCHEMA_KEYS = frozenset(key for key in ("role", "parts", "name", "type", "content", "id", "modality", "uri",
                                         "finish_reason", "response", "arguments")
                         if not _SECRET_KEY_NAME.match(key))


def scrub_message(value: Any) -> Any:
    """:func:`scrub` of a message in the GenAI schema (a dict of role, parts, name, finish reason;
    its parts dicts of type, content, id, name): the same copy, its strings redacted in the same
    order (what one teaches applies to the next alike), with the schema's own keys not decided
    again and its strings not walked through :func:`scrub` one call each. Any other value, key or
    part is scrubbed as :func:`scrub` does."""
    if type(value) is not dict:
        return scrub(value)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is str and key in _SCHEMA_KEYS:
            if type(item) is str:
                out[key] = _scrub_string(item)
                continue
            if type(item) is list and key == "parts":
                out[key] = [_scrub_part(part) for part in item]
                continue
        _scrub_entry(out, key, item, 0)
    return out


def _scrub_part(part: Any) -> Any:
    """``scrub(part, 2)`` (a message's part: the message, its list of parts, the part)."""
    if type(part) is not dict:
        return scrub(part, 2)
    out: dict[str, Any] = {}
    for key, item in part.items():
        if type(item) is str and type(key) is str and key in _SCHEMA_KEYS:
            out[key] = _scrub_string(item)
        else:
            _scrub_entry(out, key, item, 2)
    return out


def _scrub_string(value: str) -> str:
    """:func:`scrub` of a string: redacted, cut past the scan bound."""
    if len(value) <= _SCAN_MIN:  # within every scan bound (_scan_bound() is at least this)
        return _scrub_cache.redact(value)
    bound = _scan_bound()
    return _scrub_cache.redact(value if len(value) <= bound else value[:bound] + "...[truncated]")


def _scrub_entry(out: dict[str, Any], key: Any, item: Any, depth: int) -> None:
    """One entry of :func:`scrub`'s dict branch, the dict at ``depth``: a secret-named key's value
    learned and replaced, any other value scrubbed; the key itself redacted as any text (an ingest
    client's key/value list can hold a secret in a key: that went into the rows' meta as sent)."""
    skey = str(key)
    secret = _secret_key_names.get(skey)  # is_secret_key's memo hit written out: every key of every dict
    if secret is None:
        secret = is_secret_key(skey)
    if secret and not _holds_no_secret(skey, item):
        learn_secrets_in({skey: item})
        out[_scrub_string(skey)] = REDACTED
    else:
        out[_scrub_string(skey)] = scrub(item, depth + 1)


_dumps = compact_encoder(repr, ensure_ascii=False)  # scrub() output is acyclic


def safe_text(value: Any, limit: int | None = None) -> str | None:
    """``value`` as bounded, redacted, encodable text; ``None`` if it cannot be rendered at all.

    Lone surrogates (bytes that are not UTF-8 in a path, an argument or an environment value, as Python
    keeps them) are escaped, as the OTLP encoder refuses them (the attribute dropped, a traceback logged):
    in text as ``\\xNN`` (:func:`encodable`), in the JSON rendering of other values as JSON's own
    ``\\udcNN`` escape, so that it stays JSON."""
    try:
        if value is None:
            return None
        if isinstance(value, str):
            bound = max(_scan_bound(), limit or 0)
            text = value if len(value) <= bound else value[:bound]
            out = redact(text)
            # escaped before the cut: an escape is 4 to 6 characters, so escaping after it made a
            # text of lone surrogates up to 6 times the bound
            return truncate(out if out.isascii() else encodable(out), limit)
        if isinstance(value, (list, tuple)):
            out = _redacted_json_list(value, limit or _max_len)
        else:
            out = redact(_dumps(scrub(value)))
        return truncate(out if out.isascii() else _json_encodable(out), limit)
    except Exception:
        return None


def _json_encodable(text: str) -> str:
    """JSON ``text`` with its lone surrogates as JSON escapes (``\\udcff``): still the same JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _redacted_json_list(items: list[Any] | tuple[Any, ...], bound: int) -> str:
    """``redact(json.dumps(scrub(items)))``, or a prefix of it longer than ``bound`` (the
    caller truncates there anyway), so a long message history is not scrubbed and
    serialised in full on every LLM call.

    Exact: the items left out are still walked for the secrets ``scrub`` and ``redact``
    would learn from them (values under secret-named keys, ``key: value`` text), so a
    secret stated in a later message is redacted in the prefix as well; and no redaction
    match can run across the ", " between two items (secret shapes exclude both characters,
    key/value matches containing it are skipped; a registered secret containing a comma
    turns the shortcut off), so redacting a prefix that ends between items gives a prefix
    of redacting the whole.
    """
    parts: list[str] = []
    size = 1
    check_at = bound + 16
    for index, item in enumerate(items):
        parts.append(_dumps(scrub(item, 1)))
        size += len(parts[-1]) + 2
        if size > check_at and not _secret_with_comma:
            memo = _scrub_cache.entries()
            for rest in items[index + 1:]:
                _learn_ahead(rest, 1, memo)
            if _secret_with_comma:
                continue  # learned a value with a comma: no shortcut
            prefix = redact("[" + ", ".join(parts)) or ""
            if len(prefix) > bound:
                return prefix
            check_at = size * 2  # redaction shrank it below the bound: look again further on
    return redact("[" + ", ".join(parts) + "]") or ""


def learn_secrets_ahead(values: Iterable[Any]) -> None:
    """Learn what :func:`scrub` and :func:`redact` would learn from ``values`` without copying
    them: for items left out of a bounded rendering, so a secret they state is still redacted
    where it appears in the items kept. Never raises."""
    with contextlib.suppress(Exception):
        memo = _scrub_cache.entries()
        for value in values:
            if value is not None and not isinstance(value, (bool, int, float)):
                _learn_ahead(value, 1, memo)


def _learn_ahead(value: Any, depth: int, memo: dict[str, str]) -> None:
    """Learn the secrets :func:`scrub` and :func:`redact` would learn from ``value``, without
    copying it (``memo``: strings redacted already, with nothing left to learn)."""
    if depth > 20:
        return
    if isinstance(value, str):
        if value not in memo:
            _scrub_cache.redact(value)
    elif isinstance(value, dict):
        if "value" in value and _names_a_secret(value):
            learn_secrets_in({"password": value["value"]})
        for key, item in value.items():
            skey = str(key)
            if is_secret_key(skey) and not _holds_no_secret(skey, item):
                learn_secrets_in({skey: item})
                continue
            if skey not in memo:
                _scrub_cache.redact(skey)
            if item is not None and not isinstance(item, (bool, int, float)):
                _learn_ahead(item, depth + 1, memo)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if item is not None and not isinstance(item, (bool, int, float)):
                _learn_ahead(item, depth + 1, memo)
    elif value is not None and not isinstance(value, (bool, int, float)):
        _kv_scan(repr(value), learn=True)


_SPLIT_WINDOW = 256  # characters each side of a boundary searched for a secret that crosses it
_longest_known = 0
# boundaries (text, next text) found clean with the secrets known then: a chat's history is
# sent again on every model call, each boundary is searched once (key None: those secrets)
_split_checked: dict[Any, Any] = {}
_SPLIT_CHECKED_MAX = 2048
_SPLIT_CACHED_CHARS = 4096
# registered secrets by their first and last _MIN_SECRET_LEN characters (see _learn_edges)
_heads: dict[str, list[str]] = {}
_tails: dict[str, list[str]] = {}


def _note_length(value: str) -> None:
    global _longest_known, _pieced_max_len
    _longest_known = max(_longest_known, len(value))
    if len(value) >= _PIECED_MIN:
        _pieced_max_len = max(_pieced_max_len, len(value))


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every registered, learned or secret-shaped token in ``text``."""
    known = _known_pattern
    patterns: list[re.Pattern[str]] = [_SECRET_SHAPES]
    if isinstance(known, _Patterns):
        patterns.extend(known.patterns)
    elif known is not None:
        patterns.append(known)
    patterns.extend(shape for hint, shape in _GATED_SHAPES if hint in text)
    return [m.span() for pattern in patterns for m in pattern.finditer(text)]


def learn_split_secrets(texts: Iterable[Any]) -> None:
    """Learn the pieces of a secret split across consecutive texts (content parts of a message,
    messages, streamed chunks): each piece alone is no known secret and no secret shape, so
    without this every piece reached telemetry. A secret may cross several texts (split in three
    or more). Pieces of ``_MIN_SECRET_LEN`` or more characters are learned and redacted wherever
    they appear; a shorter piece through the characters around it in its own text (see
    :func:`_learn_piece`). A text ending in the incomplete start of a key shape (``sk-ab``) is
    remembered, so that a later text of the same call, or the first text of a later call,
    continuing it is caught (the key split across messages that are not next to each other, or
    across two model calls). Texts holding ``%XX`` or ``\\u00XX`` escapes are searched decoded
    too (a key escaped in a URL and cut in two). Never raises."""
    with contextlib.suppress(Exception):
        learn_split_texts([text for text in texts if isinstance(text, str) and text])


def learn_split_texts(texts: list[str]) -> None:
    """:func:`learn_split_secrets` of ``texts``, already the non-empty strings alone (a list the
    caller keeps and never changes: the search remembers it to resume from). Never raises."""
    with contextlib.suppress(Exception):
        escaped = _learn_split(texts, True)
        if escaped is not None:  # from the text before the first newly searched one with escapes
            decoded = _decoded_texts(texts[max(escaped - 1, 0):])
            if decoded != texts[max(escaped - 1, 0):]:
                _learn_split(decoded, False)


# the start of an escape cut by the end of a text (``%2`` | ``D...``, ``\u00`` | ``2d...``)
_CUT_ESCAPE = re.compile(r"(?:%[2-7]?|\\(?:u(?:0(?:0[2-7]?)?)?)?)\Z")


def _decoded_texts(texts: list[str]) -> list[str]:
    """:func:`_decoded` of each text; an escape cut by a text's end is completed from the next
    text and decoded in the first (each text alone keeps both parts escaped: the key's pieces
    on either side of it were never decoded into one)."""
    out = []
    skip = 0
    for index, text in enumerate(texts):
        if skip:
            text, skip = text[skip:], 0
        cut = _CUT_ESCAPE.search(text, max(0, len(text) - 5)) if index + 1 < len(texts) else None
        if cut is not None:
            part = cut.group()
            whole = part + texts[index + 1][:6 - len(part)]
            escape = (_URL_ESCAPED if part[0] == "%" else _JSON_ESCAPED).match(whole)
            if escape is not None and escape.end() > len(part):
                skip = escape.end() - len(part)
                text += texts[index + 1][:skip]
        out.append(_decoded(text))
    return out


def _decoded(text: str) -> str:
    """``text`` with its escapes of key characters decoded (as :func:`redact` searches it)."""
    if "\\" in text:
        text = _JSON_ESCAPED.sub(_unescape, text)
    if "%" in text:
        text = _URL_ESCAPED.sub(_unescape, text)
    if "&#" in text or "&quot;" in text or "&apos;" in text:
        text = _HTML_ESCAPED.sub(_unescape_html, text)
    return text


def _learn_split(texts: list[str], resume: bool) -> int | None:
    """The search of :func:`learn_split_secrets`; returns the index of the first text searched
    (not found in the memo) that holds an escape, if any. ``resume``: remember where it got to
    (the decoded pass does not, it would push the texts as written out of that memo)."""
    escaped = None
    with contextlib.suppress(Exception):
        checked = _split_checked
        known = _known_pattern
        if checked.get(None) is not known:  # the secrets changed: every boundary is looked at again
            _clear_split_checked()
        if not texts:
            return
        if _open_fragments:
            _continue_fragments(texts[0])
        window = max(_SPLIT_WINDOW, _longest_known)
        generation = _split_generation
        chain: list[tuple[str, bool]] = []  # (text, fits the window) of the previous texts that reach into it
        originals: tuple[str, ...] | None = ()  # those texts, the memo's key (None: one is too long to keep)
        size = 0  # characters in chain
        start = 0
        resumes = _split_resume.get(texts[0], ())
        for resume in resumes:  # the longest searched texts that begin these
            done = resume[3]
            if start < len(done) <= len(texts) and resume[0] == generation and resume[1] is known \
                    and resume[2] == window and texts[:len(done)] == done:
                start, chain, originals, size = len(done), list(resume[4]), resume[5], resume[6]
        all_small = True
        for index, text in enumerate(texts[start:] if start else texts, start):
            small = len(text) <= _SPLIT_CACHED_CHARS  # a memo holding long texts would hold memory
            if not (small and text in checked):
                if escaped is None and ("%" in text or "\\" in text or (index and _CUT_ESCAPE.search(
                        texts[index - 1], max(0, len(texts[index - 1]) - 5)))):  # the rest of a cut escape
                    escaped = index
                if _open_fragments and text is not texts[0]:
                    _continue_fragments(text)  # a key whose start ended an earlier text, not only the one before
                if _heads:
                    _learn_edges(text)
                _learn_open_fragment(text)
                if _learned_forms:  # a model's message quoting a learned password base64-encoded
                    learn_encoded_in(text)
                if small:
                    checked[text] = None
                else:
                    all_small = False
            if chain:
                key = (*originals, text) if small and originals is not None else None
                if key is None or key not in checked:
                    _learn_across(chain, text, window)
                    if key is not None:
                        checked[key] = None
            if len(checked) > _SPLIT_CHECKED_MAX:
                _clear_split_checked()
            if len(text) >= window:  # it fills the window alone
                chain = [(text, len(text) == window)]
                originals = (text,) if small else None
                size = window
            else:
                chain.append((text, True))
                originals = (*originals, text) if originals is not None else None
                size += len(text)
                while size - min(len(chain[0][0]), window) >= window:
                    size -= min(len(chain.pop(0)[0]), window)
                    originals = originals[1:] if originals is not None else None
        # every text and boundary searched is in the memo now: the next call sending the same texts
        # first (a chat's history, grown) searches only what follows them
        if resume and all_small and _split_generation == generation and _known_pattern is known \
                and sum(map(len, texts)) <= _SPLIT_RESUME_CHARS:
            count = len(texts)
            kept = [r for r in resumes if r[0] == generation and not (len(r[3]) <= count and texts[:len(r[3])] == r[3])]
            kept.append((generation, known, window, texts, tuple(chain), originals, size))
            if len(_split_resume) >= _SPLIT_RESUME_MAX:
                _split_resume.popitem(last=False)
            _split_resume[texts[0]] = kept[-_SPLIT_RESUME_PER_TEXT:]
    return escaped


# first text -> [(generation, known secrets, window, the texts searched, the loop's state after them)]:
# several chats (each agent's history) can begin with the same text
_split_resume: OrderedDict[str, list[tuple[Any, ...]]] = OrderedDict()
_SPLIT_RESUME_MAX = 16
_SPLIT_RESUME_PER_TEXT = 4
_SPLIT_RESUME_CHARS = 1 << 17  # with the two counts, a bound on the texts it keeps alive
_split_generation = 0  # counts the times _split_checked was emptied (a resumed memo must predate none)


def _clear_split_checked() -> None:
    global _split_generation
    _split_generation += 1
    _split_checked.clear()
    _split_checked[None] = _known_pattern


def _learn_edges(text: str) -> None:
    """Learn the end of ``text`` that starts a registered secret and the start that ends one: the
    rest of the secret may come in a later message, after this one has been recorded."""
    size = _MIN_SECRET_LEN
    longest = _longest_known
    tail = text[-longest:]
    # each piece is cut out only where a secret starts (ends) as it does: cut at every position, a
    # registered secret of 60 K characters made each long text cost 0.3 s (quadratic)
    for start in range(max(0, len(tail) - longest + 1), len(tail) - size + 1):
        starting = _heads.get(tail[start:start + size])
        if starting and any(secret.startswith(tail[start:]) for secret in starting):
            learn_secret(tail[start:])
            break
    head = text[:longest]
    for end in range(len(head), size - 1, -1):
        ending = _tails.get(head[end - size:end])
        if ending and any(secret.endswith(head[:end]) for secret in ending):
            learn_secret(head[:end])
            break


def _learn_across(chain: list[tuple[str, bool]], after: str, window: int) -> None:
    """Learn every piece of a secret that crosses a boundary between the texts of ``chain``
    (their ends, and whether each is a whole text) and ``after`` (the last ``window``
    characters before it, the first ``window`` of it)."""
    joined = "".join(text if fits else text[-window:] for text, fits in chain)
    cut = max(0, len(joined) - window)
    head = joined[cut:]
    bounds: list[tuple[int, int, bool]] = []  # (start, end, whole text) of each text in head + tail
    at = -cut
    for text, fits in chain:
        size = len(text) if fits else min(len(text), window)
        if at + size > 0:
            bounds.append((max(at, 0), at + size, fits and at >= 0))
        at += size
    tail = after[:window]
    bounds.append((len(head), len(head) + len(tail), len(tail) == len(after)))
    both = head + tail
    joints = [start for start, _, _ in bounds[1:]]
    for start, end in _secret_spans(both):
        crossed = [joint for joint in joints if start < joint < end]
        if not crossed:
            continue
        if both[start:end] not in _known and both[start:end] not in _learned:
            # a key's shape runs on into the next text only where that text goes on as a key's random part does,
            # not with a word (capitalised or not): ``sk-proj-<key>`` | ``Thanks`` taught "Thanks", redacted in every
            # later text; the key itself, whole in its text, is found there (``AKIA<12>`` | ``KLMNOP`` still counts)
            for at, joint in enumerate(crossed):
                if _WORD_PIECE.fullmatch(both, joint, crossed[at + 1] if at + 1 < len(crossed) else end) is not None:
                    end = joint
                    break
            if end == crossed[0]:
                continue
        _learn_pieces(both, start, end, bounds)
    _learn_pairs_across(both, len(head), joints, bounds)


# a piece of a key's shape that is a word (see _learn_across)
_WORD_PIECE = re.compile(r"[A-Z]?[a-z]+")


def _learn_pieces(text: str, start: int, end: int, bounds: list[tuple[int, int, bool]]) -> None:
    """Learn the pieces of the secret at ``text[start:end]`` in each of the texts joined in ``text`` (``bounds``:
    see :func:`_learn_across`)."""
    for lo, hi, whole in bounds:
        a, b = max(start, lo), min(end, hi)
        if a < b:
            _learn_piece(text, a, b, lo, hi, whole)


# how far before a boundary a pair crossing it may start (its name, separator and the value's first part)
_PAIR_REACH = 64


def _holds_a_hint(lower: str) -> bool:
    """Whether the lower-cased ``lower`` holds a word of :data:`_KV_HINTS` (or :data:`_FOREIGN_HINTS`): a first
    test, substring searches (a pattern of the words cost twice as much on 64 characters)."""
    for hint in _KV_HINTS:
        if hint in lower:
            return True
    return not lower.isascii() and any(hint in lower for hint in _FOREIGN_HINTS)


# a pair left open at a text's end: a name, its separator (or a verb of prose, or an XML element's ">") and at most
# the start of a value, or the name alone (its separator starting the next text)
_PAIR_OPEN_AT_END = re.compile(
    rf"""(?:key|token|secret|pass|pwd|auth|credential|cookie|sig|pat|{_FOREIGN_NAMES})[\w.\-]*\\*["']?"""
    r"""(?:[ \t]*(?:=>|[:=>])[ \t]*\\*["']?[^\s"'<>]*|[ \t]+(?:is|was|to|now)[ \t]*:?[ \t]*|)\Z""", re.IGNORECASE)
# the end of a text that names a credential in prose, its value coming in the next text (``... the password is`` |
# ``Zorb7xq``): searched with a blank between them
_PROSE_VERB_AT_END = re.compile(r"[ \t](?:is|was|to|now)[ \t]*:?\Z", re.IGNORECASE)


def _learn_pairs_across(both: str, joint: int, joints: list[int], bounds: list[tuple[int, int, bool]]) -> None:
    """Learn the value of a secret-named ``key: value`` pair cut between two texts of one history: the name (and
    perhaps part of the value) ending one text, the value (or its rest) starting the next (``... api_key=`` |
    ``Zorb7xq ...``, ``password=Zorbq`` | ``7xkLmw``). Each text alone shows no pair or only its start: the value,
    or its rest, was shown there and in every later text. ``both``: the texts joined, ``joint``: where the last
    one starts."""
    lowest = max(0, joint - _PAIR_REACH)
    if not _holds_a_hint(both[lowest:joint].lower()) or _PAIR_OPEN_AT_END.search(both, lowest, joint) is None:
        return  # (no name and separator, and no more than a value's start, end the text: most boundaries)
    floor = max(0, lowest - 64)
    while lowest > floor and both[lowest - 1] in _NAME_CHARS:  # (not a name cut in two: "sort_key" read as "key")
        lowest -= 1
    pairs: list[tuple[int, int, int, bool]] = []
    if _PROSE_VERB_AT_END.search(both, max(0, joint - 8), joint) is None:
        _kv_pairs(both[lowest:], False, pairs)
        for name_start, start, end, teaches in pairs:
            name_start, start, end = name_start + lowest, start + lowest, end + lowest
            cuts = [cut for cut in joints if name_start < cut < end]
            # a value cut inside (``password=Zorbq`` | ``7xkLmw``) only when its rest looks random, as a key's does: a
            # whole value and the next text glued (``password=Zorb7xq`` | ``Thanks, done``) would teach "Thanks"
            if teaches and cuts and (cuts[0] <= start or _RANDOM_LOOKING.search(both, cuts[0], end) is not None):
                learn_secret(both[start:end])
                _learn_pieces(both, start, end, bounds)
    else:  # ("is" | "Zorb7xq" joined as written read "isZorb7xq" as the value, and learned "ord is")
        spaced = f"{both[lowest:joint]} {both[joint:]}"
        _kv_pairs(spaced, False, pairs)
        for name_start, start, end, teaches in pairs:
            if teaches and name_start < joint - lowest < start:
                learn_secret(spaced[start:end])


def _learn_piece(text: str, a: int, b: int, lo: int, hi: int, whole: bool) -> None:
    """Learn the piece ``text[a:b]`` of a secret, which lies in the message text ``text[lo:hi]``
    (``whole``: all of that message text). A piece of ``_MIN_SECRET_LEN`` characters or more is
    learned itself. A shorter piece would match by chance all over ordinary text, so it is learned
    with the characters next to it in its own message text (``": sk-M"`` for the piece ``sk-M``
    at the end of ``"my key: sk-M"``), which are redacted with it; a message text that is only
    the piece is redacted where a whole string equals it (3 characters or more). A piece of one or
    two characters that is a whole message text stays: at that length a string equal to it is as
    likely an ordinary value (``"ok"``, ``"1"``)."""
    size = _MIN_SECRET_LEN
    if b - a >= size:
        learn_secret(text[a:b])
    elif whole and a == lo and b == hi:
        if b - a >= _MIN_WHOLE_PIECE:
            _learn_whole(text[a:b])
    elif b == hi and hi - lo >= size:  # the end of its text: with the characters before it
        _learn_context(text[b - size:b])
    elif a == lo and hi - lo >= size:  # the start of its text: with the characters after it
        _learn_context(text[a:a + size])
    elif hi - lo >= size:  # inside (a text cut by the window): around it
        start = max(lo, min(a, hi - size))
        _learn_context(text[start:start + size])


_MIN_WHOLE_PIECE = 3
# message texts that are a short piece of a secret: redacted where a whole string equals one
_whole_pieces: OrderedDict[str, None] = OrderedDict()
# a short piece with the characters next to it (see _learn_piece); matched after every other
# secret, so that it never takes the first characters of a longer secret that overlaps it
# (" sk-pr" learned from one key would leave the rest of another "sk-proj-..." key unmatched)
_contexts: OrderedDict[str, None] = OrderedDict()
_context_pattern: re.Pattern[str] | None = None


def _learn_whole(piece: str) -> None:
    _add_piece(_whole_pieces, piece)


def _learn_context(piece: str) -> None:
    global _context_pattern
    if _add_piece(_contexts, piece):
        _context_pattern = _compile(_contexts)


def _add_piece(into: OrderedDict[str, None], piece: str) -> bool:
    forms = {piece, json.dumps(piece, ensure_ascii=False)[1:-1]}
    with _lock:
        if forms <= into.keys():
            return False
        for form in forms:
            into[form] = None
        while len(into) > MAX_LEARNED:
            into.popitem(last=False)
        for cache in _caches:  # results memoised without this piece
            cache._memo = _Memo(_known_pattern)
        _clear_split_checked()
        global secrets_version
        secrets_version += 1
        return True


# The start of a key shape cut before the shape is complete (its body too short to match
# _SECRET_SHAPES / _GATED_SHAPES), at the very end of a text; the full shape it must complete.
_FRAGMENT_AT_END = re.compile(
    r"(?<![A-Za-z0-9])(?:sk-[A-Za-z0-9_\-]{1,11}|sk_[A-Za-z0-9]{1,15}|AIza[0-9A-Za-z_\-]{1,19}"
    r"|gh[pousr]_[A-Za-z0-9]{1,19}|xox[abeprs]-[A-Za-z0-9\-]{1,9}|gsk_[A-Za-z0-9]{1,19}|hf_[A-Za-z0-9]{1,19}"
    r"|xai-[A-Za-z0-9]{1,19}|pplx-[A-Za-z0-9]{1,19}|AKIA[0-9A-Z]{1,15}|npm_[A-Za-z0-9]{1,35}"
    r"|glpat-[A-Za-z0-9_\-]{1,19}|rk_(?:live|test)_[A-Za-z0-9]{1,15}|do[por]_v1_[a-f0-9]{1,32}|xapp-\d-[A-Za-z0-9\-]{0,9})\Z"
)
_FRAGMENT_LOOKBACK = 40  # longer than any fragment _FRAGMENT_AT_END matches
# (fragment, the text it ended) -> how many more calls' first texts may continue it
_open_fragments: OrderedDict[tuple[str, str], int] = OrderedDict()
_MAX_OPEN_FRAGMENTS = 16
# a fragment nobody continued within this many texts is forgotten (each costs an anchored match per
# new text; 8 let a key continued by the 9th text through)
_FRAGMENT_CALLS = 256
# a continuation apart counts when it looks random: a digit, or a lower-case letter followed by an
# upper-case one (a key's body of letters alone; not a capitalised word: "Thanksgiving")
_RANDOM_LOOKING = re.compile(r"[0-9]|[a-z][A-Z]")


def _learn_open_fragment(text: str) -> None:
    """A text ending in the incomplete start of a key shape: learn that start (see
    :func:`_learn_piece`) and remember it for :func:`_continue_fragments`."""
    end = text[-_FRAGMENT_LOOKBACK:]
    found = _FRAGMENT_AT_END.search(end)
    if found is None:
        return
    offset = len(text) - len(end)
    _learn_piece(text, offset + found.start(), len(text), 0, len(text), True)
    key = (found.group(), text[-_SPLIT_CACHED_CHARS:])
    _open_fragments[key] = _FRAGMENT_CALLS
    _open_fragments.move_to_end(key)
    while len(_open_fragments) > _MAX_OPEN_FRAGMENTS:
        _open_fragments.popitem(last=False)


def _continue_fragments(text: str) -> None:
    """Learn the start of ``text`` (a text of a later model call) when it completes a key
    shape whose start ended an earlier text: the key was split across two calls. Only a
    continuation that looks random counts (a digit, or a lower-case letter before an upper-case
    one), as a key's random part does: a word (``wait``) that merely completes the shape neither
    is learned nor closes the fragment. The first text of a later call was once taken whatever it
    was: ``tell`` completed an open ``sk-proj-Ab12``, ``tell m`` was learned, and every ``tell me``
    of the process's later runs showed as ``[REDACTED]e`` (fragments stay open for 256 calls)."""
    for key, left in list(_open_fragments.items()):
        fragment, source = key
        if text[-_SPLIT_CACHED_CHARS:] == source:
            continue  # the text that left the fragment open, sent again
        if left <= 1:
            _open_fragments.pop(key, None)
        else:
            _open_fragments[key] = left - 1
        joined = fragment + text[:_FRAGMENT_LOOKBACK + _SPLIT_WINDOW]
        shapes = [_SECRET_SHAPES, *(shape for hint, shape in _GATED_SHAPES if hint in fragment)]
        for shape in shapes:
            match = shape.match(joined)
            if match is not None and match.end() > len(fragment):
                if _RANDOM_LOOKING.search(joined, len(fragment), match.end()) is None:
                    continue
                _learn_piece(joined, len(fragment), match.end(), len(fragment), len(joined),
                             len(text) <= _FRAGMENT_LOOKBACK + _SPLIT_WINDOW)
                _open_fragments.pop(key, None)
                break


class _RedactingFilter(logging.Filter):
    """Redacts our own log records: a message quoting the application's text, and above all the
    traceback of ``exc_info=True`` (telemetry's failures are logged at DEBUG with the exception
    that caused them, and that exception's message is the application's: a hostile response
    property raising ``quota exceeded for key sk-...``). Runs only for records that are emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):
            if record.exc_info and not record.exc_text:
                text = logging.Formatter().formatException(record.exc_info)
                bound = _scan_bound()
                record.exc_text = redact(text if len(text) <= bound else text[:bound] + "...[truncated]")
            message = record.getMessage()
            clean = redact(message if len(message) <= _scan_bound() else message[:_scan_bound()])
            if clean != message:
                record.msg, record.args = clean, None
        return True


_log_filter = _RedactingFilter()
for _name in ("cmbagent_otel", "cmbagent_otel.dag", "cmbagent_otel.ingest"):  # every logger we log on
    logging.getLogger(_name).addFilter(_log_filter)
# and the OpenTelemetry SDK's loggers that quote an exporter's endpoint (the gRPC exporter logs
# "Failed to export traces to user:password@host") or the exception an exporter or processor raised
# (the batch and simple processors log its traceback): the application configured both, and those
# records reach the same handlers, and an OTLP log exporter, as ours
_SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.metrics._internal",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk._logs._internal",
    "opentelemetry.sdk._logs._internal.export",
)
for _name in _SDK_LOGGERS:
    logging.getLogger(_name).addFilter(_log_filter)

reload_settings()
