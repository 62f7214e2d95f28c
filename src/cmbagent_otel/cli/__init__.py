"""The ``cmbagent-otel`` command line.

:data:`COMMANDS` lists every subcommand, in the order ``--help`` shows them. Each is a
module of this package with ``NAME``, ``HELP`` (and optionally ``DESCRIPTION`` and ``DB_HELP``),
``add_arguments(parser)`` and ``run(args) -> exit code``; the ingest, replay and demo
modules of the library hold no command-line code. ``--db URL`` is accepted before and after
the subcommand. A :class:`CLIError` (bad input, nothing to read), an argument or path that
is not valid UTF-8 and an error of the operating system (a folder that cannot be created)
print one line on stderr and exit with code 2, as do a database driver that is not installed and
a bad option or argument (``cmbagent-otel: error: COMMAND: ...``, escaped like every error line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from ..version import __version__
from . import dag, db, demo, events, ingest, replay, runs
from ._common import CLIError, add_db_option, one_line

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (runs, dag, events, db, replay, ingest, demo)
"""Every subcommand (see the module docstring)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as the one line every other error is: ``cmbagent-otel:
    error: ...``, escaped like them (argparse printed the usage, then ``cmbagent-otel runs: error:``,
    and ``unrecognized arguments`` echoed control characters such as ESC as they were given)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        prefix = f"{command}: " if command else ""
        self.exit(2, f"cmbagent-otel: error: {prefix}{_bounded(one_line(message))} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """A command's parser reports what it did not recognise itself, so the error names the command
        and its ``--help`` (argparse handed them to the top-level parser: ``unrecognized arguments``
        without the command, pointing at ``cmbagent-otel --help``, which does not list its options)."""
        parsed, extra = super().parse_known_args(args, namespace)
        if extra and " " in self.prog:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of :data:`COMMANDS`."""
    parser = _Parser(
        prog="cmbagent-otel",
        description="Inspect runs stored by the DAG exporter, manage the schema, receive OTLP, run the demo.",
        epilog="Exit codes: 0 success; 2 an error, reported in one line on stderr (bad arguments, no database, "
               "tables or runs to read, an unknown run or node, spill files replay could not write, demo spans not "
               "written, a database or Graphviz failure); 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_db_option(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        description = getattr(command, "DESCRIPTION", None) or command.HELP
        p = sub.add_parser(command.NAME, help=command.HELP, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_db_option(p, help=getattr(command, "DB_HELP", None))
        command.add_arguments(p)
        p.set_defaults(_command=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmbagent-otel`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        return int(command(args) or 0)
    except CLIError as exc:  # may quote the database's rows or the server's words: no control characters
        print(f"cmbagent-otel: error: {_bounded(one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: the reader is gone, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ImportError as exc:  # a database driver the URL names that is not installed (postgresql+pg8000://)
        print(f"cmbagent-otel: error: a module this needs is not installed: {one_line(exc)}", file=sys.stderr)
        return 2
    except UnicodeError as exc:  # a run id or path given in bytes that are not UTF-8 (argv keeps them as surrogates)
        print(f"cmbagent-otel: error: an argument or path is not valid UTF-8 ({exc.reason})", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment refused: a folder that cannot be created, a permission
        print(f"cmbagent-otel: error: {_bounded(one_line(exc))}", file=sys.stderr)
        return 2


#: the most characters of an error line: it may quote what it was given (a 100 KB --db path or --host)
ERROR_CHARS = 1000


def _bounded(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else f"{text[:ERROR_CHARS]}... ({len(text)} characters)"
