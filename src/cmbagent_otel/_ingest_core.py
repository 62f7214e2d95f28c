"""What the OTLP/HTTP and OTLP/gRPC receivers of ``cmbagent-otel ingest`` share.

Authentication (a bearer token), the memory budget (:class:`Admission`: every request
reserves what its body and its decoding may take, or is turned away with a retryable
503/UNAVAILABLE), decompression of gzip bodies (every member, bounded), bounded decoding
(:mod:`cmbagent_otel.otlp_decode`) and writing the spans to the DAG database in chunks, so
a large request never holds all its spans in memory at once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan

from ._forksafe import reset_in_child
from ._ingest_pool import seconds_left
from .otlp_decode import Limits, MalformedPayload, iter_json, iter_protobuf, json_cost
from .redaction import register_secret

if TYPE_CHECKING:
    from .dag.halving import Halving

logger = logging.getLogger("cmbagent_otel.ingest")

# Memory a request may take per byte of body, reserved when it is admitted (before the body
# is read). JSON: json.loads builds a dict per object and a str per string, ~12 times the
# text for OTLP/JSON (corrected from the body's own structure once it is read). Protobuf:
# the body plus the spans of one chunk and their rows.
JSON_FACTOR = 12
PROTOBUF_FACTOR = 2
CHUNK_SPANS = 1000  # spans written per transaction: a large request never holds all its spans
# Seconds a chunk may wait for the database (this server's other writes, another process's
# lock, a connection, a statement), counted from when the request was admitted to writing,
# before it is answered 503/UNAVAILABLE (the writer gets at least 1 s of its own). The OTLP
# exporters give up after 10 s by default and wait the 5 s of Retry-After before retrying:
# a longer wait makes them time out instead, and drop the batch without a retry. It also
# keeps every write of a stopping server well inside uvicorn's and grpcio's 5 s grace.
WRITE_WAIT = 3.0
# Seconds the search for the spans a database refuses (a chunk written in halves, ~20 writes for 1,000
# spans with one such span) may take in all, from when the chunk's first write failed: each piece waits
# for the database no longer than what is left, and past them the request is answered 503/UNAVAILABLE.
# Each piece had a WRITE_WAIT of its own, so on a slow database a request outlasted its client's 10 s
# (the client gave up and sent it again while it was still being written) and a stopping server's 5 s
# grace. With the first write's WRITE_WAIT (and the writer's 1 s floor) a chunk ends within ~8.5 s.
HALVING_WAIT = 3.5
# Searches cut short (a request answered 503 in the middle of one) kept for their client's retry, which
# continues the search rather than starting it over: on a database that stayed too slow every retry
# started again from the whole chunk and such a request was never stored. Each holds a chunk's span
# positions (at most CHUNK_SPANS) and three numbers. When KEPT_SEARCHES are kept, the least recently
# cut short is forgotten only once KEPT_SEARCH_AGE_S old (its client gave up); a younger one stays and
# the new search is not kept (its request starts over at its retry, until a kept one is done). Evicting
# the oldest at once made every request of more stuck at once than KEPT_SEARCHES, retried in turn as OTLP
# clients do, find its search evicted by another's: none was ever stored.
KEPT_SEARCHES = 16
KEPT_SEARCH_AGE_S = 300.0
# Seconds the server's start gives its background schema check (see IngestCore.prepare_soon);
# past them the first write does it, within its own WRITE_WAIT.
STARTUP_PREPARE_S = 10.0
# Seconds past STARTUP_PREPARE_S that startup_error waits for the check (its connection's own limits)
# before saying nothing of it: the thread may be another caller's, bounded to 120 s (see prepare_soon)
STARTUP_REPORT_MARGIN_S = 2.0


class SpanWriter(Protocol):
    """What the server needs from a writer: store one batch in one transaction."""

    def write(self, spans: Sequence[ReadableSpan]) -> Any: ...


class IngestError(Exception):
    """A request that cannot be served: ``kind`` is one of ``invalid``, ``too_large``,
    ``unavailable`` (retry later), ``unauthenticated``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Outcome:
    """A served request: how many spans were stored and how many rejected (and why)."""

    written: int = 0
    rejected: int = 0
    error_message: str = ""


