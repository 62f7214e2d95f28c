"""Durable spill files: span batches that could not be written are kept on disk and replayed.

A spill file starts with one JSON header line naming the database the spans belong to
(:func:`cmbagent_otel.dag.database.target_of`: the URL without credentials) and how the
rest is encoded, then holds the spans as one OTLP ``ExportTraceServiceRequest`` in
protobuf (``.otlp``, decoded by :mod:`cmbagent_otel.otlp_decode`, the ingest server's
decoder). Spans that OTLP cannot carry exactly (text that is not valid UTF-8, integers
beyond 64 bits, an empty name...) go to a JSON-lines file with the same header
(``.jsonl``) instead of being altered. Files written before headers existed (JSON lines,
no header, no recorded database) are still read; they replay only where
``cmbagent-otel replay --to URL`` says.

A file is written to ``*.tmp``, fsynced, then renamed, so it either exists complete or not
at all; its writer holds an advisory lock on it until then. A ``.tmp`` left by a process that
died mid-write (no lock held) is renamed into place when its header shows it complete, else
removed (:meth:`SpillStore.recover`). Replay deletes a file
only after its batch was written; because the DAG writer is idempotent (row ids derive from
trace and span ids), replaying a batch twice, or a batch that partly reached the database
before, still leaves every span in the database once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import environment_variables, redaction
from ._forksafe import closer, hold_fd, open_into
from ._jsontext import loads
from ._varblock import CExit
from .semconv import SPAN_KIND

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; recover() decides by the writer's pid and the file's age
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("cmbagent_otel")

SPILL_DIR_ENV = "CMBAGENT_OTEL_SPILL_DIR"
FORMAT = "cmbagent-otel-spill"
FORMAT_VERSION = 2
OTLP_SUFFIX = ".otlp"
SUFFIX = ".jsonl"  # JSON lines: spans OTLP cannot carry exactly, and files from before headers
SUFFIXES = (OTLP_SUFFIX, SUFFIX)
MAX_SPANS_PER_FILE = 1024  # bounds the time one file takes to replay
STALE_TMP_S = 60.0  # without locks: a .tmp this old is taken as abandoned when its writer's pid is alive
_NAME = re.compile(r"^spill-(?P<ns>\d+)-(?P<pid>\d+)-(?P<seq>\d+)(?:-(?P<key>[0-9a-f]{12}))?\.(?:otlp|jsonl)$")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def target_key(target: str) -> str:
    """The short key of a database target used in spill file names."""
    return hashlib.sha256(target.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# --- JSON-lines records (spans OTLP cannot carry exactly, and old files) ------------------------

def _attrs(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in dict(value or {}).items():
        out[str(key)] = list(item) if isinstance(item, tuple) else item
    return out


def _context(ctx: SpanContext | None) -> list[Any] | None:
    if ctx is None:
        return None
    return [format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags), ctx.is_remote]


def _from_context(raw: list[Any] | None) -> SpanContext | None:
    if not raw:
        return None
    return SpanContext(int(raw[0], 16), int(raw[1], 16), bool(raw[3]), TraceFlags(int(raw[2])))


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """A JSON-safe dict holding everything the exporters read from ``span``."""
    scope = span.instrumentation_scope
    return {
        "v": 1,
        "name": span.name,
        "context": _context(span.context),
        "parent": _context(span.parent),
        "kind": span.kind.name if span.kind is not None else "INTERNAL",
        "start": span.start_time,
        "end": span.end_time,
        "attributes": _attrs(span.attributes),
        "status": [span.status.status_code.name, span.status.description],
        "events": [{"name": e.name, "timestamp": e.timestamp, "attributes": _attrs(e.attributes)}
                   for e in span.events],
        "links": [{"context": _context(link.context), "attributes": _attrs(link.attributes)} for link in span.links],
        "resource": _attrs(span.resource.attributes if span.resource is not None else {}),
        "scope": [scope.name, scope.version] if scope is not None else None,
    }


def _tuples(value: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def record_to_span(record: dict[str, Any]) -> ReadableSpan:
    """Rebuild a ``ReadableSpan`` from :func:`span_to_record` output."""
    code, description = record.get("status") or ["UNSET", None]
    status_code = StatusCode[code]
    scope = record.get("scope")
    return ReadableSpan(
        name=record["name"],
        context=_from_context(record.get("context")),
        parent=_from_context(record.get("parent")),
        resource=Resource(_tuples(record.get("resource") or {})),
        attributes=_tuples(record.get("attributes") or {}),
        events=[Event(e["name"], _tuples(e.get("attributes") or {}), e.get("timestamp"))
                for e in record.get("events") or []],
        links=[Link(_from_context(link["context"]), _tuples(link.get("attributes") or {}))  # type: ignore[arg-type]
               for link in record.get("links") or []],
        kind=SpanKind[record.get("kind") or "INTERNAL"],
        status=Status(status_code, description if status_code is StatusCode.ERROR else None),
        start_time=record.get("start"),
        end_time=record.get("end"),
        instrumentation_scope=InstrumentationScope(scope[0], scope[1]) if scope else None,
    )


# --- OTLP ----------------------------------------------------------------------------------------

def _text_ok(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _value_ok(value: Any) -> bool:
    if value is None or isinstance(value, (bool, float)):
        return True
    if isinstance(value, str):
        return _text_ok(value)
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if isinstance(value, (tuple, list)):
        return all(item is not None and not isinstance(item, (tuple, list)) and _value_ok(item) for item in value)
    return False


def _attributes_ok(attributes: Any) -> bool:
    return all(isinstance(k, str) and _text_ok(k) and _value_ok(v) for k, v in (attributes or {}).items())


def _context_ok(ctx: SpanContext | None) -> bool:
    return ctx is not None and 0 < ctx.trace_id < (1 << 128) and 0 < ctx.span_id < (1 << 64)


def otlp_exact(span: ReadableSpan) -> bool:
    """Whether OTLP protobuf carries ``span`` without loss and our decoder accepts it back.

    The SDK's encoder silently leaves out an attribute it cannot encode (a lone surrogate,
    an integer beyond 64 bits), and the decoder rejects spans without a name, ids, or that
    end before they start; such spans are spilled as JSON lines instead.
    """
    try:
        if not span.name or not isinstance(span.name, str) or not _text_ok(span.name):
            return False
        if not _context_ok(span.context) or (span.parent is not None and not 0 < span.parent.span_id < (1 << 64)):
            return False
        if span.start_time is None or (span.end_time is not None and span.end_time < span.start_time):
            return False
        if not _attributes_ok(span.attributes) or not _attributes_ok(span.resource.attributes):
            return False
        description = span.status.description
        if description is not None and not _text_ok(description):
            return False
        for event in span.events:
            if not isinstance(event.name, str) or not _text_ok(event.name) or not _attributes_ok(event.attributes):
                return False
        for link in span.links:
            if not _context_ok(link.context) or not _attributes_ok(link.attributes):
                return False
        scope = span.instrumentation_scope
        return scope is None or all(part is None or _text_ok(part) for part in (scope.name, scope.version))
    except Exception:  # a span we cannot even inspect goes the JSON way
        return False


def _encode_otlp(spans: Sequence[ReadableSpan]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializeToString()  # type: ignore[no-any-return]


def _decode_otlp(body: bytes) -> tuple[list[ReadableSpan], int]:
    from .otlp_decode import decode_protobuf

    batch = decode_protobuf(body)
    return list(batch.spans), batch.rejected


# --- files ---------------------------------------------------------------------------------------

class SpillFileError(ValueError):
    """A spill file cannot be read (truncated, corrupt, or not a spill file)."""


class SpillUnreadable(OSError):
    """The spill store or one of its files cannot be read *now*: the process has no free
    descriptor (``EMFILE``), the system's file table is full, an I/O error, a permission not
    granted yet. Nothing says the files are damaged: they are kept and read again later."""


# what a file's kind makes unreadable (a link, a FIFO, a device, a directory: set aside as .bad,
# see _open_regular), or that it is gone (replayed meanwhile by another process)
_NOT_A_SPILL_FILE = frozenset({None, errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EISDIR, errno.ENOENT})


def _unreadable_now(exc: OSError) -> SpillUnreadable | None:
    """``exc`` as :class:`SpillUnreadable` when it says nothing about the file itself."""
    if isinstance(exc, SpillUnreadable):
        return exc
    if exc.errno in _NOT_A_SPILL_FILE or exc.errno == errno.ENOTDIR:
        return None
    return SpillUnreadable(exc.errno, exc.strerror or str(exc), exc.filename)


class SpillFailed(OSError):
    """Writing spill files failed (disk full, no permission) after ``spilled`` spans were
    already kept in ``paths``; the other spans are not on disk."""

    def __init__(self, error: OSError, spilled: int, paths: list[Path]) -> None:
        super().__init__(error.errno, error.strerror or str(error), error.filename)
        self.spilled = spilled
        self.paths = paths


class PermanentFailure(Exception):
    """Raised by a replay ``write`` callback: this batch can never be written (not retryable)."""


@dataclass
class SpillFile:
    """One spill file's contents."""

    path: Path
    target: str | None  # None: written before headers existed, its database is unknown
    spans: list[ReadableSpan]
    rejected: int = 0  # spans the decoder refused (none unless the file was altered)


