"""docs/configuration.md's promise "every setting cmbagent-otel reads", from the other side: no
documented setting is ignored. Each row of the table (``environment_variables.SETTINGS``) is read by
the module that uses it, through its name constant (tests/configuration checks that the table is
the module's and that nothing else reads the environment)."""

from __future__ import annotations

import re
from pathlib import Path

from cmbagent_otel import environment_variables as env

ROOT = Path(__file__).resolve().parents[2]
# settings environment_variables.py itself resolves for the others (database_url(), default_sqlite_path())
RESOLVED_HERE = {env.DATABASE_URL, env.WORK_DIR}


def test_docs_no_documented_setting_is_ignored() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text().split("<!-- settings-table:start -->", 1)[1]
    documented = re.findall(r"^\| `([A-Z_]+)`", table.split("<!-- settings-table:end -->", 1)[0], flags=re.M)
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