@dataclass
class _Search:
    """A chunk's search for the spans the database refuses, cut short: what its client's retry continues.
    ``halving`` works on the chunk's span positions (a retry decodes new span objects)."""

    halving: Halving[int]
    size: int  # the chunk's spans
    stored: int = 0  # spans of the chunk stored by the requests answered 503 (they counted none)
    rejected: int = 0  # spans refused so far (each with its log line)
    kept_at: float = 0.0  # time.monotonic() when last kept for a retry


@dataclass
class _Progress:
    """A request cut at its attempt's span budget (``request_spans``): what its client's retry continues."""

    chunks: int  # the chunks written (their spans stored, or refused by the database): the retry skips them
    written: int  # spans stored by the attempts answered 503 (they counted none)
    refused: int  # spans of those chunks the database refused
    kept_at: float = 0.0  # time.monotonic() when last kept for a retry


class Admission:
    """A byte budget shared by every request in flight on both receivers."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._used = 0
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")
        self.peak = 0

    @property
    def used(self) -> int:
        return self._used

    def take(self, amount: int) -> bool:
        with self._lock:
            if self._used + amount > self.budget:
                return False
            self._used += amount
            self.peak = max(self.peak, self._used)
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self._used -= amount

    def ticket(self) -> Ticket:
        return Ticket(self)


class Ticket:
    """One request's share of the budget; :meth:`close` returns it (idempotent)."""

    __slots__ = ("_admission", "held")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = 0

    def grow(self, amount: int) -> bool:
        """Reserve ``amount`` more bytes; False when the budget has no room now."""
        if amount <= 0:
            return True
        if not self._admission.take(amount):
            return False
        self.held += amount
        return True

    def check(self, total: int) -> None:
        """Raise ``IngestError('too_large')`` when ``total`` bytes could never be reserved."""
        if total > self._admission.budget:
            raise IngestError("too_large", f"request needs ~{total >> 20} MiB to decode, more than the "
                              f"ingest memory budget ({self._admission.budget >> 20} MiB); "
                              "send smaller batches (or protobuf rather than JSON)")

    def hold(self, total: int) -> None:
        """Reserve exactly ``total`` bytes: grow (raising ``IngestError``) or give back."""
        if total > self.held:
            self.check(total)
            if not self.grow(total - self.held):
                raise IngestError("unavailable", "ingest is busy (memory budget in use), retry later")
        elif total < self.held:
            self._admission.give(self.held - total)
            self.held = total

    def close(self) -> None:
        held, self.held = self.held, 0
        if held:
            self._admission.give(held)


def _log_line(text: str) -> str:
    """``text`` for a log line: redacted, control characters escaped, on one line."""
    from . import redaction
    from .otlp_decode import _CONTROLS, _escaped

    return " ".join(_CONTROLS.sub(_escaped, redaction.redact(" ".join(text.split())) or "").split())


def _reason(exc: BaseException) -> str:
    """One log line for a write that failed: what the writer said (it names the database
    without its password, and the driver's reason), redacted, control characters escaped,
    on one line (libpq's messages span several)."""
    text = str(exc) or type(exc).__name__
    if not text.startswith("database "):  # an OSError from opening the SQLite folder
        text = f"database unavailable: {text}"
    return _log_line(text)


_REJECTED_LINES = 10  # per chunk, at WARNING
_UNSTORED = "span(s) the database writer could not store (logged by the server)"


def _first_line(exc: BaseException) -> str:
    """An unexpected write error's first line, cut, for :func:`_log_line` (a driver's error quotes
    the statement and its parameters on the lines after it)."""
    text = (str(exc).strip().splitlines() or [""])[0][:300] or type(exc).__name__
    return _log_line(f"{type(exc).__name__}: {text}")


def _digest(body: bytes) -> bytes:
    """What tells a retried request's body from another's (a kept search is looked up by it)."""
    return hashlib.blake2b(body, digest_size=16).digest()


INFLATE_STEP = 1 << 20  # bytes of output inflated at a time, each step reserved from the budget first


