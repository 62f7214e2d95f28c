"""Every environment variable cmbagent-otel reads: its name, default and meaning, and the one way to read it.

Modules never read ``os.environ`` for a setting themselves: they call :func:`get` (an
argument given in code wins over the environment, which wins over the default). One
policy for a value that cannot be parsed: it is logged once (WARNING on the
``cmbagent_otel`` logger, per variable and value; the values of secret settings are never
logged) and ignored, so the next variable of the row, else the default, applies.

The table in ``docs/configuration.md`` is :func:`markdown_table`'s output (a test keeps it so).

The OpenTelemetry SDK reads more ``OTEL_*`` variables itself (``OTEL_EXPORTER_OTLP_*`` in
the OTLP exporters, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_BSP_*`` in the SDK's batch
processor, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` in ``Resource``); they
work as documented by OpenTelemetry and are not repeated here unless we read them too.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ._forksafe import reset_in_child

logger = logging.getLogger("cmbagent_otel")

__all__ = [
    "HEADER_VARIABLES",
    "SDK_CHECKED",
    "SETTINGS",
    "URL_VARIABLES",
    "Setting",
    "check_sdk_variables",
    "configured_credentials",
    "database_url",
    "default_sqlite_path",
    "get",
    "markdown_table",
]

# --- names (import these instead of spelling the strings) --------------------------------
DATABASE_URL = "CMBAGENT_OTEL_DATABASE_URL"
CMBAGENT_DATABASE_URL = "CMBAGENT_DATABASE_URL"
WORK_DIR = "CMBAGENT_DEFAULT_WORK_DIR"
SPILL_DIR = "CMBAGENT_OTEL_SPILL_DIR"
SPILL_RESERVE_MB = "CMBAGENT_OTEL_SPILL_RESERVE_MB"
EXPORT_TIMEOUT = "CMBAGENT_OTEL_EXPORT_TIMEOUT"
SQLITE_BUSY_TIMEOUT_MS = "CMBAGENT_OTEL_SQLITE_BUSY_TIMEOUT_MS"
COST_RECORDS = "CMBAGENT_OTEL_COST_RECORDS"
BSP_SCHEDULE_DELAY = "CMBAGENT_OTEL_BSP_SCHEDULE_DELAY"
BSP_MAX_QUEUE_SIZE = "CMBAGENT_OTEL_BSP_MAX_QUEUE_SIZE"
BSP_MAX_EXPORT_BATCH_SIZE = "CMBAGENT_OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
LIVE_DAG = "CMBAGENT_OTEL_LIVE_DAG"
FLUSH_ON_SIGNAL = "CMBAGENT_OTEL_FLUSH_ON_SIGNAL"
MAX_ATTRIBUTE_LENGTH = "CMBAGENT_OTEL_MAX_ATTRIBUTE_LENGTH"
INGEST_HOST = "CMBAGENT_OTEL_INGEST_HOST"
INGEST_PORT = "CMBAGENT_OTEL_INGEST_PORT"
INGEST_GRPC_PORT = "CMBAGENT_OTEL_INGEST_GRPC_PORT"
INGEST_TOKEN = "CMBAGENT_OTEL_INGEST_TOKEN"
INGEST_MAX_BYTES = "CMBAGENT_OTEL_INGEST_MAX_BYTES"
INGEST_MAX_INFLIGHT_BYTES = "CMBAGENT_OTEL_INGEST_MAX_INFLIGHT_BYTES"
INGEST_WORKERS = "CMBAGENT_OTEL_INGEST_WORKERS"
INGEST_REQUEST_TIMEOUT = "CMBAGENT_OTEL_INGEST_REQUEST_TIMEOUT"
INGEST_MIN_RATE = "CMBAGENT_OTEL_INGEST_MIN_RATE"
INGEST_MAX_REQUESTS_PER_CLIENT = "CMBAGENT_OTEL_INGEST_MAX_REQUESTS_PER_CLIENT"
INGEST_REQUEST_SPANS = "CMBAGENT_OTEL_INGEST_REQUEST_SPANS"
OFFLINE_BACKEND = "CMBAGENT_OTEL_OFFLINE_BACKEND"
SDK_DISABLED = "OTEL_SDK_DISABLED"
TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
SERVICE_NAME = "OTEL_SERVICE_NAME"
RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
CAPTURE_MESSAGE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
METRICS = "CMBAGENT_OTEL_METRICS"
METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"
OTLP_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"

DEFAULT_WORK_DIR = "~/.cmbagent-otel"
OFF = None  # what a port setting of ``off`` parses to


# --- parsers: text -> value, ValueError when the text is not a valid value ---------------------------
def _text(raw: str) -> str:
    return raw


# The longest wait a timeout setting may ask for: a longer one (1e26 ms) made the batch worker's
# Condition.wait raise OverflowError ("timestamp out of range for platform time_t") and die
MAX_WAIT_S = threading.TIMEOUT_MAX


def clamped(value: float, minimum: float, maximum: float = math.inf) -> float:
    """A number given in code as a setting, within ``[minimum, maximum]`` (NaN: ``minimum``)."""
    number = float(value)
    return minimum if number != number else max(minimum, min(maximum, number))


def _number(kind: type, minimum: float, maximum: float = math.inf) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if value != value or value in (float("inf"), float("-inf")):  # NaN, infinity
            raise ValueError("not a finite number")
        if value < minimum:
            raise ValueError(f"below the minimum {minimum:g}")
        if value > maximum:
            raise ValueError(f"above the maximum {maximum:g}")
        return value

    return parse


def _choice(*choices: str, aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower().replace("-", "_")
        value = (aliases or {}).get(value, value)
        if value not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return value

    return parse


def _boolean(true: frozenset[str], false: frozenset[str]) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in true:
            return True
        if value in false:
            return False
        raise ValueError(f"not one of {', '.join(sorted(true | false))}")

    return parse


def parse_port(raw: str | int) -> int | None:
    """A port number (0: any free port) or ``off``/``none``/``disabled`` (``None``: no receiver)."""
    if isinstance(raw, str):
        if raw.strip().lower() in ("off", "none", "disabled"):
            return OFF
        raw = int(raw)
    if isinstance(raw, bool) or not 0 <= raw <= 65535:
        raise ValueError(f"port must be within 0-65535 (0: any free port) or 'off', got {raw!r}")
    return raw


def _utf8(raw: str) -> None:
    """Refuse bytes that are not UTF-8 (``os.environ`` keeps them as surrogates): no database
    URL can hold them, and every path we derive from them would fail later, in the app."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8") from None


