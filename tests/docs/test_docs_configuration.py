"""docs/configuration.md's promise "every setting cmbagent-otel reads", from the other side: no
documented setting is ignored. Each row of the table (``environment_variables.SETTINGS``) is read by
the module that uses it, through its name constant (tests/configuration checks that the table is
the module's and that nothing else reads the environment)."""

from __future__ import annotations

import re
from pathlib import Path

from cmbagent_otel import environment_variables as env

from ._read import table, ticked

ROOT = Path(__file__).resolve().parents[2]
# settings environment_variables.py itself resolves for the others (database_url(), default_sqlite_path())
RESOLVED_HERE = {env.DATABASE_URL, env.WORK_DIR}


def test_docs_no_documented_setting_is_ignored() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text().split("<!-- settings-table:start -->", 1)[1]
    rows = table(text.split("<!-- settings-table:end -->", 1)[0], "| variable | default | meaning |")
    documented = [ticked(variable)[0] for variable, _, _ in rows]
    assert documented == list(env.SETTINGS)
    constants = {value: name for name, value in vars(env).items()
                 if name.isupper() and isinstance(value, str) and value in env.SETTINGS}
    sources = "\n".join(p.read_text() for d in ("src/cmbagent_otel", "exporters") for p in (ROOT / d).rglob("*.py")
                        if p.name != "environment_variables.py")
    ignored = [name for name in documented if name not in RESOLVED_HERE
               and not re.search(rf"\b{constants[name]}\b", sources) and f'"{name}"' not in sources]
    assert not ignored
    module = (ROOT / "src" / "cmbagent_otel" / "environment_variables.py").read_text()
    assert "get(DATABASE_URL" in module and "get(WORK_DIR)" in module


def _patterns(text: str) -> list[re.Pattern[str]]:
    """The variable names and name patterns in backticks: ``OTEL_*_LIMIT``, ``OTEL_EXPORTER_OTLP_[TRACES_|
    METRICS_|LOGS_]TIMEOUT`` and the shorthand ``..._COMPRESSION`` after it."""
    found, last = [], ""
    for token in re.findall(r"`((?:OTEL_|\.\.\._)[A-Z_*\[\]|]*)`", text):
        if token.startswith("..."):
            token = last[:last.rfind("]") + 1 or last.rfind("_")] + token[4:]
        else:
            last = token
        regex = re.sub(r"\[([A-Z_|]+)\]", lambda m: f"(?:{m.group(1)})?", token).replace("*", "[A-Z_]*")
        found.append(re.compile(regex))
    return found


def test_docs_every_sdk_variable_checked_is_described() -> None:
    """docs/configuration.md names (or covers by a pattern) every OpenTelemetry variable that importing
    cmbagent_otel checks and may remove (``SDK_CHECKED``, the header variables)."""
    text = (ROOT / "docs" / "configuration.md").read_text().split("<!-- settings-table:end -->", 1)[1]
    patterns = _patterns(text)
    undescribed = [name for name in (*env.SDK_CHECKED, *env.HEADER_VARIABLES)
                   if not any(p.fullmatch(name) for p in patterns)]
    assert not undescribed
