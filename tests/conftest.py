"""Fixtures shared by every test package.

Convention: each folder under ``tests/`` is a package named after the part it tests (its
helpers are modules imported relatively, or from its own ``conftest.py``); what several
folders need lives here: ``capture`` / ``instrumented`` (cmbagent-otel's spans in memory),
``provider`` (the same as a bare SDK provider with ``.memory``), ``sqlite_url``, ``pg_url``,
``pg_schema`` (a factory of fresh PostgreSQL schemas) and ``db_url`` (each test once per
backend). PostgreSQL tests skip unless ``CMBAGENT_OTEL_TEST_PG_URL`` names a server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
import string
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import cmbagent_otel
from cmbagent_otel import redaction, semconv
from cmbagent_otel._spans import workflow_tracers
from cmbagent_otel.instrumentation._handoffs import EVENT_NAME as HANDOFF_EVENT

# Property tests draw the same examples on every run: a CI run must not go red on an example
# only that run happened to draw (derandomized, no example database carried between runs), nor
# on the machine's load (no deadline, no too_slow health check: CI runs beside other jobs).
# A decorator's own settings override these one by one (a suppress list of its own lists too_slow).
# To look for new failing examples: pytest --hypothesis-profile=explore (a fresh seed each run).
HEALTH_CHECKS_OFF_UNDER_LOAD = [HealthCheck.too_slow]
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=HEALTH_CHECKS_OFF_UNDER_LOAD)
settings.register_profile("explore", deadline=None, suppress_health_check=HEALTH_CHECKS_OFF_UNDER_LOAD)
settings.load_profile("ci")


class SpanCapture:
    """An SDK TracerProvider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name.startswith(prefix)]

    def write_dag(self, url: str) -> None:
        """Write the finished spans into the DAG database at ``url`` with the real writer."""
        from cmbagent_otel.dag.writer import DagWriter

        writer = DagWriter(url)
        try:
            writer.write(list(self.exporter.get_finished_spans()))
        finally:
            writer.close()

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans]}"
        return found[0]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        if span.parent is None:
            return None
        for candidate in self.spans:
            if candidate.context.span_id == span.parent.span_id:
                return candidate
        return None

    def handoffs(self) -> list[dict[str, Any]]:
        """Every speaker selection in execution order, from either form: a ``cmbagent.handoff``
        event (its attributes, plus ``"span"``: the span it is on) or a ``select_speaker`` span
        (its attributes, plus ``"span"``: itself)."""
        found: list[dict[str, Any]] = []
        for s in self.spans:
            if (s.attributes or {}).get(semconv.SPAN_KIND) == semconv.KIND_SPEAKER_SELECTION:
                found.append({**s.attributes, "span": s})
            for event in s.events:
                if event.name == HANDOFF_EVENT:
                    found.append({**event.attributes, "span": s})
        return sorted(found, key=lambda h: h[semconv.EXECUTION_ORDER])

    def tree(self) -> list[str]:
        """Span names indented by depth, children in start order; a handoff event is a line
        ``handoff <from> -> <to>`` among its span's children, at its time."""
        spans = self.spans
        ids = {s.context.span_id for s in spans}
        children: dict[int | None, list[tuple[int, str, int | None]]] = {}
        for s in spans:
            parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
            children.setdefault(parent, []).append((s.start_time or 0, s.name, s.context.span_id))
            for event in s.events:
                if event.name == HANDOFF_EVENT:
                    attrs = event.attributes or {}
                    label = f"handoff {attrs.get(semconv.HANDOFF_FROM)} -> {attrs.get(semconv.HANDOFF_TO, '(end)')}"
                    children.setdefault(s.context.span_id, []).append((event.timestamp or 0, label, None))
        lines: list[str] = []

        def walk(parent: int | None, depth: int) -> None:
            for _, name, span_id in sorted(children.get(parent, []), key=lambda c: c[0]):
                lines.append("  " * depth + name)
                if span_id is not None:
                    walk(span_id, depth + 1)

        walk(None, 0)
        return lines