def _database_url(raw: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    _utf8(raw)
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError):
        raise ValueError("not a database URL") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database backend {backend!r} (sqlite or postgresql)")
    if backend == "sqlite" and in_memory_sqlite(parsed.database, parsed.query):
        # each connection gets its own empty database: the schema is never there to write to
        raise ValueError("an in-memory SQLite database (nothing could ever be stored or read back)")
    if backend == "sqlite":
        _usable_path(str(Path(parsed.database).expanduser()))
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"unknown database driver {parsed.drivername!r}") from None
    return raw


def in_memory_sqlite(database: str | None, query: Any) -> bool:
    """Whether a SQLite URL's ``database`` and ``query`` name an in-memory database."""
    return not database or database == ":memory:" or (
        database.startswith("file:") and ("mode=memory" in database or query.get("mode") == "memory"))


def _host(raw: str) -> str:
    """A host name or address to bind: UTF-8, no spaces, at most 253 characters (DNS's bound)."""
    _utf8(raw)
    if len(raw) > 253 or any(c.isspace() for c in raw):
        raise ValueError("not a host name or address")
    return raw


def _path(raw: str) -> str:
    _utf8(raw)
    path = str(Path(raw).expanduser())
    _usable_path(path)
    return path


# Linux's PATH_MAX and NAME_MAX (and most other systems'): a longer path fails every call that
# names it (ENAMETOOLONG), so every spill or replay of the run failed (a traceback logged each time)
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255


def _usable_path(path: str) -> None:
    """Refuse a path the operating system cannot open: longer than :data:`PATH_MAX_BYTES` or with
    a name longer than :data:`NAME_MAX_BYTES` (in UTF-8 bytes)."""
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > PATH_MAX_BYTES:
        raise ValueError(f"a path of {size} bytes, longer than the system takes ({PATH_MAX_BYTES})")
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES for part in path.split(os.sep)):
        raise ValueError(f"a file or folder name in it is longer than the system takes ({NAME_MAX_BYTES} bytes)")


def _exporter_names(builtin: frozenset[str], group: str, what: str) -> Callable[[str], tuple[str, ...]]:
    """Parser of a comma list of exporter names: ``builtin`` ones or those registered under entry point
    ``group`` (looked up only for a name that is not built in)."""
    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(name.strip().lower() for name in raw.split(",") if name.strip())
        known = set(builtin)
        unknown = [name for name in names if name not in known]
        if unknown:
            from importlib.metadata import entry_points

            known |= {entry.name for entry in entry_points(group=group)}
            unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return names
    return parse


_exporters = _exporter_names(frozenset({"otlp", "console", "none", "cmbagent_dag"}),
                             "opentelemetry_traces_exporter", "exporter")
_metrics_exporters = _exporter_names(frozenset({"otlp", "console", "none"}),
                                     "opentelemetry_metrics_exporter", "metrics exporter")


