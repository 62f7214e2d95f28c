"""docs/spans.md and docs/metrics.md against what the offline demo run emits (twenty-fourth campaign).

The demo (``cmbagent_otel.demo.run_demo``: real AG2 agents, scripted model) is what
``cmbagent-otel demo`` runs: every span it emits must be a line of the documented tree, in the
documented instrumentation scope, with attribute keys the doc names; every metric it records must
be a row of the metrics table with that instrument, unit and scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Sum
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cmbagent_otel
from cmbagent_otel import environment_variables as env
from cmbagent_otel.demo import run_demo

from ._read import number, table, ticked

ROOT = Path(__file__).resolve().parents[2]
SPANS_DOC = (ROOT / "docs" / "spans.md").read_text()
METRICS_DOC = (ROOT / "docs" / "metrics.md").read_text()
METRICS_SOURCE = (ROOT / "src" / "cmbagent_otel" / "metrics.py").read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[ReadableSpan], Any]]:
    cmbagent_otel.uninstrument()
    memory, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracers, meters = TracerProvider(), MeterProvider(metric_readers=[reader])
    tracers.add_span_processor(SimpleSpanProcessor(memory))
    cmbagent_otel.instrument(tracer_provider=tracers, meter_provider=meters, capture_content=True,
                             instrument_cmbagent=False)
    try:
        run_demo(str(tmp_path_factory.mktemp("demo")))
        yield list(memory.get_finished_spans()), reader.get_metrics_data()
    finally:
        cmbagent_otel.uninstrument()
        tracers.shutdown()
        meters.shutdown()


def _tree() -> set[tuple[str, str]]:
    """The tree block: (span name's first word, ``cmbagent.span.kind``) of each line."""
    block = SPANS_DOC.split("## The tree\n\n```\n", 1)[1].split("```", 1)[0]
    found = set()
    for line in block.splitlines():
        match = re.match(r"\s*([a-z_]+) .*?\bkind=([a-z_]+)", line)
        if match:
            found.add((match.group(1), match.group(2)))
    return found


def _scopes() -> dict[str, str]:
    """The scopes table: span name's first word -> scope."""
    found = {}
    for scope, spans in table(SPANS_DOC, "| scope | spans |"):
        (scope,) = ticked(scope)
        for name in ticked(spans):
            if re.fullmatch(r"[a-z_]+", name):
                found[name] = scope
    return found


def _documented_keys(text: str) -> set[str]:
    """Attribute keys in backticks, ``key=value`` cut at ``=``, and the doc's shorthand ``.suffix``
    after a full key (``cmbagent.workflow.name``, ``.mode``) expanded."""
    keys: set[str] = set()
    last = ""
    for token in re.findall(r"`([a-z_.0-9]+)(?:=[^`]*)?`", text):
        if token.startswith(".") and last:
            keys.add(last.rsplit(".", 1)[0] + token)
        elif "." in token:
            keys.add(token)
            last = token
    return keys


def test_docs_every_span_is_a_line_of_the_tree_in_its_scope(demo: tuple[list[ReadableSpan], Any]) -> None:
    spans, _ = demo
    tree, scopes = _tree(), _scopes()
    seen = set()
    for span in spans:
        word = span.name.split(" ", 1)[0]
        kind = (span.attributes or {}).get("cmbagent.span.kind")
        assert (word, kind) in tree, (span.name, kind)
        assert scopes.get(word) == span.instrumentation_scope.name, span.name
        seen.add(word)
    # the demo covers the run structure and the AG2 operations an offline run has
    assert {"workflow", "phase", "step", "redo", "conversation", "invoke_agent", "chat", "execute_tool",
            "execute_code"} <= seen


def test_docs_every_attribute_key_is_documented(demo: tuple[list[ReadableSpan], Any]) -> None:
    spans, _ = demo
    documented = _documented_keys(SPANS_DOC)
    emitted = {key for span in spans for key in (span.attributes or {})}
    emitted |= {key for span in spans for event in span.events for key in (event.attributes or {})}
    assert not emitted - documented


def test_docs_metrics_table_is_what_a_run_records(demo: tuple[list[ReadableSpan], Any]) -> None:
    _, data = demo
    documented = {}
    for name, instrument, unit, _, scope in table(METRICS_DOC, "| metric | instrument | unit | attributes | scope |"):
        ((name,), (unit,), (scope,)) = (ticked(name), ticked(unit), ticked(scope))
        documented[name] = (instrument, unit, scope)
    kinds = {Histogram: "histogram", Sum: "counter"}
    recorded = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                recorded[metric.name] = (kinds[type(metric.data)], metric.unit, scope_metrics.scope.name)
    assert recorded == documented


def test_docs_defaults_in_prose_are_the_settings() -> None:
    """A default written next to a variable in the prose (``CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH`` (4096),
    ``CMBAGENT_OTEL_EXPORT_TIMEOUT`` seconds (10; ...) is the setting's default."""
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    checked = 0
    for text in texts:
        for name, value in re.findall(r"`([A-Z_]+)`(?: seconds| characters| free, | ms)? \((?:default )?"
                                       r"(\d+(?:\.\d+)?)[;),]", text):
            if name in env.SETTINGS:
                assert float(value) == float(env.SETTINGS[name].default_value()), name
                checked += 1
    assert checked >= 3


def test_docs_on_every_span(demo: tuple[list[ReadableSpan], Any]) -> None:
    spans, _ = demo
    section = SPANS_DOC.split("## On every span\n\n", 1)[1]
    rows = table(section.split("\n\n", 1)[0], "| attribute | meaning |")
    assert len(rows) >= 5
    for key, meaning in rows:
        (key,) = ticked(key)
        missing = {span.name.split(" ", 1)[0] for span in spans if key not in (span.attributes or {})}
        if "inside a conversation" in meaning:
            missing -= {"workflow", "phase", "step", "redo"}
        if "but the workflow's" in meaning:
            missing -= {"workflow"}
        assert not missing, (key, missing)


def test_docs_bucket_boundaries_are_the_recorded_ones(demo: tuple[list[ReadableSpan], Any]) -> None:
    _, data = demo
    bullet = " ".join(METRICS_DOC.split("- **Bucket boundaries**", 1)[1].split("\n- ", 1)[0].split())
    lists = {label: [float(x) for x in numbers.split(", ")] for label, numbers in
             re.findall(r"(tokens|operation duration|runs and steps) `\[([\d., ]+)\]`", bullet)}
    expected = {"gen_ai.client.token.usage": lists["tokens"],
                "gen_ai.client.operation.duration": lists["operation duration"],
                "gen_ai.workflow.duration": lists["runs and steps"],
                "cmbagent.workflow.duration": lists["runs and steps"],
                "cmbagent.step.duration": lists["runs and steps"]}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name in expected:
                    for point in metric.data.data_points:
                        assert list(point.explicit_bounds) == expected[metric.name], metric.name


def test_docs_scopes_version_and_schema(demo: tuple[list[ReadableSpan], Any]) -> None:
    """The spans' and (session 42) the meters' scopes carry the version and schema docs/spans.md gives."""
    spans, data = demo
    schema = re.search(r"schema\s+`(https://opentelemetry\.io/schemas/[\d.]+)`", SPANS_DOC).group(1)  # type: ignore[union-attr]
    assert "both version `cmbagent_otel.__version__`" in SPANS_DOC
    scopes = [span.instrumentation_scope for span in spans]
    scopes += [scope_metrics.scope for resource_metrics in data.resource_metrics
               for scope_metrics in resource_metrics.scope_metrics]
    assert len(scopes) > len(spans)
    for scope in scopes:
        assert scope.version == cmbagent_otel.__version__
        assert scope.schema_url == schema


def _semconv_values_used() -> set[str]:
    """The string values of :mod:`cmbagent_otel.semconv`'s constants that the code (src and exporters, not
    semconv.py itself) names."""
    from cmbagent_otel import semconv

    sources = [ROOT / "exporters", ROOT / "src" / "cmbagent_otel"]
    code = "\n".join(path.read_text() for base in sources for path in base.rglob("*.py")
                     if path.name != "semconv.py" and (base.name == "exporters" or
                                                        path.relative_to(base).parts[0] != "exporters"))
    return {value for name, value in vars(semconv).items()
            if name.isupper() and isinstance(value, str) and re.search(rf"\b{name}\b", code)}


def test_docs_every_key_the_code_sets_is_documented() -> None:
    """The other direction, without running anything (twenty-ninth campaign): every ``cmbagent.*`` /
    ``gen_ai.*`` key of :mod:`cmbagent_otel.semconv` that the code uses (attributes of spans the demo
    does not make, such as the cmbagent integration's ``cmbagent.step.status``, event and metric
    names) is named in docs/spans.md or docs/metrics.md."""
    used = {value for value in _semconv_values_used() if re.fullmatch(r"(cmbagent|gen_ai)\.[a-z_.]+", value)}
    assert len(used) > 50
    undocumented = used - _documented_keys(SPANS_DOC) - _documented_keys(METRICS_DOC)
    assert not undocumented


def test_docs_every_event_name_is_documented(demo: tuple[list[ReadableSpan], Any]) -> None:
    spans, _ = demo
    names = {event.name for span in spans for event in span.events}
    assert "cmbagent.handoff" in names
    assert not {name for name in names if f"`{name}`" not in SPANS_DOC}


def test_docs_the_bench_corpus_is_the_demo_run(demo: tuple[list[ReadableSpan], Any]) -> None:
    """Session 41: bench/README.md gave the corpus (one recorded demo run) as 66 spans; the demo emits 51."""
    readme = (ROOT / "bench" / "README.md").read_text()
    stated = re.search(r"`cmbagent_otel\.demo\.run_demo`:[^)]*?;\s+(\d+)\s+spans\)", readme)
    assert stated is not None
    assert int(stated.group(1)) == len(demo[0])


def test_docs_provider_names_are_the_mapping_and_the_conventions() -> None:
    """Session 41: docs/spans.md named `moonshot_ai` among the GenAI conventions' well-known provider names;
    the conventions (opentelemetry-semantic-conventions' GenAiProviderNameValues) have no such value."""
    from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import GenAiProviderNameValues

    from cmbagent_otel.instrumentation._models import CUSTOM_PROVIDER, PROVIDERS

    text = " ".join(SPANS_DOC.split("**Provider names**", 1)[1].split("\n\n", 1)[0].split())
    well_known, _, rest = text.partition(") or a fixed lower-case name (")
    fixed = rest.split(")", 1)[0]
    names = (set(re.findall(r"`([a-z_.]+)`", well_known)) - {"api_type"}, set(re.findall(r"`([a-z_.]+)`", fixed)))
    conventions = {value.value for value in GenAiProviderNameValues}
    assert names[0] <= conventions and not names[1] & conventions
    assert names[0] | names[1] == set(PROVIDERS.values())
    assert f"`{CUSTOM_PROVIDER}`" in text


@pytest.mark.usefixtures("isolated_secrets")
def test_docs_a_key_shape_split_across_calls() -> None:
    """Session 41: docs/spans.md still said a key's start stays open for the next 8 calls and that a word
    completing its shape in a later call (`sk-ab` + `Understood…`) is redacted too; since the split-secret
    campaign the start stays open for 256 texts and only a continuation that looks random counts."""
    from cmbagent_otel import redaction

    text = " ".join(SPANS_DOC.split("Across model calls:", 1)[1].split("\n\n", 1)[0].split())
    assert int(number(text, r"within the next (\d+), at most")) == redaction._FRAGMENT_CALLS
    assert int(number(text, r"at most (\d+) starts open")) == redaction._MAX_OPEN_FRAGMENTS
    redaction.learn_split_secrets(["the key starts sk-ab"])
    assert redaction.redact("the key starts sk-ab") == "the key starts[REDACTED]"  # "loses it"
    redaction.learn_split_secrets(["Understood, I will wait"])
    assert redaction.redact("Understood, I will wait") == "Understood, I will wait"  # "is kept"
    redaction.learn_split_secrets(["look at sk-proj-Ab"])
    redaction.learn_split_secrets(["x9Zq81mPq is the rest"])  # random-looking: the key's rest
    assert redaction.redact("x9Zq81mPq is the rest") == "[REDACTED] is the rest"


def test_docs_numbers_of_the_secrets_and_bounds_paragraphs_are_the_codes() -> None:
    """Session 41: after the stale "next 8" above, every other number docs/spans.md and the Guarantees of
    docs/reliability.md give for redaction's and the spans' bounds was checked against the code; they held
    and are locked here."""
    import importlib

    from cmbagent_otel import redaction
    from cmbagent_otel.instrumentation import _handoffs, ag2

    workflow = importlib.import_module("cmbagent_otel.workflow")  # the package re-exports the function

    spans = " ".join(SPANS_DOC.split())
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    guarantees = " ".join(reliability.split("## How the tests check them")[0].split())
    checks = [
        (spans, r"forms of a registered secret are kept for the first (\d+) of", redaction._ENCODED_MAX),
        (spans, r"kept for the first \d+ of up to ([\d,]+) characters", redaction._ENCODED_REGISTERED_MAX),
        (spans, r"of a learned value, for the (\d+) most recent", redaction._LEARNED_ENCODED_MAX),
        (spans, r"for the \d+ most recent of up to ([\d,]+) characters", redaction._ENCODED_VALUE_MAX),
        (spans, r"learned values are kept to the (\d+) most recent", redaction.MAX_LEARNED),
        (spans, r"most recent and (\d+) Ki characters", redaction._LEARNED_CHARS_MAX // 1024),
        (spans, r"registered for good up to (\d+) values", redaction._SENT_MAX),
        (spans, r"a window of (\d+) characters", redaction._SPLIT_WINDOW),
        (spans, r"no more of one text than (\d+) KiB", redaction._SCAN_MIN // 1024),
        (spans, r"longer than (\d+) characters are cut, ending in", redaction.MAX_NAME),
        (spans, r"at most (\d+) names and", _handoffs.MAX_CANDIDATES),
        (spans, r"holds that many handoffs less (two)", _handoffs.EVENT_MARGIN),
        (spans, r"the ([\d,]+) in which a run was opened most recently", workflow._RUN_TRACES_MAX),
        (spans, r"finish_reasons` \(at most (\d+), one per choice", ag2.MAX_REASONS),
        (guarantees, r"base32 forms of the first (\d+) of them", redaction._ENCODED_MAX),
        (guarantees, r"one of the (\d+) most recently learned values", redaction._LEARNED_ENCODED_MAX),
        (guarantees, r"learned values of up to ([\d,]+) characters", redaction._ENCODED_VALUE_MAX),
        (guarantees, r"Learned forms are kept to (\d+) and", redaction.MAX_LEARNED),
        (guarantees, r"The (\d+) most recently learned values are kept", redaction.MAX_LEARNED),
        (guarantees, r"shorter than the (\d+) characters a value needs", redaction._MIN_SECRET_LEN),
        (guarantees, r"\((\d+) KiB, or 16 times the attribute bound\)", redaction._SCAN_MIN // 1024),
    ]
    words = {"two": 2}
    for text, pattern, value in checks:
        match = re.search(pattern, text)
        assert match, pattern
        found = match.group(1)
        assert (words[found] if found in words else int(found.replace(",", ""))) == value, pattern
    digest = redaction.redact_name("n" * 1000).rsplit("...", 1)[1]
    hashed = re.search(r"a (\d+)-hex-digit hash of the whole name", spans)
    assert hashed is not None and int(hashed.group(1)) == len(digest)


def test_docs_schema_url_is_the_release_of_the_newest_names() -> None:
    """Session 42: the scopes declared `https://opentelemetry.io/schemas/1.37.0` while the code emits names
    1.38-1.41 added (`gen_ai.tool.call.arguments`, `gen_ai.usage.cache_read.input_tokens`, `invoke_workflow`,
    `gen_ai.workflow.name`, ...). docs/spans.md's table gives every GenAI name the code emits by the release
    that added it; the declared schema is the newest of those releases (its newest patch), every name given
    a release is one the installed conventions package defines, and the names of the GenAI repository's
    unreleased rows are ones it does not."""
    from opentelemetry.semconv import schemas
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

    from cmbagent_otel import metrics, semconv

    operations = {value for name, value in vars(semconv).items() if name.startswith("OP_")}
    emitted = {value for value in _semconv_values_used() if value.startswith("gen_ai.") or value in operations}
    emitted |= {value for name, value in vars(metrics).items() if name.isupper() and isinstance(value, str)
                and value.startswith("gen_ai.") and re.search(rf"\b{name}\b", METRICS_SOURCE)}
    rows = {release: set(ticked(names)) - {"deprecated"}
            for release, names in table(SPANS_DOC, "| conventions | GenAI names emitted |")}
    documented = set().union(*rows.values())
    # a name the table gives as renamed upstream is not one we emit
    renamed = set(re.findall(r"renamed there, before any release, to `([a-z_.]+)`", SPANS_DOC))
    assert documented - renamed == emitted
    known = {value for name, value in vars(gen_ai_attributes).items() if name.startswith("GEN_AI_")}
    known |= {member.value for member in gen_ai_attributes.GenAiOperationNameValues}
    known |= {value for name, value in vars(gen_ai_metrics).items() if name.startswith("GEN_AI_")}
    events = {semconv.EVENT_INFERENCE_DETAILS}  # the package has no constants for event names
    released = {}
    for release, names in rows.items():
        version = re.fullmatch(r"(\d+\.\d+)(?: or earlier)?", release)
        if version:
            assert names - events <= known, release
            released[tuple(int(part) for part in version.group(1).split("."))] = names
        else:
            assert "`semantic-conventions-genai`" in release and not (names - renamed) & known, release
    published = {tuple(int(part) for part in member.value.rsplit("/", 1)[1].split(".")): member.value
                 for member in schemas.Schemas}
    newest_patch = max(version for version in published if version[:2] == max(released))
    assert published[newest_patch] == semconv.SCHEMA_URL
    assert f"schema\n`{semconv.SCHEMA_URL}`" in SPANS_DOC
    version = semconv.SCHEMA_URL.rsplit("/", 1)[1]
    assert f"schema it declares ({version})" in METRICS_DOC


def test_docs_the_content_events_scope_is_the_spans(capture: Any) -> None:
    """Session 42: docs/spans.md says the event logger declares the scopes' version and schema too; a content
    event (`EVENT_ONLY`) of a real AG2 chat carries them, in its `chat` span's context."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from cmbagent_otel import semconv
    from cmbagent_otel.testing import offline_agent

    assert "(tracers, meters and the event logger alike)" in SPANS_DOC
    records, loggers = InMemoryLogRecordExporter(), LoggerProvider()
    loggers.add_log_record_processor(SimpleLogRecordProcessor(records))
    cmbagent_otel.uninstrument()
    cmbagent_otel.instrument(tracer_provider=capture.provider, logger_provider=loggers, capture_content="EVENT_ONLY",
                             instrument_cmbagent=False, metrics=False)
    try:
        user = offline_agent("user", ["unused"], human_input_mode="NEVER", max_consecutive_auto_reply=0)
        assistant = offline_agent("assistant", ["the answer is 42"])
        user.initiate_chat(assistant, message="what is the answer?", max_turns=1, silent=True)
    finally:
        cmbagent_otel.uninstrument()
        loggers.shutdown()
    (chat,) = capture.named("chat ")
    (record,) = records.get_finished_logs()
    assert record.log_record.event_name == semconv.EVENT_INFERENCE_DETAILS
    assert record.log_record.span_id == chat.context.span_id
    scope = record.instrumentation_scope
    assert (scope.name, scope.version, scope.schema_url) == (chat.instrumentation_scope.name, cmbagent_otel.__version__,
                                                             semconv.SCHEMA_URL)