# redaction's state of learned secrets (values found under secret-named keys, pieces of split keys, open
# fragments): emptied for a test that uses isolated_secrets, whatever earlier tests of the process learned
_LEARNED_STATE = ("_learned", "_learned_forms", "_learned_forms_pattern", "_open_fragments", "_contexts",
                  "_context_pattern", "_whole_pieces")
# registered secrets and what is compiled or counted from them (kept, copied, restored afterwards)
_REGISTERED_STATE = ("_known", "_known_pattern", "_secret_with_comma", "_encoded_count", "_forms", "_sent_seen",
                     "_request_registered", "_longest_known", "_sealed", "_open", "_layout_of", "_layout_len",
                     "_known_comma", "_chunks")


@pytest.fixture
def isolated_secrets() -> Iterator[None]:
    """The test starts with nothing learned (what earlier tests of the process learned is not there: a
    learned word is redacted even inside longer words), keeps the registered secrets, and everything it
    registers or learns is forgotten after it (a comma secret switches the shortcut off for the whole
    process; a learned piece of a key changes how later texts are redacted). Every memo of redacted texts is
    emptied at both ends (``secrets_version`` moves on, never back)."""
    saved = {name: getattr(redaction, name) for name in (*_LEARNED_STATE, *_REGISTERED_STATE, "_heads", "_tails")}
    with redaction._lock:
        for name in _REGISTERED_STATE:
            value = saved[name]
            setattr(redaction, name, value.copy() if isinstance(value, (set, dict, list)) else value)
        for name in ("_heads", "_tails"):  # a long registered secret makes every later text's edges cost its length
            setattr(redaction, name, {edge: list(values) for edge, values in saved[name].items()})
        for name in _LEARNED_STATE:
            value = saved[name]
            setattr(redaction, name, type(value)() if isinstance(value, dict) else None)
        redaction._rebuild()
        _forget_redacted()
    try:
        yield
    finally:
        with redaction._lock:
            for name, value in saved.items():
                setattr(redaction, name, value)
            redaction.secrets_version += 1
            _forget_redacted()


def unlearned_word(prefix: str) -> str:
    """A word no test can have taught, of letters only (an ordinary word's shape: a value with a digit is learned
    even at a message's start): ``prefix`` and ten random lower-case letters, forming no secret name's hint the
    prefix does not hold (``redaction._KV_HINTS``: "Pw" + "d..." made "Pwd...", a word about a credential that
    "the password is <it>" rightly does not take, and failed a test 1 run in 26)."""
    own = [hint for hint in redaction._KV_HINTS if hint not in prefix.lower()]
    while True:
        word = prefix + "".join(secrets.choice(string.ascii_lowercase) for _ in range(10)) + "word"
        if not any(hint in word.lower() for hint in own):
            return word


def forget_learned(value: str) -> None:
    """Forget a secret a test learned outside ``isolated_secrets`` (its learned forms, every memo)."""
    with redaction._lock:
        redaction._learned.pop(value, None)  # (the test's values are ASCII: their JSON form is the same)
        redaction._learned_forms.pop(value, None)
        redaction._learned_forms_pattern = None
        redaction._rebuild()
        _forget_redacted()


def _forget_redacted() -> None:
    """Empty redaction's memos of texts redacted with other secrets than the current ones."""
    for cache in redaction._caches:
        cache._memo = redaction._Memo(redaction._known_pattern)
    redaction._clear_split_checked()