def default_sqlite_path() -> Path:
    """``<CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db``."""
    return Path(get(WORK_DIR)) / "database" / "cmbagent.db"


def _default_database_url() -> str:
    return f"sqlite:///{default_sqlite_path()}"


def _default_spill_dir() -> str:
    return str(Path(get(WORK_DIR)) / "spill")


# --- the table ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One environment variable: ``also`` are older or wider names read after it, with the same parser."""

    name: str
    default: Any
    meaning: str
    parse: Callable[[str], Any] = _text
    also: tuple[str, ...] = ()
    default_text: str | None = None  # how the docs show a computed default
    secret: bool = False  # its value is never logged

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if value is None:
            return "(none)"
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)


_CONTENT_MODES = ("no_content", "span_only", "event_only", "span_and_event")
_CONTENT_ALIASES = {"true": "span_only", "1": "span_only", "yes": "span_only", "on": "span_only",
                    "false": "no_content", "0": "no_content", "no": "no_content", "off": "no_content",
                    "": "no_content"}

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    # where runs are stored
    Setting(DATABASE_URL, _default_database_url,
            "Database of the DAG (`sqlite:///path` or `postgresql+psycopg://...`); `CMBAGENT_DATABASE_URL` is "
            "cmbagent's own variable", _database_url, also=(CMBAGENT_DATABASE_URL,),
            default_text="`sqlite:///<work dir>/database/cmbagent.db`", secret=True),
    Setting(WORK_DIR, lambda: _path(DEFAULT_WORK_DIR),
            "Work dir (cmbagent's variable): holds the default database and spill dir", _path,
            default_text=f"`{DEFAULT_WORK_DIR}`"),
    Setting(SPILL_DIR, _default_spill_dir,
            "Where batches the database refused wait for replay (shared by every database)", _path,
            default_text="`<work dir>/spill`"),
    Setting(SPILL_RESERVE_MB, 256,
            "MiB the spill store leaves free on its filesystem (or 5 % of its size, if less): past that a batch "
            "it would keep is dropped and counted, so the application's own writes never meet a full disk",
            _number(int, 0)),
    Setting(EXPORT_TIMEOUT, 10.0,
            "Seconds the DAG exporter retries a batch (every lock or connection wait included) before spilling it",
            _number(float, 0, MAX_WAIT_S)),
    Setting(SQLITE_BUSY_TIMEOUT_MS, 30_000, "Most milliseconds a SQLite write waits for a lock",
            _number(int, 0, 2**31 - 1)),  # SQLite's busy timeout is a C int
    Setting(COST_RECORDS, "per_agent",
            "`per_agent`: one `cost_records` row per agent, model and phase/step; `off`: none (cmbagent's backend "
            "records costs into the same database)", _choice("per_agent", "off")),
    # batching in the DAG exporter's processor
    Setting(BSP_SCHEDULE_DELAY, 1000,
            "Milliseconds between DAG batch exports (bounds what a `kill -9` loses)",
            _number(float, 1, MAX_WAIT_S * 1000),
            also=("OTEL_BSP_SCHEDULE_DELAY",)),
    Setting(BSP_MAX_QUEUE_SIZE, 2048, "Spans queued for the DAG exporter before the oldest batch spills",
            _number(int, 1), also=("OTEL_BSP_MAX_QUEUE_SIZE",)),
    Setting(BSP_MAX_EXPORT_BATCH_SIZE, 512, "Most spans per DAG batch", _number(int, 1),
            also=("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",)),
    Setting(LIVE_DAG, True, "`true`: run and DAG-node rows show `executing`/`running` while their spans run "
            "(the live DAG); `false`: rows appear when spans end",
            _boolean(frozenset({"true", "1", "on", "yes"}), frozenset({"false", "0", "off", "no", ""}))),
    Setting(FLUSH_ON_SIGNAL, True, "`true`: when SIGTERM or SIGHUP stops the process (and the application has no "
            "handler of its own), the run and its open steps are ended as failed (\"stopped by SIGTERM\") and what was "
            "recorded (spans, then metrics) is exported, within the export timeout, then the process ends by that "
            "signal as before (with `instrument()`, and under `opentelemetry-instrument` through our configurator). "
            "While ours is in place the application sees the default there (`signal.getsignal` answers `SIG_DFL`, "
            "`signal.signal` returns it as the handler replaced, and putting `SIG_DFL` back puts ours back), so its "
            "own handlers and libraries decide as without us. One that got ours all the same (signal's functions "
            "imported before `instrument()`) and calls it as the one it replaced gets only the flush: "
            "nothing is ended, its handler stays and the process goes on, as with the default it would have found. "
            "`false`: it ends at once, the queued spans are lost and the run stays `executing`",
            _boolean(frozenset({"true", "1", "on", "yes"}), frozenset({"false", "0", "off", "no", ""}))),
    # what spans carry
    Setting(CAPTURE_MESSAGE_CONTENT, "no_content",
            "Where message content (prompts, replies, tool arguments) goes: `span_only` (or `true`) on spans, "
            "`event_only` in GenAI content log events, `span_and_event` both, `no_content` (or `false`) nowhere",
            _choice(*_CONTENT_MODES, aliases=_CONTENT_ALIASES)),
    Setting(MAX_ATTRIBUTE_LENGTH, 4096, "Longest attribute value kept (longer ones are cut and marked)",
            _number(int, 1)),
    # which exporters instrument() builds
    Setting(SDK_DISABLED, False, "`true`: instrument() records nothing (OpenTelemetry's switch)",
            _boolean(frozenset({"true"}), frozenset({"false", ""}))),
    Setting(TRACES_EXPORTER, ("cmbagent_dag",),
            "Comma list of `otlp`, `console`, `none`, `cmbagent_dag` or another registered exporter",
            _exporters),
    Setting(OTLP_TRACES_PROTOCOL, "grpc", "Protocol of the `otlp` exporter: `grpc` or `http/protobuf`",
            _choice("grpc", "http/protobuf", aliases={"http": "http/protobuf"}),
            also=("OTEL_EXPORTER_OTLP_PROTOCOL",)),
    # metrics
    Setting(METRICS, True,
            "`false`: instrument() records no metrics (`instrument(metrics=...)` wins over it)",
            _boolean(frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"}))),
    Setting(METRICS_EXPORTER, ("none",),
            "Comma list of `otlp`, `console`, `none` or another registered metrics exporter: instrument() builds "
            "a MeterProvider only when one is named (`none`: metrics go to the global MeterProvider, if the "
            "application set one)", _metrics_exporters),
    Setting(OTLP_METRICS_PROTOCOL, "grpc", "Protocol of the `otlp` metrics exporter: `grpc` or `http/protobuf`",
            _choice("grpc", "http/protobuf", aliases={"http": "http/protobuf"}),
            also=("OTEL_EXPORTER_OTLP_PROTOCOL",)),
    Setting(SERVICE_NAME, None,
            "`service.name` of the spans (read by the SDK; instrument(service_name=) wins over it; unset: "
            "`service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else `cmbagent`)"),
    Setting(RESOURCE_ATTRIBUTES, None, "Resource attributes `k=v,...` (read by the SDK; secrets in them are redacted)"),
    # cmbagent-otel ingest
    Setting(INGEST_HOST, "127.0.0.1", "Address `cmbagent-otel ingest` binds", _host),
    Setting(INGEST_PORT, 4318, "OTLP/HTTP port of the ingest (`0`: any free port, `off`: none)", parse_port),
    Setting(INGEST_GRPC_PORT, 4317, "OTLP/gRPC port of the ingest (`0`: any free port, `off`: none)", parse_port),
    Setting(INGEST_TOKEN, None, "Bearer token the ingest requires from clients", secret=True),
    Setting(INGEST_MAX_BYTES, 16 * 1024 * 1024, "Largest ingest request, compressed and decompressed (bytes)",
            _number(int, 1)),
    Setting(INGEST_MAX_INFLIGHT_BYTES, 128 * 1024 * 1024, "Memory budget of all ingest requests in flight (bytes)",
            _number(int, 1)),
    Setting(INGEST_WORKERS, 2, "Decoding/writing threads per ingest receiver", _number(int, 1)),
    Setting(INGEST_REQUEST_TIMEOUT, 30.0,
            "Seconds an ingest client has to send a request's headers, and again its body (HTTP: plus 1 s per "
            "`CMBAGENT_OTEL_INGEST_MIN_RATE` bytes received; gRPC: the whole message); a slower request gets 408 "
            "(HTTP) or is cancelled (gRPC) and its place and memory are freed", _number(float, 0.001, MAX_WAIT_S)),
    Setting(INGEST_MIN_RATE, 16384,
            "Bytes per second that earn an HTTP request body 1 s more than `CMBAGENT_OTEL_INGEST_REQUEST_TIMEOUT`",
            _number(int, 1)),
    Setting(INGEST_MAX_REQUESTS_PER_CLIENT, 8,
            "Ingest requests one client address may have in flight (both receivers); more get 503/UNAVAILABLE, "
            "and HTTP connections beyond 8 times this are closed", _number(int, 1)),
    Setting(INGEST_REQUEST_SPANS, 50_000,
            "Spans one attempt at an ingest request writes (~15 s of a worker); a larger request is answered "
            "503/UNAVAILABLE with a retry delay after them, and its client's retry continues after the spans stored",
            _number(int, 1)),
    # tests and examples
    Setting(OFFLINE_BACKEND, None,
            "Offline model of `cmbagent_otel.testing`: `client` or `server` (unset: the first the AG2 line accepts)",
            _choice("client", "server")),
)}
"""Every setting, by its (first) name."""

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_warned_lock")  # a forked child must not find it held


