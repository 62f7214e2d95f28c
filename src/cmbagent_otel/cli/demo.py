"""``cmbagent-otel demo``: the offline planning/control run (no API key) into the DAG database, then its DAG."""

from __future__ import annotations

import argparse

from . import dag
from ._common import CLIError, reading

NAME = "demo"
HELP = "run an offline planning/control workflow (no API key) into the DAG database and print its DAG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default=None,
                        help="where the demo's code runs (default: a new temporary directory, kept; the run "
                             "records its path as meta.work_dir)")
    dag.add_format(parser)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import io
    import logging
    import sys

    from ..bootstrap import instrument, uninstrument
    from ..dag.database import BadDatabaseURL, redacted, resolve_url
    from ..demo import run_demo
    from ..exporters.dag import DagSpanExporter
    from ..provider import exporter_names

    try:
        where = redacted(resolve_url(args.db))
    except BadDatabaseURL as exc:
        raise CLIError(str(exc)) from None
    try:
        import autogen  # noqa: F401  (the demo's agents are AG2's; without it, one line instead of a traceback)
    except ImportError:
        try:
            from importlib.metadata import version
            ag2 = version("ag2")
        except Exception:
            ag2 = None
        if ag2 is not None and ag2.split(".")[0].isdigit() and int(ag2.split(".")[0]) >= 1:
            # ag2 1.x: a new `ag2` package, no classic `autogen` API
            raise CLIError(f"the demo runs AG2's classic agents (`autogen`), which ag2 {ag2} does not have: "
                           "cmbagent-otel supports ag2 0.9 to 0.14 (python -m pip install \"ag2[openai]<0.15\") "
                           "and cmbagent's cmbagent_autogen") from None
        raise CLIError("the demo runs AG2 agents and AG2 is not installed here: install cmbagent-otel with its "
                       "`ag2` extra (python -m pip install \"/path/to/cmbagent-otel[ag2]\"), or use an "
                       "environment that has AG2 or cmbagent's cmbagent_autogen") from None
    for name in ("autogen", "autogen.oai.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    exporter = DagSpanExporter(args.db)
    others = [name for name in exporter_names() if name != "cmbagent_dag"]
    instrument(exporters=others, span_exporters=[exporter], service_name="cmbagent-otel-demo",
               instrument_cmbagent=False)
    transcript = io.StringIO()
    try:
        with contextlib.redirect_stdout(transcript):
            run_id = run_demo(args.work_dir)
    finally:
        uninstrument()  # flushes every batch into the database
    stats = exporter.stats()
    if stats["dropped"] or stats["spilled"]:
        raise CLIError(f"{stats['dropped']} spans lost and {stats['spilled']} spilled instead of written "
                       f"to {where} (see the log above)")
    # with --format json/svg/... stdout carries only that output (to redirect into a file)
    print(f"demo run {run_id}: {stats['exported']} spans written to the DAG database {where}",
          file=sys.stdout if args.format == "tree" else sys.stderr)
    with reading(args.db) as reader:
        dag.show(reader.dag(reader.run(run_id)), args.format)
    return 0