def _header(target: str | None, encoding: str, spans: int, size: int | None) -> bytes:
    head: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "target": target,
                            "encoding": encoding, "spans": spans, "created": time.time()}
    if size is not None:
        head["bytes"] = size
    return json.dumps(head, ensure_ascii=True).encode("ascii") + b"\n"


def _parse_header(line: bytes) -> dict[str, Any] | None:
    if not line.startswith(b'{"format"'):
        return None
    try:
        head = loads(line)
    except ValueError:
        return None
    return head if isinstance(head, dict) and head.get("format") == FORMAT else None


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading when it is a regular file, never through a symlink: a FIFO
    named like a spill file would block the reader for ever, ``/dev/zero`` behind a symlink
    would be read without end. Raises OSError otherwise, and :class:`SpillUnreadable` for a file
    another user owns (never replayed, left in place: in a spill folder others can write, such as
    one they created before the store did, it would put the runs they wrote into our database;
    the files we write are always our own)."""
    opened: list[int] = []
    close = closer(opened)
    handles: list[Any] = []
    try:  # a Ctrl-C as os.open returned leaked the descriptor (see open_into)
        fd = open_into(opened, path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        if _EUID is not None and info.st_uid != _EUID():
            raise SpillUnreadable(errno.EPERM, f"owned by another user (uid {info.st_uid}), not ours: left in "
                                  "place (replay it as that user)", str(path))
        # the file object owns the descriptor from the C call that makes and stores it: os.fdopen (Python)
        # interrupted as it returned lost the object, which closed the descriptor, and the number was closed
        # again below (EBADF in place of the interrupt, or a number another thread had just opened)
        handles.extend(map(functools.partial(io.open, mode="rb"), opened))
        return handles[0]
    except BaseException:
        if handles:
            handles[0].close()
        else:
            close()
        raise


_EUID = getattr(os, "geteuid", None)  # None on Windows (no owners to compare)


def file_target(path: Path) -> str | None:
    """The database a spill file records (``None`` for files from before headers, or unreadable)."""
    try:
        with _open_regular(path) as handle:
            head = _parse_header(handle.readline(65536))
    except OSError:
        return None
    target = head.get("target") if head else None
    return target if isinstance(target, str) else None


def read_spill(path: Path) -> SpillFile:
    """Read a spill file (any version). Raises :class:`SpillFileError` when it is not whole (or
    not a regular file, or gone), :class:`SpillUnreadable` when it cannot be read now."""
    try:
        with _open_regular(path) as handle:
            first = handle.readline()
            head = _parse_header(first)
            rest = handle.read()
    except OSError as exc:
        now = _unreadable_now(exc)
        if now is not None:
            raise now from exc
        raise SpillFileError(f"{path}: {exc}") from exc
    try:
        return _read_body(path, first, head, rest)
    except SpillFileError:
        raise
    except Exception as exc:  # any content (bad UTF-8, JSON nested past the recursion limit...) is a bad file
        raise SpillFileError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _read_body(path: Path, first: bytes, head: dict[str, Any] | None, rest: bytes) -> SpillFile:
    if head is None:
        return SpillFile(path, None, _jsonl_spans(path, first + rest))
    target = head.get("target")
    if head.get("encoding") == "otlp-protobuf":
        if head.get("bytes") != len(rest):
            raise SpillFileError(f"{path}: truncated ({len(rest)} of {head.get('bytes')} bytes)")
        try:
            spans, rejected = _decode_otlp(rest)
        except ValueError as exc:
            raise SpillFileError(f"{path}: {exc}") from exc
        return SpillFile(path, target, spans, rejected)
    if head.get("encoding") == "jsonl":
        spans = _jsonl_spans(path, rest)
        if len(spans) != head.get("spans"):
            raise SpillFileError(f"{path}: truncated ({len(spans)} of {head.get('spans')} spans)")
        return SpillFile(path, target, spans)
    raise SpillFileError(f"{path}: unknown encoding {head.get('encoding')!r}")


def _jsonl_spans(path: Path, data: bytes) -> list[ReadableSpan]:
    spans = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            spans.append(record_to_span(loads(line)))
        except Exception as exc:
            raise SpillFileError(f"{path}:{number}: not a spill record ({type(exc).__name__}: {exc})") from exc
    return spans


def _hold(fd: int) -> None:
    """Lock the ``.tmp`` being written (``fd``) for as long as it is open: the lock, not the file's age by
    the wall clock, tells :meth:`SpillStore.recover` in another process that its writer is alive. An NTP
    step forward, a resumed VM or an fsync stalled for a minute made a file being written look abandoned:
    removed under its writer, or renamed into place before it was whole. The kernel drops the lock when
    the writer dies, whatever pid comes next; a child forked meanwhile closes its copy (:func:`hold_fd`),
    which would keep it past its writer's death. Nothing when locks are not available (a filesystem without
    them: the age rule then decides)."""
    if fcntl is not None:
        hold_fd(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file (O_EXCL): never held by another


def _abandoned(tmp: Path) -> contextlib.AbstractContextManager[bool]:
    """Whether no live writer holds ``tmp`` (see :func:`_hold`); held by this recover() while the block runs,
    so two processes recovering at once do not both take it. ``True`` without locks (the age rule decided).
    Let go however the block is left (:class:`~cmbagent_otel._varblock.CExit`: a Ctrl-C as the block was
    entered or left kept the ``.tmp`` locked while the interrupt's traceback was kept: a writer alive to
    every recover())."""
    if fcntl is None:
        return contextlib.nullcontext(True)
    return _Abandoned(tmp)


class _Abandoned(CExit):
    """:func:`_abandoned`'s block: its exit closes the ``.tmp``'s descriptor (:func:`~cmbagent_otel._forksafe.closer`:
    forgotten after the close, so a child forked before it closes its copy: a writer alive to recover())."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self._tmp = tmp
        self._opened: list[int] = []
        self.close = closer(self._opened)  # type: ignore[method-assign]

    def __enter__(self) -> bool:  # type: ignore[override]
        try:  # from the descriptor's opening: a Ctrl-C as os.open returned (or at hold_fd's call) leaked it
            return self._held()
        except BaseException:  # the block is not entered: its exit never runs
            self.close()
            raise

    def _held(self) -> bool:
        try:
            fd = open_into(self._opened, self._tmp,
                           os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return False  # renamed by its writer meanwhile, or not ours to open: left alone
        hold_fd(fd)  # a child forked meanwhile must not keep it: a writer alive, to every recover()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # a filesystem without locks: the age rule decided
        # another recover() (or its writer) may have renamed it into place and let go between our
        # open and our lock: what we hold is then a complete file under another name, not ours
        return _same_file(fd, self._tmp)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        held, named = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


_SHORT = 256  # what the DAG mapping redacts whole; longer values it cuts and redacts as safe_text does


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return redaction.redact(value) if len(value) <= _SHORT else redaction.safe_text(value)
    if isinstance(value, (tuple, list)):
        if len(value) > 1:
            redaction.learn_split_secrets(value)
        return tuple(_clean_value(item) for item in value)
    return value


def _clean_attributes(attributes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if redaction.is_secret_key(str(key)):
            redaction.learn_secrets_in({key: value})
            out[key] = redaction.REDACTED
        else:
            out[_clean_value(key) if type(key) is str else key] = _clean_value(value)  # a key may quote a secret
    return out


def without_secrets(spans: Sequence[ReadableSpan]) -> Sequence[ReadableSpan]:
    """``spans`` with every span of another instrumentation scrubbed as the DAG mapping scrubs it
    (secret-named attributes, redacted strings, span name, status, event and link attributes): a spill file
    is on disk until it is replayed, and another instrumentation's spans carry what it recorded
    unredacted (an ``Authorization`` header, a URL with its password). Ours are redacted already
    and pass as they are, so what is stored after replay does not change. Every span's resource is
    scrubbed the same way (a provider the application built keeps ``OTEL_RESOURCE_ATTRIBUTES`` as
    given, and the spill file holds it). Never raises (a span it cannot copy is kept as it was)."""
    out: list[ReadableSpan] | None = None
    for index, span in enumerate(spans):
        try:
            resource = _clean_resource(span.resource)
            name, attributes, events, links, status = span.name, span.attributes, span.events, span.links, span.status
            if (attributes or {}).get(SPAN_KIND) is not None:  # ours: only the resource may need it
                if resource is span.resource:
                    continue
            else:
                name = redaction.redact(name) or name
                attributes = _clean_attributes(attributes)
                events = [Event(e.name, _clean_attributes(e.attributes), e.timestamp) for e in events]
                links = [Link(link.context, _clean_attributes(link.attributes)) if link.attributes else link
                         for link in links]
                description = redaction.redact(status.description) if status.description else None
                status = Status(status.status_code, description)
            clean = ReadableSpan(
                name=name, context=span.context, parent=span.parent, resource=resource, attributes=attributes,
                events=events, links=links, kind=span.kind, instrumentation_scope=span.instrumentation_scope,
                status=status, start_time=span.start_time, end_time=span.end_time)
        except Exception:
            logger.debug("cmbagent_otel: could not scrub a span for the spill store", exc_info=True)
            continue
        if out is None:
            out = list(spans)
        out[index] = clean
    return spans if out is None else out


# resource -> (it, the secrets' version, its scrubbed copy or itself when clean): a process has one or
# a few, shared by every span
_clean_resources: dict[int, tuple[Resource, int, Resource]] = {}


def _clean_resource(resource: Resource) -> Resource:
    found = _clean_resources.get(id(resource))
    if found is not None and found[0] is resource and found[1] == redaction.secrets_version:
        return found[2]
    attributes = resource.attributes
    cleaned = _clean_attributes(attributes)
    clean = resource if cleaned == dict(attributes) else Resource(cleaned, resource.schema_url)
    if len(_clean_resources) >= 16:
        _clean_resources.clear()  # a bound, not a cache policy
    _clean_resources[id(resource)] = (resource, redaction.secrets_version, clean)
    return clean


_sequence = itertools.count(1)  # spill files named by this process (next() is one atomic step)


class SpillStore:
    """A directory of durable spill files (one batch, or a slice of one, per file).

    ``target`` (see :func:`cmbagent_otel.dag.database.target_of`) is recorded in every file
    this store writes, and :meth:`pending`/:meth:`replay` only see files recorded for it;
    ``target=None`` sees every file (for inspection and ``cmbagent-otel replay``).
    """

    def __init__(self, directory: str | os.PathLike[str], target: str | None = None) -> None:
        self.directory = Path(directory)
        self.target = target
        self._key = target_key(target) if target is not None else None
        self._reserve = int(environment_variables.get(environment_variables.SPILL_RESERVE_MB)) << 20
        self._foreign_said = False

    def _name(self, suffix: str) -> Path:
        key = f"-{self._key}" if self._key else ""
        # unique by the pid and the process's count alone: the time only orders them, and a wall clock
        # that stands still (freezegun, a coarse clock) or steps back onto a time used gave two stores of
        # one process the same name, the second file replacing the first
        return self.directory / f"spill-{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}{key}{suffix}"

    def append(self, spans: Sequence[ReadableSpan]) -> list[Path]:
        """Write ``spans`` durably (OTLP protobuf where exact, else JSON lines), at most
        :data:`MAX_SPANS_PER_FILE` per file; returns the new files. Raises ``OSError``
        (disk full, no permission) having removed any partial file."""
        paths: list[Path] = []
        spilled = 0
        spans = without_secrets(spans)
        try:
            # only its owner reads the spans (prompts, outputs, code): a folder we create is 0700
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            exact = [s for s in spans if otlp_exact(s)]
            other = [s for s in spans if not otlp_exact(s)] if len(exact) != len(spans) else []
            for start in range(0, len(exact), MAX_SPANS_PER_FILE):
                chunk = exact[start:start + MAX_SPANS_PER_FILE]
                try:
                    body = _encode_otlp(chunk)
                except Exception:  # an encoder surprise: keep the spans as JSON lines, never lose them
                    logger.debug("cmbagent_otel: OTLP encoding failed, spilling JSON lines", exc_info=True)
                    other.extend(chunk)
                    continue
                data = _header(self.target, "otlp-protobuf", len(chunk), len(body)) + body
                paths.append(self._write(self._name(OTLP_SUFFIX), data))
                spilled += len(chunk)
            for start in range(0, len(other), MAX_SPANS_PER_FILE):
                chunk = other[start:start + MAX_SPANS_PER_FILE]
                lines = b"".join(
                    json.dumps(span_to_record(s), ensure_ascii=True, default=repr).encode("ascii") + b"\n"
                    for s in chunk)
                data = _header(self.target, "jsonl", len(chunk), None) + lines
                paths.append(self._write(self._name(SUFFIX), data))
                spilled += len(chunk)
        except OSError as exc:
            if paths:
                _fsync_dir(self.directory)
            raise SpillFailed(exc, spilled, paths) from exc
        if paths:
            _fsync_dir(self.directory)
        return paths

    def _room(self, size: int) -> None:
        """Raise ``ENOSPC`` when ``size`` more bytes would leave the spill directory's filesystem
        with less free space than the reserve (``CMBAGENT_OTEL_SPILL_RESERVE_MB``, or 5 % of the
        filesystem if less): a database down for hours must not fill the disk the application
        writes its own results to (the spill store used to grow until the disk was full)."""
        try:
            st = os.statvfs(self.directory)
        except (OSError, AttributeError):  # no statvfs (Windows): the disk-full errors still apply
            return
        reserve = min(self._reserve, st.f_blocks * st.f_frsize // 20)
        if st.f_bavail * st.f_frsize - size < reserve:
            raise OSError(errno.ENOSPC, f"leaving {reserve / (1 << 20):.1f} MiB free for the application "
                                        f"({environment_variables.SPILL_RESERVE_MB})", str(self.directory))

    def _write(self, final: Path, data: bytes) -> Path:
        self._room(len(data))
        tmp = final.with_name(final.name + ".tmp")
        # a new file, readable by its owner alone (the umask's 0644 let every local user read the
        # spans), never through a name already there (a symlink another user of a shared spill
        # folder planted was written through): that raises here, the batch is not spilled (counted)
        # and the name, not ours, is left alone
        opened: list[int] = []
        close = closer(opened)
        try:
            try:  # the open inside: a Ctrl-C as os.open returned (see open_into), at _hold's call (or in it,
                # before its flock) leaked the descriptor and left the .tmp
                fd = open_into(opened, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                               0o600)
                _hold(fd)  # until the file is renamed: recover() in another process leaves it alone
                with os.fdopen(fd, "wb", closefd=False) as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if fcntl is not None:
                    # renamed while still locked: closed first, a whole .tmp was a recover()'s to take
                    # under its writer, whose own rename then failed and reported the batch lost
                    os.replace(tmp, final)
            finally:
                close()  # forgotten after the close: a child forked before it closes its copy
            if fcntl is None:
                os.replace(tmp, final)  # Windows: an open file is not renamed
        except BaseException:
            if opened:  # O_EXCL made it ours; a name already there (the open refused) is left alone
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
            raise
        return final

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        try:
            names = [p for p in self.directory.iterdir() if p.name.endswith(SUFFIXES)]
        except OSError as exc:  # gone meanwhile: none; not readable now: the caller tries later
            now = _unreadable_now(exc)
            if now is not None:
                raise now from exc
            return []
        if _EUID is not None and names:
            names = self._own(names)
        return sorted(names, key=lambda p: p.name)

    def _own(self, names: list[Path]) -> list[Path]:
        """The files of ``names`` this user owns: another user's are not pending (never replayed nor
        set aside; see :func:`_open_regular`), said once per store."""
        euid = _EUID() if _EUID is not None else None
        own, foreign = [], 0
        for path in names:
            try:
                mine = path.lstat().st_uid == euid
            except OSError:
                mine = True  # gone meanwhile, or unreadable now: the reader decides
            if mine:
                own.append(path)
            else:
                foreign += 1
        if foreign and not self._foreign_said:
            self._foreign_said = True
            logger.warning("cmbagent_otel: %d spill file(s) in %s are owned by another user: left in place, "
                           "never replayed (a folder other users can write; replay them as their owner)",
                           foreign, self.directory)
        return own

    def pending(self) -> list[Path]:
        """Complete spill files of this store's target (every file when it has none), oldest first.
        Raises :class:`SpillUnreadable` when the folder cannot be listed now."""
        files = self._files()
        if self._key is None:
            return files
        return [p for p in files if (m := _NAME.match(p.name)) is not None and m.group("key") == self._key]

    def legacy(self) -> list[Path]:
        """Files written before spill files recorded their database (no target: replay needs ``--to``)."""
        return [p for p in self._files() if (m := _NAME.match(p.name)) is None or m.group("key") is None]

    @staticmethod
    def read(path: Path) -> list[ReadableSpan]:
        """The spans of one spill file (raises :class:`SpillFileError`)."""
        return read_spill(path).spans

    def recover(self) -> int:
        """Deal with ``.tmp`` files left by processes that died while writing them: a complete
        one is renamed into place (replayed like any other), an incomplete one removed
        (its spans had not been reported spilled). Returns how many were handled."""
        if not self.directory.is_dir():
            return 0
        handled = 0
        now = time.time()
        try:  # not glob(): it takes a folder it cannot list for an empty one (3.12)
            leftovers = sorted(p for p in self.directory.iterdir()
                               if p.name.startswith("spill-") and p.name.endswith(".tmp"))
        except OSError as exc:
            unreadable = _unreadable_now(exc)
            if unreadable is not None:
                raise unreadable from exc
            return 0
        for tmp in leftovers:
            final = tmp.with_name(tmp.name[: -len(".tmp")])
            match = _NAME.match(final.name)
            try:
                age = now - tmp.stat().st_mtime
            except OSError:
                continue
            pid = int(match.group("pid")) if match else -1
            if pid == os.getpid() or (age < STALE_TMP_S and pid > 0 and _pid_alive(pid)):
                continue  # possibly still being written
            with _abandoned(tmp) as abandoned:
                if not abandoned:
                    continue  # its writer holds it: being written, however old the wall clock makes it look
                try:
                    # empty (the writer died between creating and writing it): nothing was reported spilled
                    whole = bool(read_spill(tmp).spans)
                except SpillUnreadable:
                    continue  # cannot tell now: decided by a later recover()
                except SpillFileError:
                    whole = False
                if not whole:
                    logger.warning("cmbagent_otel: removing incomplete spill file %s (its writer died mid-write)",
                                   tmp)
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                else:
                    if match is None:
                        continue
                    logger.info("cmbagent_otel: recovered complete spill file %s", final)
                    with contextlib.suppress(OSError):
                        os.replace(tmp, final)
            handled += 1
        return handled

    def replay(self, write: Callable[[Sequence[ReadableSpan]], bool | int], *, budget_s: float | None = None,
               files: Sequence[Path] | None = None, on_rejected: Callable[[Path, int], None] | None = None,
               ) -> tuple[int, int]:
        """Feed pending files (or ``files``) to ``write``; delete the files it is done with.

        ``write`` returns True (all stored), False (not now: stop here) or the number of
        spans it stored when it dealt with the others itself (dropped them, with a log line).

        Returns ``(spans replayed, files left)``. Stops at the first file ``write`` refuses,
        and, with ``budget_s``, before starting a file once that many seconds have passed,
        keeping the rest for the next call. A corrupt file is renamed to ``*.bad`` and
        skipped, never deleted; so is a file ``write`` refuses for good (it raised
        :class:`PermanentFailure`) and a file some of whose spans the decoder refused (after
        its other spans were written); ``on_rejected(path, count)`` is told of the spans
        left out in those two cases. A file that cannot be read now (:class:`SpillUnreadable`:
        no free descriptor, an I/O error) is kept in place and counted left; listing the folder
        may raise :class:`SpillUnreadable`.
        """
        replayed = kept = 0
        todo = list(self.pending() if files is None else files)
        started = time.monotonic()
        for index, path in enumerate(todo):
            if budget_s is not None and index and time.monotonic() - started >= budget_s:
                return replayed, kept + len(todo) - index
            try:
                spill = read_spill(path)
            except SpillUnreadable as exc:
                kept += 1  # the file is whole as far as anyone knows: kept for a later replay
                logger.log(logging.WARNING if kept == 1 else logging.DEBUG,
                           "cmbagent_otel: spill file %s cannot be read now (%s); kept for a later replay",
                           path, exc.strerror or exc)
                continue
            except SpillFileError:
                if not path.exists():
                    continue  # replayed meanwhile by another process
                logger.warning("cmbagent_otel: unreadable spill file %s kept as .bad", path, exc_info=True)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".bad"))
                continue
            if self.target is not None and spill.target != self.target:
                continue  # a key collision or a renamed file: not ours
            try:
                stored: bool | int = True if not spill.spans else write(spill.spans)
            except PermanentFailure:
                logger.warning("cmbagent_otel: spill file %s cannot be written (see the error above); kept as .bad",
                               path)
                if on_rejected is not None:
                    on_rejected(path, len(spill.spans))
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".bad"))
                continue
            if stored is False:
                return replayed, kept + len(todo) - index
            replayed += len(spill.spans) if stored is True else int(stored)
            if spill.rejected:
                logger.warning("cmbagent_otel: %d spans of spill file %s could not be decoded; kept as .bad",
                               spill.rejected, path)
                if on_rejected is not None:
                    on_rejected(path, spill.rejected)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".bad"))
                continue
            path.unlink(missing_ok=True)
        return replayed, kept

    def __iter__(self) -> Iterator[Path]:
        return iter(self.pending())


def _fsync_dir(directory: Path) -> None:
    opened: list[int] = []
    close = closer(opened)
    try:  # a Ctrl-C as os.open returned leaked the descriptor (see open_into)
        os.fsync(open_into(opened, directory, os.O_RDONLY))
    except OSError:
        pass
    finally:
        close()