@pytest.fixture(autouse=True)
def _isolated_spill_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporters built without a spill dir must not write into the user's home."""
    monkeypatch.setenv("CMBAGENT_OTEL_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))


@pytest.fixture
def capture() -> Iterator[SpanCapture]:
    """Routes cmbagent-otel's workflow spans to an in-memory exporter (no AG2 patching)."""
    cap = SpanCapture()
    try:
        with workflow_tracers.routed_to(cap.provider):
            yield cap
    finally:
        cap.provider.shutdown()


@pytest.fixture
def instrumented(capture: SpanCapture) -> Iterator[SpanCapture]:
    """AG2 instrumented into ``capture``; uninstrumented afterwards."""
    cmbagent_otel.instrument(tracer_provider=capture.provider, instrument_cmbagent=False)
    try:
        yield capture
    finally:
        cmbagent_otel.uninstrument()


def _store_finished(memory: InMemorySpanExporter, url: str) -> None:
    from cmbagent_otel.dag.writer import DagWriter

    writer = DagWriter(url)
    try:
        writer.write(list(memory.get_finished_spans()))
    finally:
        writer.close()


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """An SDK provider recording into ``provider.memory``; cmbagent-otel's spans go to it.
    ``provider.store(url)`` writes the spans finished so far into the DAG database ``url``."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.memory = exporter  # type: ignore[attr-defined]
    provider.store = functools.partial(_store_finished, exporter)  # type: ignore[attr-defined]
    try:
        with workflow_tracers.routed_to(provider):
            yield provider
    finally:
        provider.shutdown()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback TCP port where connections are refused, held for the test: bound and never
    listening, so no other process gets it meanwhile (a port found free and let go is anyone's: an
    ephemeral port of another suite's connection or server). A server started in the test can still
    take it over (both sockets with ``SO_REUSEADDR``, this one never listens), as ``IngestServer``,
    uvicorn and gRPC do."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- databases ----------------------------------------------------------------------------------
PG_ENV = "CMBAGENT_OTEL_TEST_PG_URL"


@contextlib.contextmanager
def _fresh_schema() -> Iterator[str]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (start a server with .ci/start-postgres.sh)")
    with schema_in(base) as url:
        yield url


@contextlib.contextmanager
def schema_in(base: str, prefix: str = "t") -> Iterator[str]:
    """A URL of the PostgreSQL server ``base`` whose connections use a fresh schema, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def pg_schema() -> Callable[[], contextlib.AbstractContextManager[str]]:
    """A factory: each ``with pg_schema() as url`` is a URL whose connections use a fresh schema
    of the test PostgreSQL, dropped afterwards (the test skips when none is configured)."""
    return _fresh_schema


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL, as a URL."""
    with _fresh_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file in the test's tmp_path (not created)."""
    return f"sqlite:///{tmp_path}/cmbagent.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a new schema on the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/cmbagent.db"
        return
    with _fresh_schema() as url:
        yield url


# --- custom model clients on every AG2 line ----------------------------------------------------------
# ag2 names a custom ModelClient class in a config entry under ``model_client_cls``; cmbagent_autogen (the
# fork cmbagent runs on) under ``mod_client_cls``, and its config schema forbids the ag2 key. Tests that need a
# custom client (a hostile one, one whose usage has a given shape) build their entry with the key the
# installed line takes, so they run on the fork too instead of skipping there.
from cmbagent_otel.instrumentation._models import CUSTOM_CLIENT_KEYS  # noqa: E402 - appended section


@functools.lru_cache(maxsize=1)
def custom_client_key() -> str | None:
    """The ``llm_config`` key this AG2 line takes for a custom model client class, or None if it takes
    neither of :data:`CUSTOM_CLIENT_KEYS`."""
    from autogen import ConversableAgent

    for key in CUSTOM_CLIENT_KEYS:
        entry = {"model": "scripted", key: "ScriptedModelClient"}
        try:  # the schema check only: the class is not built before it is registered
            ConversableAgent("client_key_probe", llm_config={"config_list": [entry], "cache_seed": None},
                             human_input_mode="NEVER")
        except Exception:
            continue
        return key
    return None


def client_key() -> str:
    """The key to name a custom model client class under in a config entry on this AG2 line (ag2's when it
    takes neither: the entry is then rejected as it would be by the line)."""
    return custom_client_key() or CUSTOM_CLIENT_KEYS[0]


def custom_client_entry(cls_name: str, model: str = "scripted", **fields: Any) -> dict[str, Any]:
    """A config entry selecting the custom model client class ``cls_name`` (register it on the agent
    afterwards), under the key this AG2 line takes."""
    return {"model": model, client_key(): cls_name, **fields}


def custom_client_config(cls_name: str, model: str = "scripted", **fields: Any) -> dict[str, Any]:
    """An ``llm_config`` with one :func:`custom_client_entry` and no cache."""
    return {"config_list": [custom_client_entry(cls_name, model, **fields)], "cache_seed": None}