# how much of an ignored value (and of the reason, which may quote it) a warning shows: a variable
# may hold up to 128 KiB (Linux's bound on one environment string), and each warning line held it
# whole, twice when the parser's message quoted it
_SHOWN_CHARS = 80
_REASON_CHARS = 300


def _warn_once(name: str, raw: str, reason: str, secret: bool, fallback: str) -> None:
    key = (name, raw if len(raw) <= 1024 else f"{len(raw)}:{hash(raw)}")
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    if secret:
        shown = "<hidden>"
    elif len(raw) > _SHOWN_CHARS:
        shown = f"{raw[:_SHOWN_CHARS]!r}... ({len(raw)} characters)"
    else:
        shown = repr(raw)
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + "..."
    logger.warning("cmbagent_otel: ignoring %s=%s (%s); using %s", name, shown, reason, fallback)


def get(name: str, argument: Any = None) -> Any:
    """The value of setting ``name``: ``argument`` when not ``None``, else the first of the
    setting's variables that is set and valid, else its default. An invalid value is
    logged once and skipped (see the module docstring); this never raises for one."""
    if argument is not None:
        return argument
    setting = SETTINGS[name]
    names = (setting.name, *setting.also)
    for index, variable in enumerate(names):
        raw = os.environ.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            return setting.parse(raw.strip())
        except (ValueError, TypeError) as exc:
            rest = [n for n in names[index + 1:] if (os.environ.get(n) or "").strip()]
            _warn_once(variable, raw, str(exc) or "invalid", setting.secret,
                       rest[0] if rest else f"the default {setting.shown_default()}")
    return setting.default_value()


