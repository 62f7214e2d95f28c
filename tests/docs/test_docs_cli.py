"""The CLI reference (README.md, docs/dag.md, docs/backends.md) against the real argument parser.

Found by the twenty-fourth campaign (docs against behaviour): the docs promise one error line on
stderr, ``cmbagent-otel: error: ...``, escaped like every other error line, for any error, bad
arguments included; argparse printed its usage, then ``cmbagent-otel runs: error: ...``, and
``unrecognized arguments`` echoed what it was given as it was (an ESC or BEL reached the
terminal). ``db downgrade`` on a database never migrated answered Alembic's "Relative revision -1
didn't produce 1 migrations".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cmbagent_otel
from cmbagent_otel import environment_variables as env
from cmbagent_otel.cli import COMMANDS, build_parser, main

from ._read import table, ticked

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DAG_DOC = (ROOT / "docs" / "dag.md").read_text()
BACKENDS_DOC = (ROOT / "docs" / "backends.md").read_text()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option not in ("--help", "--db")}


def _synopsis() -> dict[str, str]:
    """docs/dag.md's CLI block: each command's line, by command name."""
    block = DAG_DOC.split("## CLI\n\n```\n", 1)[1].split("```", 1)[0]
    lines = {}
    for line in block.splitlines():
        words = line.replace("[--db URL] ", "").split()
        lines[words[1]] = " ".join(words[2:])
    return lines


def test_docs_synopsis_lists_every_command_and_option() -> None:
    synopsis, parsers = _synopsis(), _subparsers()
    assert list(synopsis) == [command.NAME for command in COMMANDS] == list(parsers)
    for name, line in synopsis.items():
        documented = set(re.findall(r"--[a-z][a-z-]*", line))
        if line.endswith("..."):  # ingest: its options are the table in docs/backends.md
            assert documented <= set(_options(parsers[name])), name
            continue
        assert documented == set(_options(parsers[name])), name


def test_docs_top_level_options_are_named() -> None:
    """Session 42: `cmbagent-otel --version` was in no doc. Every option of the top-level parser (but `--help`
    and `--db`, which the synopsis shows) is named in docs/dag.md as `cmbagent-otel OPTION`, and does what it
    says."""
    top = set(_options(build_parser()))
    assert top == {"--version"}
    assert all(f"`cmbagent-otel {option}`" in DAG_DOC for option in top)
    done = subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"cmbagent-otel {cmbagent_otel.__version__}\n"


def test_docs_synopsis_choices_are_the_parsers() -> None:
    synopsis, parsers = _synopsis(), _subparsers()
    for name, line in synopsis.items():
        for option, choices in re.findall(r"(--[a-z-]+) ([a-z]+(?:\|[a-z]+)+)", line):
            assert list(_options(parsers[name])[option].choices) == choices.split("|"), (name, option)
    actions = next(a for a in parsers["db"]._actions if a.dest == "action")
    assert synopsis["db"].startswith("|".join(actions.choices) + " ")


def test_docs_ingest_table_is_the_ingest_options() -> None:
    """docs/backends.md's table of `cmbagent-otel ingest` settings: each option exists and its help
    names the variable the table gives, every option of the parser is in the table, and each
    default shown is the setting's."""
    rows = table(BACKENDS_DOC, "| Option | Env var | Default |")
    options = _options(_subparsers()["ingest"])
    given = [re.match(r"`(--[a-z-]+)[^`]*`|\(env only\)", option) for option, _, _ in rows]
    assert all(given), rows
    assert {match.group(1) for match in given if match and match.group(1)} == set(options) | {"--db"}
    for match, (_, variables, default) in zip(given, rows, strict=True):
        option = match.group(1) if match else None
        named = ticked(variables)
        assert named and all(name in env.SETTINGS or any(name in s.also for s in env.SETTINGS.values())
                             for name in named), option
        if option in options:
            assert all(f"${name}" in options[option].help for name in named), option
        value = env.SETTINGS[named[0]].default_value()
        number = re.match(r"`?(\d+(?:\.\d+)*)`?( MiB)?", default)
        if isinstance(value, (int, float)) and number:
            shown = int(number.group(1)) << 20 if number.group(2) else float(number.group(1))
            assert shown == value, (option, default, value)
        elif isinstance(value, str) and number:
            assert number.group(1) == value, (option, default, value)


def _readme_commands() -> list[list[str]]:
    """Every `cmbagent-otel ...` line of the README's command block, alternatives expanded."""
    block = README.split("```bash\ncmbagent-otel db upgrade", 1)[1].split("```", 1)[0]
    commands = []
    for line in ("cmbagent-otel db upgrade" + block).splitlines():
        line = line.split("#", 1)[0].split(">", 1)[0].strip()
        if not line:
            continue
        words = [word.replace("RUN", "latest") for word in shlex.split(line)[1:]]
        alternatives = [word.split("|") for word in words]
        for index in range(max(len(a) for a in alternatives)):
            commands.append([a[min(index, len(a) - 1)] for a in alternatives])
    return commands


