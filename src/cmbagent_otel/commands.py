"""The ``cmbagent-otel`` console script: the core CLI plus the commands other modules add."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import cli


def _register() -> None:
    from .demo import add_demo_parser
    from .ingest import add_ingest_parser
    from .replay import add_replay_parser

    cli.subcommand("demo")(add_demo_parser)
    cli.subcommand("ingest")(add_ingest_parser)
    cli.subcommand("replay")(add_replay_parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: every subcommand (runs, dag, events, db, demo, ingest, replay)."""
    _register()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