def gunzip(body: bytes, limit: int, reserve: Callable[[int], object] | None = None) -> bytes:
    """Every member of a gzip body, at most ``limit`` bytes in all.

    A gzip file may hold several members one after another (``cat a.gz b.gz``); each is
    decompressed in turn, so no span is silently lost. Anything that is not a complete
    member (truncated data, trailing garbage) raises ``IngestError('invalid')``; more than
    ``limit`` bytes raises ``IngestError('too_large')`` as soon as the output passes it.
    ``reserve(n)`` is called before the output may reach ``n`` bytes (twice the output: it is
    copied once at the end), and raises to stop (the memory budget has no room).
    """
    return _inflate(body, limit, reserve, 16 + zlib.MAX_WBITS, "gzip")


def unzlib(body: bytes, limit: int, reserve: Callable[[int], object] | None = None) -> bytes:
    """One zlib stream (RFC 1950, gRPC's ``deflate``), bounded and reserved as :func:`gunzip`."""
    return _inflate(body, limit, reserve, zlib.MAX_WBITS, "deflate")


def _inflate(body: bytes, limit: int, reserve: Callable[[int], object] | None, wbits: int, name: str) -> bytes:
    out = bytearray()
    data = memoryview(body)
    while True:
        decomp = zlib.decompressobj(wbits)
        try:
            while True:
                room = min(INFLATE_STEP, limit + 1 - len(out))
                if reserve is not None:
                    reserve(2 * (len(out) + room))
                out += decomp.decompress(data, room)
                if len(out) > limit:
                    raise IngestError("too_large", f"decompressed body exceeds {limit} bytes")
                data = memoryview(decomp.unconsumed_tail)
                if not data:
                    break
            out += decomp.flush()
        except zlib.error as exc:
            raise IngestError("invalid", f"invalid {name} body: {exc}") from None
        if len(out) > limit:
            raise IngestError("too_large", f"decompressed body exceeds {limit} bytes")
        if not decomp.eof:
            raise IngestError("invalid", f"truncated {name} body")
        rest = decomp.unused_data
        if not rest:
            return bytes(out)
        if name != "gzip":  # one stream only: what follows it is not part of the message
            raise IngestError("invalid", f"invalid {name} body: data after the end of its stream")
        data = memoryview(rest)


