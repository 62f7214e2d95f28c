"""``cmbagent-otel replay``: write spilled span batches into the DAG database."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_replay(args: argparse.Namespace) -> int:
    from .cli import CLIError
    from .exporters.dag import DagSpanExporter, default_spill_dir

    spill_dir = args.spill_dir or default_spill_dir()
    exporter = DagSpanExporter(args.db, spill_dir=spill_dir)
    try:
        replayed, left = exporter.replay()
    finally:
        exporter.shutdown()
    print(f"replayed {replayed} spans from {spill_dir}; {left} spill files left")
    if left:
        raise CLIError("the database is still unavailable; the remaining spill files are kept")
    return 0


def add_replay_parser(subparsers: Any) -> None:
    """Register ``cmbagent-otel replay``."""
    parser = subparsers.add_parser("replay", help="write spilled span batches into the database")
    parser.add_argument("--spill-dir", default=None,
                        help="spill directory (default: $CMBAGENT_OTEL_SPILL_DIR or <work dir>/spill)")
    parser.set_defaults(func=_cmd_replay)