# --- OTEL_* variables the OpenTelemetry SDK parses itself, raising on a bad value ----------------------
def _sdk_limit(raw: str) -> None:
    value = raw.strip()
    if value and int(value) < 0:  # empty: no limit, for the SDK
        raise ValueError("not a non-negative integer")


def _sdk_seconds(raw: str) -> None:
    _number(float, 0)(raw.strip())


# An OTLP exporter's timeout (seconds) past what its transport can wait failed every export: the
# HTTP exporter's wait raised OverflowError ("timestamp out of range for platform time_t") from
# ~1e10 s, gRPC's deadline overflowed into "Deadline Exceeded" at once from ~9e9 s; every span was
# dropped. 2**31 - 1 s (68 years) is below both.
MAX_OTLP_TIMEOUT_S = 2**31 - 1


def _sdk_otlp_seconds(raw: str) -> None:
    _number(float, 0, MAX_OTLP_TIMEOUT_S)(raw.strip())


# the protocol variable of each signal's OTLP exporter, read before the generic OTEL_EXPORTER_OTLP_PROTOCOL
SDK_PROTOCOLS = {"TRACES": "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "METRICS": "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
              "LOGS": "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"}
_SIGNALS = tuple(SDK_PROTOCOLS)


def _signal_protocol(signal: str) -> str:
    """The OTLP protocol the SDK's exporter of ``signal`` uses (``grpc`` unless set)."""
    raw = os.environ.get(SDK_PROTOCOLS[signal]) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (raw or "grpc").strip().lower()


def _compression_for(signals: tuple[str, ...]) -> Callable[[str], None]:
    """The compression check of a variable read by the exporters of ``signals``: the gRPC exporters
    accept only gzip, the HTTP ones also deflate and none (kept for them: dropping deflate would
    turn an HTTP user's compression off)."""

    def check(raw: str) -> None:
        value = raw.strip().lower()
        if value == "gzip":
            return
        if value not in ("deflate", "none"):
            raise ValueError("not gzip, deflate or none")
        if any(not _signal_protocol(signal).startswith("http") for signal in signals):
            raise ValueError("the gRPC exporters accept only gzip")

    return check


def _sdk_positive_int(raw: str) -> None:
    if int(raw) < 1:
        raise ValueError("not a positive integer")


def _sdk_int(raw: str) -> None:
    int(raw)


def _sdk_delay_ms(raw: str) -> None:
    """A batch processor's schedule delay: a positive integer its worker thread can wait."""
    _sdk_positive_int(raw)
    if int(raw) > MAX_WAIT_S * 1000:  # the SDK's worker died of OverflowError in Condition.wait
        raise ValueError(f"above the maximum {MAX_WAIT_S * 1000:g}")


