"""Every span ours emits for the bench's workloads, normalised, to show a speed change changes no output.

Records two chats of each workload (``group``, ``tools``, ``tools_async``, ``code``; 4 turns or cycles
each), content capture off and on, through a ``SimpleSpanProcessor``: every span's name, kind, parent,
status, attributes and events (name and attributes). Trace, span and conversation ids, uuids and session
ids are numbered by first appearance, timestamps dropped; everything else is compared as it is.

    python bench/span_snapshot.py --write before.json     # on the tree before a change
    python bench/span_snapshot.py --compare before.json   # after it: exit 1 and the first differences if any
    python bench/span_snapshot.py --compare before.json --variant minimal --workloads group --content off
                                                          # bench_overhead.py's minimal variant emits ours' spans

(Used by the issue-13 own-code sessions: ``docs/reliability.md``, "Issue 13, session 35 (own code)".)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKLOADS = ("group", "tools", "tools_async", "code")
_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b|\b[0-9a-f]{32}\b")
# attribute keys whose values are fresh per run (ids, uuids, temporary paths)
_FRESH_KEYS = ("session.id", "cmbagent.session.id", "gen_ai.conversation.id")


class _Names:
    """Numbers each fresh value by its first appearance."""

    def __init__(self) -> None:
        self.seen: dict[Any, str] = {}

    def __call__(self, value: Any, prefix: str) -> str:
        if value not in self.seen:
            self.seen[value] = f"<{prefix}{len(self.seen)}>"
        return self.seen[value]


def _value(names: _Names, key: str, value: Any) -> Any:
    if isinstance(value, tuple):
        return [_value(names, key, v) for v in value]
    if key in _FRESH_KEYS and isinstance(value, str):
        return names(value, "id")
    if isinstance(value, str):
        text = _ID.sub(lambda m: names(m.group(0), "uuid"), value)
        return re.sub(r"bench-code-[A-Za-z0-9_]+", "bench-code-<dir>", text)
    return value


def _attributes(names: _Names, attributes: Any) -> dict[str, Any]:
    return {k: _value(names, k, v) for k, v in (attributes or {}).items()}


def record(workload_name: str, content: bool, chats: int = 2, cycles: int = 4,
           variant: str = "ours") -> list[dict[str, Any]]:
    """The normalised spans of ``chats`` chats of ``workload_name`` (ended order), emitted by ours or by
    ``bench_overhead.py``'s ``minimal`` variant (``_minimal.py``: the group workload, content off)."""
    import _minimal
    import _workload
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import cmbagent_otel

    workload = _workload.WORKLOADS[workload_name]
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    if variant == "minimal":
        uninstall = _minimal.install(provider)
    else:
        cmbagent_otel.instrument(tracer_provider=provider, instrument_cmbagent=False,
                                 instrument_threading=workload.is_async, capture_content=content)
        uninstall = cmbagent_otel.uninstrument
    try:
        for _ in range(chats):
            initiator, recipient, _agents = workload.build(cycles, _workload.Counter())
            workload.run(initiator, recipient, cycles)
    finally:
        uninstall()
    names = _Names()
    out = []
    for span in memory.get_finished_spans():
        parent = span.parent
        out.append({
            "name": _value(names, "", span.name),
            "kind": span.kind.name,
            "trace": names(span.context.trace_id, "trace"),
            "span": names(span.context.span_id, "span"),
            "parent": names(parent.span_id, "span") if parent is not None else None,
            "status": [span.status.status_code.name, span.status.description],
            "attributes": _attributes(names, span.attributes),
            "events": [[e.name, _attributes(names, e.attributes)] for e in span.events],
        })
    return out


def snapshot(workloads: Sequence[str], contents: Sequence[bool] = (False, True),
             variant: str = "ours") -> dict[str, list[dict[str, Any]]]:
    result = {}
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # AG2's chat output
    try:
        for workload in workloads:
            for content in contents:
                result[f"{workload} content={'on' if content else 'off'}"] = record(workload, content,
                                                                                    variant=variant)
    finally:
        sys.stdout.close()
        sys.stdout = out
    return result


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    if type(before) is not type(after):
        return [f"{path}: {before!r} != {after!r}"]
    if isinstance(before, dict):
        found = []
        for key in list(dict.fromkeys([*before, *after])):
            if key not in before or key not in after:
                found.append(f"{path}.{key}: only in {'after' if key not in before else 'before'}")
            else:
                found += _differences(before[key], after[key], f"{path}.{key}")
        if not found and list(before) != list(after):
            found.append(f"{path}: key order {list(before)} != {list(after)}")
        return found
    if isinstance(before, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items != {len(after)}"]
        return [d for i, (b, a) in enumerate(zip(before, after, strict=True))
                for d in _differences(b, a, f"{path}[{i}]")]
    return [] if before == after else [f"{path}: {before!r} != {after!r}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", help="write the snapshot to this file")
    what.add_argument("--compare", help="compare with the snapshot in this file")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--content", choices=["off", "on", "both"], default="both")
    parser.add_argument("--variant", choices=["ours", "minimal"], default="ours",
                        help="minimal: bench_overhead.py's lower-bound variant (_minimal.py), which models the "
                             "group workload with content off only: compare it with ours' snapshot")
    args = parser.parse_args(argv)
    if args.variant == "minimal" and (args.workloads != ["group"] or args.content != "off"):
        parser.error("--variant minimal needs --workloads group --content off")
    sys.path.insert(0, str(HERE))
    os.environ.pop("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", None)
    os.environ["OTEL_SDK_DISABLED"] = "false"
    contents = {"off": (False,), "on": (True,), "both": (False, True)}[args.content]
    now = json.loads(json.dumps(snapshot(args.workloads, contents, args.variant)))  # tuples as lists, as stored
    spans = sum(len(v) for v in now.values())
    if args.write:
        Path(args.write).write_text(json.dumps(now, indent=1, sort_keys=False))
        print(f"{spans} spans written to {args.write}")
        return 0
    before = json.loads(Path(args.compare).read_text())
    found = _differences({k: before[k] for k in now if k in before}, now)
    if found:
        print(f"{len(found)} differences; the first:")
        for line in found[:30]:
            print("  " + line)
        return 1
    print(f"identical: {spans} spans ({', '.join(f'{k} {len(v)}' for k, v in now.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