class IngestCore:
    """Authentication, admission, decoding and writing; used by both receivers."""

    def __init__(
        self,
        *,
        db_url: str | None,
        token: str | None,
        max_bytes: int,
        budget: int,
        retry_after: int,
        limits: Limits,
        writer: SpanWriter | None,
        writer_factory: Callable[[], SpanWriter] | None,
        max_pending: int,
        max_per_client: int,
        request_spans: int | None = None,
    ) -> None:
        self.db_url = db_url
        # spans one attempt at a request writes before it is answered 503, its progress kept (None: no bound)
        self.request_spans = request_spans
        self.max_pending = max_pending
        self._pending = 0
        self.max_per_client = max_per_client
        self._clients: dict[str, int] = {}
        self._requests = 0
        try:
            self._token = token.encode() if token else None
        except UnicodeEncodeError:  # its message quoted the token's character at its position
            raise ValueError("the bearer token is not valid UTF-8") from None
        if token:  # given as --token or token=, not only by its variable: a client quoting it stores nothing of it
            register_secret(token)
        self.max_bytes = max_bytes
        self.admission = Admission(budget)
        self.retry_after = retry_after
        self.limits = limits
        self._writer = writer
        self._writer_factory = writer_factory
        self._owns_writer = writer is None and writer_factory is None  # a DagWriter it makes, and closes
        self._writer_lock = threading.Lock()
        self._write_lock: threading.Lock | None = None
        self._count_lock = threading.Lock()
        reset_in_child(self, "_writer_lock", "_write_lock", "_count_lock")
        self._db_down = False
        # set by the server's stop: a search for refused spans answers 503 at its next piece
        self.stopping = threading.Event()
        self._searches: OrderedDict[tuple[bytes, int], _Search] = OrderedDict()
        self._progress: OrderedDict[bytes, _Progress] = OrderedDict()  # by body digest, as _searches
        # the start's schema check (prepare_soon) and what it raised
        self._startup: threading.Thread | None = None
        self._startup_error: BaseException | None = None
        self._startup_until = 0.0  # time.monotonic() past which startup_error stops waiting for it
        # the spans stored by the requests answered: one answered 503 counts nothing (its client sends it again)
        self.spans_written = 0
        self.unavailable_responses = 0
        self.disconnects = 0
        self.expired_calls = 0  # gRPC calls not stored: their deadline passed while every worker was busy

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the configured bearer token."""
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)

    def open(self, client: str) -> bool:
        """Admit one more request from ``client`` (its address), or False when that client
        already has ``max_per_client`` requests in flight (on either receiver): one client
        must not take every place, however slowly it sends."""
        with self._count_lock:
            count = self._clients.get(client, 0)
            if count >= self.max_per_client:
                return False
            self._clients[client] = count + 1
            self._requests += 1
            return True

    def close(self, client: str) -> None:
        """The end of a request :meth:`open` admitted."""
        with self._count_lock:
            self._requests -= 1
            count = self._clients.pop(client) - 1
            if count:
                self._clients[client] = count

    @property
    def requests(self) -> int:
        """Requests in flight now (both receivers), from reading them to answering."""
        return self._requests

    def enter(self) -> bool:
        """Admit one more request to decoding and writing (waiting for a worker or being
        processed), or False when ``max_pending`` are: answer 503/UNAVAILABLE then, since a
        request that waits longer than its client's timeout is lost work on both sides.
        Requests still arriving do not count: a slow client never holds a worker's place."""
        with self._count_lock:
            if self._pending >= self.max_pending:
                return False
            self._pending += 1
            return True

    @property
    def pending(self) -> int:
        """Requests being decoded and written, or waiting for a worker (both receivers)."""
        return self._pending

    def leave(self) -> None:
        with self._count_lock:
            self._pending -= 1

    @staticmethod
    def factor(kind: str) -> int:
        """Bytes reserved per body byte when a request of this encoding is admitted."""
        return JSON_FACTOR if kind == "json" else PROTOBUF_FACTOR

    def count(self, what: str, amount: int = 1) -> None:
        with self._count_lock:
            setattr(self, what, getattr(self, what) + amount)

    # --- decoding and writing (worker threads) ----------------------------------------------
    def process(self, body: bytes, kind: str, encoding: str | None, ticket: Ticket,
                admitted: float | None = None, gone: Callable[[], bool] | None = None) -> Outcome:
        """Decompress, decode and store one request body; raises :class:`IngestError`.

        ``encoding``: ``None`` (as it is), ``"gzip"`` or ``"deflate"`` (a zlib stream; one that does
        not inflate is taken as it is: gRPC's receiver tells it from the message's first bytes, and a
        protobuf message can begin as a zlib header does). The output is reserved from the budget as
        it grows, before it is made. ``admitted``: the ``time.monotonic()`` when the request was
        admitted to writing; the first chunk's wait for the database counts from then
        (:data:`WRITE_WAIT`). ``gone()``: whether the client has gone (disconnected, or its gRPC
        deadline passed), asked before each chunk is written: nobody is waiting for the rest, which its
        client sends again or counts lost (``IngestError('unavailable')`` then)."""
        packed = len(body) if encoding else 0
        if encoding:
            base = ticket.held
            inflate = gunzip if encoding == "gzip" else unzlib
            try:
                body = inflate(body, self.max_bytes, lambda size: ticket.hold(base + size))
            except IngestError as err:
                if encoding == "gzip" or err.kind != "invalid":
                    raise
                packed = 0
        cost = json_cost(body) if kind == "json" else len(body) * PROTOBUF_FACTOR
        ticket.hold(cost + packed)
        outcome = Outcome()
        digest: list[bytes] = []

        def digest_of() -> bytes:  # made once per request, when asked for
            if not digest:
                digest.append(_digest(body))
            return digest[0]

        def key(number: int) -> tuple[bytes, int]:  # a kept search's
            return digest_of(), number

        resumed = self._resume_request(digest_of)
        skip = resumed.chunks if resumed is not None else 0
        refused = resumed.refused if resumed is not None else 0  # spans the database refused, in all
        attempt = 0  # spans this attempt has written
        if resumed is not None:
            outcome.written, outcome.rejected = resumed.written, refused
            if refused:
                outcome.error_message = _UNSTORED
        try:
            batches = (iter_json if kind == "json" else iter_protobuf)(
                body, json_safe=True, limits=self.limits, chunk=CHUNK_SPANS)
            for number, batch in enumerate(batches):
                outcome.rejected += batch.rejected
                for reason in batch.errors:
                    if len(outcome.error_message) < 1000 and reason not in outcome.error_message:
                        outcome.error_message = f"{outcome.error_message}; {reason}" if outcome.error_message \
                            else reason
                if batch.spans and number < skip:
                    continue  # written by an earlier attempt, answered 503 after it
                if batch.spans:
                    if self.request_spans is not None and attempt >= self.request_spans and self._keep(
                            digest_of, _Progress(number, outcome.written, refused), self._progress):
                        # the rest by the client's retry: a worker is not held for minutes by one request
                        self.count("unavailable_responses")
                        logger.info("cmbagent-otel ingest: a request holds more than %d span(s); %d are stored, "
                                    "its client's retry continues after them", self.request_spans, outcome.written)
                        raise IngestError("unavailable", f"a request writes at most {self.request_spans} span(s) "
                                          f"at a time: {outcome.written} stored, send it again for the rest")
                    if gone is not None and gone():
                        self.count("disconnects")
                        logger.debug("cmbagent-otel ingest: the client has gone; the rest of its request is not "
                                     "written (%d span(s) were)", outcome.written)
                        raise IngestError("unavailable", "the client has gone")
                    written = self._store(batch.spans, admitted, functools.partial(key, number))
                    admitted = None  # later chunks: from when they are ready
                    outcome.written += written
                    attempt += len(batch.spans)
                    if written < len(batch.spans):
                        outcome.rejected += len(batch.spans) - written
                        refused += len(batch.spans) - written
                        if _UNSTORED not in outcome.error_message:
                            outcome.error_message = f"{outcome.error_message}; {_UNSTORED}" \
                                if outcome.error_message else _UNSTORED
        except MalformedPayload as exc:
            self.count("spans_written", outcome.written)  # stored, and a client does not send a 400 again
            raise IngestError("invalid", str(exc)[:1000]) from None
        # counted per request answered, not per write: a request answered 503 part-way (a later chunk, a
        # piece of the halving) is sent again whole, and its spans stored before were counted twice
        self.count("spans_written", outcome.written)
        if outcome.rejected:
            logger.info("cmbagent-otel ingest: rejected %d span(s): %s", outcome.rejected, outcome.error_message)
        return outcome

    def _store(self, spans: Sequence[ReadableSpan], since: float | None,
               key: Callable[[], tuple[bytes, int]] | None = None) -> int:
        """:meth:`write` ``spans``; returns how many were stored.

        An error that is not the database being unavailable (a span the writer cannot map or the
        database refuses) costs the spans that cause it, not their request: the chunk is written
        in halves until they are found, each rejected with a log line, as the DAG exporter does.
        Before, one such span answered its whole request 500 (``internal error``), which OTLP
        clients do not retry: every span of it was lost. ``IngestError`` (unavailable) propagates:
        the client retries the request, and the spans already stored are written again
        idempotently. A search cut short (its deadline, the server stopping, the database down) is
        kept under ``key()`` (the request body's digest and the chunk's number): the retry of the
        same request continues it, without writing the whole chunk again."""
        from .dag.halving import Halving
        from .dag.mapping import redact_columns

        spans = redact_columns(spans)  # an ingest client's spans are not ours: see redact_columns
        search = self._resume(key, len(spans))
        if search is None:
            try:
                self.write(spans, since)
                return len(spans)
            except IngestError:
                raise
            except Exception as exc:
                logger.error("cmbagent-otel ingest: could not store %d span(s) (%s); looking for the ones that "
                             "cause it", len(spans), _first_line(exc))
                # the traceback only when asked for: a driver's error quotes every row's parameters
                logger.debug("cmbagent-otel ingest: the write error", exc_info=exc)
            search = _Search(Halving(range(len(spans))), len(spans))
        end = time.monotonic() + HALVING_WAIT

        def write(piece: list[int]) -> bool:
            now = time.monotonic()
            if now >= end or self.stopping.is_set():
                self.count("unavailable_responses")
                if now >= end:
                    logger.warning("cmbagent-otel ingest: finding the span(s) the database refuses took longer "
                                   "than %g s (a slow database); asking the client to retry", HALVING_WAIT)
                else:
                    logger.warning("cmbagent-otel ingest: stopping while finding the span(s) the database "
                                   "refuses; asking the client to retry")
                raise IngestError("unavailable", "database too slow to find the span(s) it refuses, retry later"
                                  if now >= end else "server stopping, retry later")
            try:
                self.write([spans[i] for i in piece], until=min(now + WRITE_WAIT, end))
            except IngestError:
                raise
            except Exception:
                return False
            search.stored += len(piece)
            return True

        def reject(position: int) -> None:
            ctx = spans[position].context
            search.rejected += 1  # a line each for the first few: a client's flood of them is not a flood of lines
            logger.log(logging.WARNING if search.rejected <= _REJECTED_LINES else logging.DEBUG,
                       "cmbagent-otel ingest: rejected span %016x of trace %032x: it cannot be stored",
                       ctx.span_id if ctx is not None else 0, ctx.trace_id if ctx is not None else 0)

        try:
            search.halving.run(write, reject)
        except IngestError:
            self._keep(key, search)
            raise
        return search.stored

    def _resume(self, key: Callable[[], tuple[bytes, int]] | None, size: int) -> _Search | None:
        """The search a request answered 503 left for this chunk (taken: a retry sent twice at once
        starts a search of its own), or None. The body's digest is made only while searches are kept."""
        if key is None or not self._searches:
            return None
        try:
            wanted = key()
        except Exception:
            return None
        with self._count_lock:
            search = self._searches.pop(wanted, None)
        return search if search is not None and search.size == size else None

    def _keep(self, key: Callable[[], Any] | None, search: _Search | _Progress,
              into: OrderedDict[Any, Any] | None = None) -> bool:
        """Keep ``search`` (or a request's progress, ``into`` :attr:`_progress`) for its client's retry, and say
        whether it is kept: at most :data:`KEPT_SEARCHES`, the least recently kept forgotten to make room only
        once :data:`KEPT_SEARCH_AGE_S` old; else ``search`` is not kept."""
        if key is None:
            return False
        try:
            kept = key()
        except Exception:
            return False
        now = time.monotonic()
        with self._count_lock:
            searches = self._searches if into is None else into
            if kept not in searches and len(searches) >= KEPT_SEARCHES:
                oldest = next(iter(searches))
                if now - searches[oldest].kept_at < KEPT_SEARCH_AGE_S:
                    logger.debug("cmbagent-otel ingest: %d searches kept already; this one starts over at its retry",
                                 len(searches))
                    return False
                del searches[oldest]
            search.kept_at = now
            searches[kept] = search
            searches.move_to_end(kept)
        return True

    def _resume_request(self, digest: Callable[[], bytes]) -> _Progress | None:
        """The progress an attempt at this request answered 503 at its span budget left (taken: a retry sent
        twice at once starts over), or None. The body's digest is made only while some are kept."""
        if not self._progress:
            return None
        try:
            wanted = digest()
        except Exception:
            return None
        with self._count_lock:
            return self._progress.pop(wanted, None)

    def _get_writer(self) -> SpanWriter:
        with self._writer_lock:
            if self._writer is None:
                if self._writer_factory is not None:
                    self._writer = self._writer_factory()
                else:
                    from .dag.writer import DagWriter

                    self._writer = DagWriter(self.db_url)
                if self._write_lock is None and self._is_sqlite():
                    # SQLite has one writer at a time; queueing here beats "database is locked".
                    self._write_lock = threading.Lock()
            return self._writer

    def close_writer(self) -> None:
        """Close the DAG writer this core made (its engine: the SQLite file's descriptors, PostgreSQL's
        connections), so a stopped server holds none; the next write makes a new one. A writer passed in
        (``writer=``, or one ``writer_factory`` made) is the caller's, and stays open."""
        if not self._owns_writer:
            return
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # type: ignore[attr-defined]

    def prepare_soon(self) -> threading.Thread | None:
        """Check (or make) the database's schema in a background thread now, so the first
        requests do not spend their :data:`WRITE_WAIT` on it (a first PostgreSQL schema takes
        seconds on a busy machine: those clients were answered 503). Returns that thread (None
        once the schema is known current). Never raises: a failure is met again, and answered,
        by the first write; :meth:`startup_error` tells it."""
        self._startup = self._startup_error = None
        self._startup_until = time.monotonic() + STARTUP_PREPARE_S + STARTUP_REPORT_MARGIN_S
        try:
            from .dag.database import deadline, prepare_in_background
            from .dag.writer import DagWriter

            writer = self._get_writer()
            if isinstance(writer, DagWriter):
                def prepare() -> None:
                    # bounded well under the background default: requests wait for this (it holds
                    # the schema lock), and a database that answers again must be written soon
                    try:
                        with deadline(STARTUP_PREPARE_S):
                            writer.prepare()
                    except BaseException as exc:
                        self._startup_error = exc
                        raise

                self._startup = prepare_in_background(prepare, writer.url)
                return self._startup
        except Exception:
            logger.debug("cmbagent-otel ingest: schema preparation not started", exc_info=True)
        return None

    def startup_error(self) -> BaseException | None:
        """Wait for the schema check :meth:`prepare_soon` began and return what it raised
        (``None``: it passed, none ran, or it is not done within :data:`STARTUP_PREPARE_S` and
        :data:`STARTUP_REPORT_MARGIN_S`). What reports a database that cannot be written at
        the start must ask this rather than check again: a second check holds the schema lock
        after the first lets go, and one whose connection attempt hangs keeps every request at
        503 past :data:`STARTUP_PREPARE_S`, while the database answers again.

        Bounded: the thread :func:`~cmbagent_otel.dag.database.prepare_in_background` hands over
        is the one already running for the URL in this process, which may be another caller's (an
        instrumented application's schema step, bounded to 120 s, not this server's 10 s): the
        start waited for it to its end, and reported nothing of it (its error is not ours to tell)."""
        thread = self._startup
        if thread is not None:
            thread.join(seconds_left(self._startup_until))
        return self._startup_error

    def startup_over(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds (and no later than :meth:`startup_error` would) for the
        start's schema check; whether it is over (a stop closes the writer only then)."""
        thread = self._startup
        if thread is None:
            return True
        thread.join(max(0.0, min(timeout, self._startup_until - time.monotonic())))
        return not thread.is_alive()

    def _is_sqlite(self) -> bool:
        try:
            from .dag.database import resolve_url

            return resolve_url(self.db_url).startswith("sqlite")
        except Exception:
            return False

    def write(self, spans: Sequence[ReadableSpan], since: float | None = None, *, until: float | None = None) -> None:
        """Store ``spans`` (committed when this returns); raises ``IngestError('unavailable')``
        while the database is down, or busy for :data:`WRITE_WAIT` seconds from ``since``
        (``time.monotonic()``; default now), or until the ``time.monotonic()`` ``until`` if given."""
        from .dag.writer import DagWriter, DatabaseUnavailable

        end = until if until is not None else (time.monotonic() if since is None else since) + WRITE_WAIT
        try:
            writer = self._get_writer()
            lock = self._write_lock
            if lock is not None and not lock.acquire(timeout=seconds_left(end)):
                raise DatabaseUnavailable("database busy: this server's other writes took the time to wait")
            try:
                if isinstance(writer, DagWriter):
                    writer.write(spans, timeout=max(1.0, end - time.monotonic()))
                else:
                    writer.write(spans)
            finally:
                if lock is not None:
                    lock.release()
        except (DatabaseUnavailable, OSError) as exc:
            # OSError: the SQLite directory cannot be created/opened right now (full disk,
            # unmounted volume); retryable like a refused connection.
            self.count("unavailable_responses")
            if not self._db_down:  # once per outage, not once per request
                self._db_down = True
                # the writer's message names the database (without its password) and the
                # driver's reason ("file is not a database"); the class name alone said neither
                logger.warning("cmbagent-otel ingest: %s; asking clients to retry", _reason(exc))
            raise IngestError("unavailable", "database unavailable, retry later") from None
        if self._db_down:
            self._db_down = False
            logger.warning("cmbagent-otel ingest: database available again")