def _sdk_interval(raw: str) -> None:
    # the periodic metric reader's thread died of OverflowError in Condition.wait above the maximum
    if _number(float, 0, MAX_WAIT_S * 1000)(raw.strip()) == 0:
        raise ValueError("not above 0")


def _sdk_propagators(raw: str) -> None:
    from importlib.metadata import entry_points

    for name in (part.strip() for part in raw.split(",")):
        if name and name.lower() != "none" and not list(entry_points(group="opentelemetry_propagator", name=name)):
            raise ValueError(f"no propagator {name!r} is installed")


def _sdk_context(raw: str) -> None:
    # opentelemetry.context logs a traceback when it is first imported and falls back to contextvars
    from importlib.metadata import entry_points

    if not list(entry_points(group="opentelemetry_context", name=raw)):  # the API does not strip it
        raise ValueError("no such OpenTelemetry context is installed")
    if "opentelemetry.context" in sys.modules:  # loaded already: too late to help
        return
    # installed, but its module or class may raise: the API's first import loads it and logs the
    # traceback of a failure; that record is caught here and said in one line instead
    failure = _ContextLoadFailure()
    api_logger = logging.getLogger("opentelemetry.context")
    api_logger.addFilter(failure)
    try:
        import opentelemetry.context  # noqa: F401  (falls back to contextvars itself)
    finally:
        api_logger.removeFilter(failure)
    if failure.reason is not None:
        raise ValueError(f"it cannot be loaded: {failure.reason}")


class _ContextLoadFailure(logging.Filter):
    """Catches the OpenTelemetry API's record of a context it failed to load (with its traceback)."""

    reason: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to load context"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        self.reason = f"{type(error).__name__}: {error}"[:300] if error is not None else "it failed"
        return False


def _sdk_file(raw: str) -> None:
    # a missing file: the gRPC exporters logged a traceback and went on without it, the HTTP ones
    # failed every export
    if not os.path.exists(raw):  # read as given
        raise ValueError("no such file")


# the (CA certificate, client key, client certificate) variables of the OTLP exporters; a
# client key or certificate is only usable with the other: both are dropped when one is missing
SDK_TLS_FILES = (
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
    ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
     "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE"),
    ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
     "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE"),
    ("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY",
     "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE"),
)