def test_docs_readme_commands_parse() -> None:
    parser = build_parser()
    commands = _readme_commands()
    assert {words[0] for words in commands} == {command.NAME for command in COMMANDS} - {"ingest"}
    for words in commands:
        args = parser.parse_args(words)
        assert args.command == words[0]


ERROR = re.search(r"one\s+line on stderr, `(cmbagent-otel: error: )\.\.\.`", README).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize(("argv", "names"), [
    (["runs", "--limit", "0"], ["runs", "--limit"]),
    (["dag", "latest", "--format", "png"], ["dag", "--format", "'png'"]),
    (["events"], ["events", "run"]),
    (["db", "sideways"], ["db", "sideways"]),
    # README: a bad option is `cmbagent-otel: error: COMMAND: ... (see cmbagent-otel COMMAND --help)`, an
    # unknown option of a command too (it was `error: unrecognized arguments: --frob (see cmbagent-otel --help)`)
    (["runs", "--frob"], ["error: runs: ", "--frob", "(see cmbagent-otel runs --help)"]),
    (["dag", "latest", "--frob", "x"], ["error: dag: ", "--frob x", "(see cmbagent-otel dag --help)"]),
    (["--db", "sqlite:///x.db", "events", "latest", "-z"],
     ["error: events: ", "-z", "(see cmbagent-otel events --help)"]),
    (["--frob", "runs"], ["error: unrecognized arguments: --frob", "(see cmbagent-otel --help)"]),
    (["nonsense"], ["nonsense"]),
])
def test_docs_a_bad_argument_is_one_error_line(argv: list[str], names: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith(ERROR) and err.count("\n") == 1, err
    assert all(name in err for name in names), err


@pytest.mark.parametrize("argv", [["runs", "\x1b]0;owned\x07"], ["runs", "--\x1b[2Jx"],
                                  ["dag", "latest", "--format", "\x9b2J"], ["db", "\u202eedoc"]])
def test_docs_error_lines_are_escaped(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """docs/dag.md: control characters, bidirectional overrides ... are shown as escapes; "Error lines
    get the same treatment"."""
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", err), repr(err)


def test_docs_without_a_command_the_help_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: cmbagent-otel") and all(f"    {c.NAME} " in out for c in COMMANDS)


def test_docs_downgrade_of_a_database_never_migrated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    assert main(["--db", f"sqlite:///{path}", "db", "downgrade"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{ERROR}nothing to downgrade") and err.count("\n") == 1, err
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]


def test_docs_dag_json_has_the_documented_keys(sqlite_url: str, provider: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """docs/dag.md's `dag --format json` paragraph: the run keys it names, nodes with `id`, `db_id`,
    `parent` (the parent's short id) and, for a failed node, `error`."""
    from cmbagent_otel import phase, step, workflow

    with workflow("docs", mode="planning-control"), phase("control"), step(1, "go", agent="engineer") as first:
        first.fail("no data")
    provider.store(sqlite_url)
    assert main(["--db", sqlite_url, "dag", "latest", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    paragraph = DAG_DOC.split("- `dag --format json`:", 1)[1].split("\n- ", 1)[0]
    for key in re.findall(r"`run\.([a-z_]+)`", paragraph):
        assert key in shown["run"], key
    assert re.search(r"nodes in display order, edges", paragraph) and shown["edges"]
    nodes = {node["id"]: node for node in shown["nodes"]}
    assert nodes["step_1"]["parent"] == "control" and isinstance(nodes["step_1"]["db_id"], str)
    assert nodes["step_1"]["status"] == "failed" and nodes["step_1"]["error"] == "no data"


def _ingest(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # a process of its own: gRPC reads its log settings once, when it is first imported
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run([sys.executable, "-m", "cmbagent_otel.cli", "--db", f"sqlite:///{tmp_path}/ingest.db",
                           "ingest", *args], capture_output=True, text=True, timeout=60, env=environ)


def test_docs_a_grpc_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    """README: any error is one line on stderr. With the gRPC port taken (4317 is often a collector's),
    gRPC's C core wrote its own `E... add_port.cc] Failed to add port` line before ours."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (("--port", "off", "--grpc-port", port), ("--port", port, "--grpc-port", "off")):
            done = _ingest(*args, tmp_path=tmp_path)
            assert done.returncode == 2
            assert done.stderr.startswith(ERROR) and done.stderr.count("\n") == 1, done.stderr
            assert "often taken by a collector" in done.stderr


def test_docs_the_port_hint_only_when_a_port_is_taken(tmp_path: Path) -> None:
    """An address this machine does not have (TEST-NET-1) is no port in use: no hint about ports."""
    done = _ingest("--host", "192.0.2.1", "--port", "0", "--grpc-port", "off", tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(ERROR) and done.stderr.count("\n") == 1
    assert "often taken" not in done.stderr