SDK_CHECKED: dict[str, Callable[[str], None]] = {
    **dict.fromkeys((
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
        "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT", "OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT",
        "OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT"), _sdk_limit),
    **dict.fromkeys((
        "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
        "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT"), _sdk_otlp_seconds),
    "OTEL_EXPORTER_OTLP_COMPRESSION": _compression_for(_SIGNALS),
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": _compression_for(("TRACES",)),
    "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": _compression_for(("METRICS",)),
    "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": _compression_for(("LOGS",)),
    "OTEL_PROPAGATORS": _sdk_propagators,
    # the SDK's batch processors and periodic metric reader raise on values below 1 (and log a
    # traceback for non-integers) when they are built
    **dict.fromkeys((
        "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BLRP_MAX_QUEUE_SIZE", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE"), _sdk_positive_int),
    **dict.fromkeys(("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BLRP_SCHEDULE_DELAY"), _sdk_delay_ms),
    **dict.fromkeys(("OTEL_BSP_EXPORT_TIMEOUT", "OTEL_BLRP_EXPORT_TIMEOUT"), _sdk_int),
    "OTEL_METRIC_EXPORT_INTERVAL": _sdk_interval,
    "OTEL_METRIC_EXPORT_TIMEOUT": _sdk_seconds,
    "OTEL_PYTHON_CONTEXT": _sdk_context,
    **dict.fromkeys((name for files in SDK_TLS_FILES for name in files), _sdk_file),
}
"""``OTEL_*`` variables the SDK reads itself and raises on (some when it is imported): checked by
:func:`check_sdk_variables` when cmbagent-otel is imported."""


def check_sdk_variables() -> list[str]:
    """Remove from ``os.environ`` each :data:`SDK_CHECKED` variable whose value the OpenTelemetry
    SDK would raise on (an invalid one is logged once; an empty timeout or compression means
    unset, as the OpenTelemetry specification says, an empty limit "no limit" to the SDK), so
    the SDK uses its default instead of failing the application when it is imported or builds
    a provider or an exporter. Returns the names removed."""
    removed = []
    for name, check in SDK_CHECKED.items():
        raw = os.environ.get(name)
        if raw is None:
            continue
        if raw.strip() or check is _sdk_limit:
            try:
                check(raw)
                continue
            except (ValueError, TypeError) as exc:
                _warn_once(name, raw, str(exc) or "invalid", False, "the OpenTelemetry SDK's default")
        os.environ.pop(name, None)
        removed.append(name)
    for _ca, key, certificate in SDK_TLS_FILES:
        for name, partner in ((key, certificate), (certificate, key)):
            if name in removed and partner not in removed and os.environ.get(partner):
                _warn_once(partner, os.environ[partner], f"{name} is unusable", False,
                           "the OpenTelemetry SDK's default")
                os.environ.pop(partner, None)
                removed.append(partner)
    _check_sdk_batch_sizes()
    _check_header_variables()
    return removed


# (batch size, queue size, the SDK's default batch and queue sizes) of the SDK's batch processors
_SDK_BATCHES = (("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE", 512, 2048),
                ("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "OTEL_BLRP_MAX_QUEUE_SIZE", 512, 2048))


def _check_sdk_batch_sizes() -> None:
    """A batch larger than the queue (``OTEL_BSP_MAX_QUEUE_SIZE=100`` alone is one: the default batch
    is 512) makes the SDK's batch processor raise when it is built: the batch size is lowered to
    the queue size, with a warning."""
    for batch_name, queue_name, batch_default, queue_default in _SDK_BATCHES:
        try:
            batch = int(os.environ.get(batch_name) or batch_default)
            queue = int(os.environ.get(queue_name) or queue_default)
        except ValueError:  # left by the checks above only when empty
            continue
        if batch > queue:
            if os.environ.get(batch_name):
                _warn_once(batch_name, str(batch), f"above {queue_name}={queue}", False, str(queue))
            else:  # the user set only the queue: name it, not a batch size they never set
                logger.warning("cmbagent_otel: %s=%d is below the default batch size %d; using %s=%d",
                               queue_name, queue, batch, batch_name, queue)
            os.environ[batch_name] = str(queue)


HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_LOGS_HEADERS")
"""Variables the OTLP exporters read headers (credentials) from."""


def _check_header_variables() -> None:
    """Drop the entries of the OTLP header variables the exporters cannot parse, with a warning that
    does not show them: the SDK logs a malformed entry whole, and an entry such as
    ``Authorization: Bearer <token>`` (a colon for the ``=``) is a credential."""
    try:
        from opentelemetry.util.re import _DELIMITER_PATTERN, _LIBERAL_HEADER_PATTERN
    except ImportError:  # another API version: the exporters' own parsing and warnings apply
        return
    for name in HEADER_VARIABLES:
        raw = os.environ.get(name)
        if not raw:
            continue
        entries = [entry for entry in _DELIMITER_PATTERN.split(raw) if entry]
        kept = [entry for entry in entries if _LIBERAL_HEADER_PATTERN.fullmatch(entry.strip())]
        if len(kept) < len(entries):
            bad = len(entries) - len(kept)
            _warn_once(name, raw, f"{bad} of its {len(entries)} entries not name=value", True,
                       "the other entries" if kept else "no headers")
            os.environ[name] = ",".join(kept)


check_sdk_variables()  # at import: the package imports this module before any OpenTelemetry SDK module


URL_VARIABLES = (DATABASE_URL, CMBAGENT_DATABASE_URL, "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
"""Variables holding a URL that may carry a credential (a password, a DSN's token, a query key)."""

# headers whose value is a vendor's credential although the name does not say so; and the
# authorization schemes whose token follows a space (the token is a secret on its own too)
_CREDENTIAL_HEADERS = frozenset({"x-honeycomb-team", "uptrace-dsn", "x-sf-token", "x-insert-key", "x-license-key"})
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "apikey", "api-key", "key", "sso-key", "geniekey", "dsn"})
# query parameters that are credentials inside a URL only (Azure Functions' ?code=, Google's ?key=, signatures)
_URL_QUERY_CREDENTIALS = frozenset({"code", "key", "sig", "signature"})


def configured_credentials(is_secret_name: Callable[[str], bool]) -> list[str]:
    """The credentials inside configuration variables whose names do not say they hold one, for
    :mod:`cmbagent_otel.redaction` to treat as registered secrets: each OTLP header's value under a
    secret-named or vendor credential header (``x-honeycomb-team``), or that looks like a token (16
    characters or more with letters and digits), and the token after ``Bearer``/``Basic``; a URL's
    password (not when it is the user's name), an OTLP endpoint's user info without a password (a
    DSN's token), and the values of secret-named query parameters. ``is_secret_name``: whether a
    header or parameter name is a secret's. Never raises."""
    found: list[str] = []
    try:
        for name in HEADER_VARIABLES:
            for entry in (os.environ.get(name) or "").split(","):
                key, eq, value = entry.partition("=")
                if not eq:
                    continue
                found += header_credentials(unquote(key), unquote(value), is_secret_name)
        for name in URL_VARIABLES:
            found += _url_credentials(os.environ.get(name) or "", is_secret_name)
    except Exception:  # telemetry must never break the app
        logger.debug("cmbagent_otel: could not read the credentials of the configuration", exc_info=True)
    return [value for value in found if value]


def header_credentials(name: str, value: str, is_secret_name: Callable[[str], bool],
                       token_like: bool = True) -> list[str]:
    """The credentials an HTTP header ``name: value`` holds by the rule of
    :func:`configured_credentials`: the token after an authorization scheme, and the whole value
    under a secret-named or vendor credential header, or (``token_like``) when it looks like a token."""
    found = []
    key, value = name.strip().lower(), value.strip()
    named = is_secret_name(key)
    scheme, space, token = value.partition(" ")
    if space and (named or scheme.lower() in _AUTH_SCHEMES):  # any scheme under Authorization (a custom auth's)
        token = token.strip()
        found.append(token)
        if scheme.lower() == "basic":  # a server echoing what it was sent may decode it: user:password
            found += _basic_credentials(token)
    if named or key in _CREDENTIAL_HEADERS or (token_like and _looks_like_token(value)):
        found.append(value)
    return found


def _basic_credentials(token: str) -> list[str]:
    """The ``user:password`` a Basic authorization token encodes, and its password."""
    try:
        # bytes that are not UTF-8 (a Latin-1 password, as many clients encode it) kept as surrogates: the
        # password is then registered in each of its renderings (redaction.secret_text)
        decoded = base64.b64decode(token, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return []
    _user, colon, password = decoded.partition(":")
    return [decoded, password] if colon and password else []


PLAIN_HEADERS = frozenset({"user-agent", "accept", "accept-encoding", "accept-language", "connection",
                           "content-type", "content-length", "host"})
"""Headers an HTTP client sends of its own that hold no credential (a version string looks like a token)."""


def headers_credentials(headers: Any, is_secret_name: Callable[[str], bool], limit: int = 64,
                        token_like: bool = True) -> list[str]:
    """:func:`header_credentials` of the first ``limit`` headers of a mapping (a dict, httpx's
    ``Headers``), :data:`PLAIN_HEADERS` left out. ``token_like=False`` for the headers of one request
    (a ``traceparent``, an idempotency key, a request id look like tokens and are new each time)."""
    found: list[str] = []
    for header, value in list(headers.items())[:limit]:
        if isinstance(value, str) and str(header).lower() not in PLAIN_HEADERS:
            found += header_credentials(str(header), value, is_secret_name, token_like)
    return found


def url_credentials(url: str, is_secret_name: Callable[[str], bool]) -> list[str]:
    """The credentials a URL holds by the rule of :func:`configured_credentials` (its password, an
    http(s) user info without one, secret-named and ``code``/``key``/``sig`` query values)."""
    return [value for value in _url_credentials(url, is_secret_name) if value]


def is_query_credential(name: str, is_secret_name: Callable[[str], bool]) -> bool:
    """Whether a URL query parameter ``name`` holds a credential by the rule of
    :func:`configured_credentials`: secret-named, or ``code``/``key``/``sig``/``signature``."""
    return is_secret_name(name) or name.lower() in _URL_QUERY_CREDENTIALS


def _looks_like_token(value: str) -> bool:
    return len(value) >= 16 and not any(c.isspace() for c in value) and any(c.isdigit() for c in value) \
        and any(c.isalpha() for c in value)


def _url_credentials(url: str, is_secret_name: Callable[[str], bool]) -> list[str]:
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        return []
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    userinfo, at, _host = rest[:end].rpartition("@")
    found = []
    if at:
        user, colon, password = userinfo.partition(":")
        if colon and password != user:
            found += {password, unquote(password)}
        elif not colon and scheme.lower() in ("http", "https"):  # https://<token>@host: a DSN
            found.append(unquote(user))
    query = rest[end:].partition("?")[2].partition("#")[0]
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if eq and is_query_credential(unquote(key), is_secret_name):
            found += {value, unquote(value)}
    return found


def database_url(argument: str | None = None) -> str:
    """The database URL as given (not normalised): ``argument`` > ``CMBAGENT_OTEL_DATABASE_URL``
    > ``CMBAGENT_DATABASE_URL`` > the SQLite file in the work dir. The one place it is resolved;
    :func:`cmbagent_otel.dag.database.resolve_url` normalises it."""
    return str(get(DATABASE_URL, argument or None))


def markdown_table() -> str:
    """The settings as a Markdown table (what ``docs/configuration.md`` shows)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS.values():
        names = " (else " + ", ".join(f"`{n}`" for n in setting.also) + ")" if setting.also else ""
        default = setting.shown_default()
        if not default.startswith(("`", "(")):
            default = f"`{default}`"
        lines.append(f"| `{setting.name}`{names} | {default} | {setting.meaning} |")
    return "\n".join(lines)
