"""Build a TracerProvider (and a MeterProvider) from the standard ``OTEL_*`` environment variables.

Honoured: ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_BSP_*`` (batch processor), every
``OTEL_EXPORTER_OTLP_*`` variable (read by the OTLP exporters themselves) and
``OTEL_TRACES_EXPORTER``: a comma list of ``otlp`` (protocol from
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc``, the
default as with ``opentelemetry-instrument``, or ``http/protobuf``), ``console``,
``none``, ``cmbagent_dag`` (the relational DAG exporter) or any other name registered
under the ``opentelemetry_traces_exporter`` entry point group. Default: ``cmbagent_dag``.

Each exporter gets its own batch processor: the DAG exporter a
:class:`~cmbagent_otel.processor.DurableBatchSpanProcessor` (a full queue spills instead
of dropping), every other one the SDK's ``BatchSpanProcessor``. The provider's processors
sit in a :class:`ProcessorSlot`, so ``uninstrument()`` can shut them down and a later
``instrument()`` can put fresh ones into the same provider (the global provider can be set
only once per process).

:func:`build_meter_provider` does the same for metrics from ``OTEL_METRICS_EXPORTER`` (a
comma list of ``otlp``, with ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``console``, ``none`` or a name registered under
``opentelemetry_metrics_exporter``; default ``none``): one ``PeriodicExportingMetricReader``
per exporter (``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT`` are read by the reader; every
``OTEL_EXPORTER_OTLP_METRICS_*`` variable by the OTLP exporters), the same resource as the
tracer provider. With no exporter named there is no provider to build (``None``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult

from . import environment_variables as env
from ._forkexport import PerProcess
from ._forksafe import reset_in_child
from ._outage import Outage, OutageTally
from ._termination import signals_deferred
from .metrics import histogram_buckets
from .redaction import REDACTED, encodable, is_secret_key, redact

logger = logging.getLogger("cmbagent_otel")

DEFAULT_SERVICE_NAME = "cmbagent"


class ConfigurationError(ValueError):
    """An ``OTEL_*`` setting or an ``instrument()`` option cannot be honoured."""


def sdk_disabled() -> bool:
    """``OTEL_SDK_DISABLED=true``: record nothing."""
    return bool(env.get(env.SDK_DISABLED))


def _names(setting: str, value: str | Sequence[str] | None) -> list[str]:
    value = env.get(setting, value)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip().lower() for name in items if name and name.strip()]
    return [name for name in names if name != "none"]


def exporter_names(value: str | Sequence[str] | None = None) -> list[str]:
    """Exporter names: argument > ``OTEL_TRACES_EXPORTER`` > ``cmbagent_dag``."""
    return _names(env.TRACES_EXPORTER, value)


def _otlp_exporter(protocol: str, signal: str, class_name: str, *, in_child: bool = False) -> Any:
    """The OTLP exporter of ``signal`` (``trace``, ``metric``) for ``protocol``; ``in_child``: a forked child's
    own (over gRPC, on a connection of its own: see :data:`_CHILD_GRPC_OPTIONS`)."""
    if protocol == "grpc":
        module = f"opentelemetry.exporter.otlp.proto.grpc.{signal}_exporter"
        if in_child:
            return getattr(importlib.import_module(module), class_name)(channel_options=_CHILD_GRPC_OPTIONS)
    elif protocol in ("http/protobuf", "http"):
        module = f"opentelemetry.exporter.otlp.proto.http.{signal}_exporter"
    else:
        raise ConfigurationError(f"unsupported OTLP protocol {protocol!r} (use grpc or http/protobuf)")
    return getattr(importlib.import_module(module), class_name)()


# A new channel takes its connection from gRPC's process-wide subchannel pool, which a forked child inherits: the
# child's channel sent on the parent's HTTP/2 connection when gRPC had skipped its fork handlers (a call in flight
# at the fork), its export answered SUCCESS and its spans never arrived. A pool of the channel's own gives it a
# connection of its own.
_CHILD_GRPC_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _otlp_exporters(protocol: str, signal: str, class_name: str) -> tuple[Any, Callable[[], Any]]:
    """The OTLP exporter of ``signal`` for ``protocol``, and how a forked child makes its own."""
    return (_otlp_exporter(protocol, signal, class_name),
            functools.partial(_otlp_exporter, protocol, signal, class_name, in_child=True))


def _registered_exporter(group: str, name: str, variable: str, known: str) -> Any:
    """An exporter registered under entry point ``group`` as ``name``."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=group):
        if entry.name == name:
            return entry.load()()
    # the variable's names were checked when it was read (an unknown one is warned and skipped): a name
    # unknown here came from the argument (``instrument(exporters=...)``), which the message names too
    raise ConfigurationError(f"unknown {variable.split('_')[1].lower()} exporter {name!r} in exporters= or "
                             f"{variable} (known: {known})")


def _otlp_protocol() -> str:
    return str(env.get(env.OTLP_TRACES_PROTOCOL))


#: the loggers of the SDK's OTLP span exporters, which log every failed batch
_OTLP_LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter",
                 "opentelemetry.exporter.otlp.proto.http.trace_exporter")
_quiet = threading.local()


class _QuietDuringOutage(logging.Filter):
    """Drops the SDK exporter's warnings and errors logged in a thread while it exports a batch
    of an outage :class:`OutageReportingExporter` has already reported (only there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or not getattr(_quiet, "on", False)


_QUIET = _QuietDuringOutage()


class OutageReportingExporter(SpanExporter):
    """The SDK's OTLP span exporter, reporting its failed batches once per outage.

    The SDK's ``BatchSpanProcessor`` drops a batch its exporter failed to send, and the OTLP
    exporter logs each failed batch (one or more lines, none with a count): a collector down
    for an hour gave thousands of lines and no total. The first failed batch is logged as
    before (the SDK's lines name the cause) with one line saying its spans are lost and that
    later failures are counted; those later batches log nothing; the first export that works
    again logs one line with the outage's length and the spans and batches lost in it (and
    :meth:`shutdown` does, if the backend never came back). ``exporter`` is the wrapped one; ``make``
    builds it again, for a forked child's exports (the parent's connection stays the parent's; see
    :mod:`cmbagent_otel._forkexport`).
    """

    def __init__(self, exporter: SpanExporter, make: Callable[[], SpanExporter] | None = None) -> None:
        self._outage = OutageTally()
        self._own = PerProcess(exporter, make, outage=self._outage)
        for name in _OTLP_LOGGERS:
            sdk_logger = logging.getLogger(name)
            if _QUIET not in sdk_logger.filters:
                sdk_logger.addFilter(_QUIET)

    @property
    def exporter(self) -> SpanExporter:
        """The wrapped exporter (in a forked child, the parent's until the child's first export made its own)."""
        return self._own.exporter

    def _where(self) -> str:
        try:
            return redact(str(getattr(self.exporter, "_endpoint", "") or "the OTLP endpoint"))
        except Exception:
            return "the OTLP endpoint"

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        _quiet.on = self._outage.ongoing
        try:
            result = self._own.send(lambda exporter: exporter.export(spans), SpanExportResult.FAILURE)
        finally:
            _quiet.on = False
        try:
            if result is not SpanExportResult.SUCCESS:
                if self._outage.failed(len(spans)):
                    logger.warning("cmbagent_otel: OTLP export to %s failed; its %d spans are lost (the batch "
                                   "processor does not keep them); later failures are counted and reported in "
                                   "one line when an export succeeds again", self._where(), len(spans))
            elif self._outage.ongoing:
                self._report(self._outage.recovered(), "works again after %.1f s; %d spans in %d batches were "
                             "lost meanwhile")
        except Exception:
            logger.debug("cmbagent_otel: could not account for an OTLP export", exc_info=True)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._own.force_flush(timeout_millis)

    def shutdown(self) -> None:
        try:
            self._own.shutdown()
        finally:
            self._report(self._outage.recovered(), "still failed at shutdown, after %.1f s: %d spans in %d "
                         "batches were lost meanwhile")

    def _report(self, outage: Outage | None, what: str) -> None:
        if outage is not None:
            logger.warning("cmbagent_otel: OTLP export to %s " + what, self._where(), outage.seconds(),
                           outage.spans, outage.batches)


def create_exporter(name: str) -> SpanExporter:
    """Instantiate one span exporter by its ``OTEL_TRACES_EXPORTER`` name (the OTLP one wrapped in an
    :class:`OutageReportingExporter`)."""
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        return OutageReportingExporter(*_otlp_exporters(_otlp_protocol(), "trace", "OTLPSpanExporter"))
    if name == "cmbagent_dag":
        from .exporters.dag import DagSpanExporter

        return DagSpanExporter()
    return _registered_exporter(  # type: ignore[no-any-return]
        "opentelemetry_traces_exporter", name, "OTEL_TRACES_EXPORTER", "otlp, console, none, cmbagent_dag")


class _Kept:
    """The processors one ``uninstrument()`` kept for the runs (traces) still open then, and what runs once
    they are released (see :meth:`ProcessorSlot.release_when_closed`)."""

    __slots__ = ("processors", "then", "traces")

    def __init__(self, processors: tuple[SpanProcessor, ...], traces: frozenset[int],
                 then: Callable[[], None] | None) -> None:
        self.processors = processors
        self.traces = traces
        self.then = then


class ProcessorSlot(SpanProcessor):
    """The active span processor of a provider built here: forwards to the processors it
    holds, which :meth:`release` shuts down and removes while the provider lives on.

    :meth:`release_when_closed` (``uninstrument()``) keeps the processors of runs still open
    until their spans have ended: meanwhile the spans of those runs' traces go to the kept
    processors only, and every other span to the processors added since (a new ``instrument()``).
    Each ``uninstrument()`` keeps its own: a run goes on through the processors that recorded its
    start, however many rounds of instrumentation come and go before it ends.
    The routing is instance attributes over ``on_start``/``_on_ending``/``on_end``, set only while
    processors are kept: nothing is added to a span's way otherwise."""

    _ROUTED = ("on_start", "_on_ending", "on_end")

    def __init__(self) -> None:
        self._processors: tuple[SpanProcessor, ...] = ()
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")
        self._kept: tuple[_Kept, ...] = ()  # oldest first, one per release_when_closed with runs open

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        with self._lock:
            self._processors += (span_processor,)

    @property
    def processors(self) -> tuple[SpanProcessor, ...]:
        return self._processors

    @property
    def kept(self) -> tuple[SpanProcessor, ...]:
        """The processors kept for runs still open at ``uninstrument()`` (see :meth:`release_when_closed`)."""
        return tuple(processor for kept in self._kept for processor in kept.processors)

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        for processor in self._processors:
            processor.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Span) -> None:
        for processor in self._processors:
            hook = getattr(processor, "_on_ending", None)
            if hook is not None:
                hook(span)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self._processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with signals_deferred():  # a SIGTERM meanwhile must not stop the main thread's export half-way
            return all([processor.force_flush(timeout_millis) for processor in self.kept + self._processors])

    def shutdown(self) -> None:
        """The provider's shutdown (the application's ``provider.shutdown()``, or the SDK's at exit): the run
        and node spans still open through this slot are ended failed first (``instrumentation_stopped``), or
        they would end after their processors and be dropped, their rows ``executing``/``running`` for ever."""
        from ._termination import INSTRUMENTATION_STOPPED, end_open_spans

        end_open_spans("the tracer provider was shut down while it was open", INSTRUMENTATION_STOPPED, self)
        for processor in self.kept + self._processors:
            processor.shutdown()

    def release(self) -> None:
        """Flush and shut down every processor held (kept ones too), and hold none from now on."""
        with self._lock:
            kept, self._kept = self._kept, ()
            processors, self._processors = self._processors, ()
            self._stop_routing()
        self._shut(tuple(p for group in kept for p in group.processors) + processors,
                   [group.then for group in kept])

    def _stop_routing(self) -> None:
        for name in self._ROUTED:
            self.__dict__.pop(name, None)

    def _shut(self, processors: tuple[SpanProcessor, ...], thens: list[Callable[[], None] | None]) -> None:
        """Flush and shut down ``processors`` (those still held elsewhere left alone), then run ``thens``."""
        try:
            held = set(self._processors).union(*(group.processors for group in self._kept))
            for processor in dict.fromkeys(processors):
                if processor in held:
                    continue
                try:
                    with signals_deferred():
                        processor.force_flush()
                finally:
                    processor.shutdown()
        finally:
            for then in thens:
                if then is not None:
                    then()

    def release_when_closed(self, then: Callable[[], None] | None = None) -> None:
        """:meth:`release` the processors held now, or, while run or DAG-node spans recorded through them
        are still open (``uninstrument()`` called inside a run whose blocks go on), once the last of them
        has ended: those runs' spans, including the blocks they open meanwhile, are exported whole
        through the processors that recorded their start, and their rows reach a final status instead
        of staying ``executing``/``running``. ``then`` runs after the release. Processors kept by an
        earlier call stay kept until their own runs end."""
        with self._lock:
            earlier = frozenset().union(*(group.traces for group in self._kept))
            traces = self._open_traces(None) - earlier
            processors, self._processors = self._processors, ()
            if traces:
                self._kept += (_Kept(processors, traces, then),)
                self.on_start = self._route_start  # type: ignore[method-assign]
                self._on_ending = self._route_ending  # type: ignore[method-assign]
                self.on_end = self._route_end  # type: ignore[method-assign]
                return
        self._shut(processors, [then])

    def _open_traces(self, within: frozenset[int] | None) -> frozenset[int]:
        """The traces (of ``within``, if given) holding run or DAG-node spans of this slot still open."""
        from ._spans import open_node_spans

        traces = (span.context.trace_id for span in open_node_spans()
                  if getattr(span, "_span_processor", None) is self and span.is_recording())
        return frozenset(t for t in traces if within is None or t in within)

    def _kept_for(self, span: ReadableSpan) -> _Kept | None:
        context = span.context
        if context is not None:
            trace_id = context.trace_id
            for group in self._kept:
                if trace_id in group.traces:
                    return group
        return None

    def _route(self, span: ReadableSpan) -> tuple[SpanProcessor, ...]:
        group = self._kept_for(span)
        return group.processors if group is not None else self._processors

    def _route_start(self, span: Span, parent_context: Any = None) -> None:
        for processor in self._route(span):
            processor.on_start(span, parent_context=parent_context)

    def _route_ending(self, span: Span) -> None:
        for processor in self._route(span):
            hook = getattr(processor, "_on_ending", None)
            if hook is not None:
                hook(span)

    def _route_end(self, span: ReadableSpan) -> None:
        group = self._kept_for(span)
        for processor in group.processors if group is not None else self._processors:
            processor.on_end(span)
        if group is None:
            return
        try:
            if self._open_traces(group.traces):
                return
            with self._lock:
                if group not in self._kept:
                    return  # released meanwhile
                self._kept = tuple(kept for kept in self._kept if kept is not group)
                if not self._kept:
                    self._stop_routing()
            self._shut(group.processors, [group.then])
        except Exception:  # in the application's thread, as its block ends: never its error
            logger.debug("cmbagent_otel: could not release the kept span processors", exc_info=True)


def span_processors(
    exporters: str | Sequence[str] | None = None,
    span_exporters: Sequence[SpanExporter] = (),
) -> list[SpanProcessor]:
    """One batch processor per configured exporter (see the module docstring)."""
    from .exporters.dag import DagSpanExporter
    from .processor import DurableBatchSpanProcessor

    instances = [create_exporter(name) for name in exporter_names(exporters)]
    instances.extend(span_exporters)
    return [DurableBatchSpanProcessor(e) if isinstance(e, DagSpanExporter) else BatchSpanProcessor(e)
            for e in instances]


def resource(service_name: str | None = None) -> Resource:
    """The resource of the providers built here (argument > environment > default, as for every
    setting, and as the SDK's ``Resource.create`` merges): ``service_name``, else ``OTEL_SERVICE_NAME`` /
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK), else ``cmbagent``.

    Its attributes are redacted as span attributes are: ``OTEL_RESOURCE_ATTRIBUTES`` and the
    resource detectors (``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS``) take values from the
    environment, and the resource goes with every span and metric to each exporter."""
    attributes = {}
    env_has_name = bool(env.get(env.SERVICE_NAME)) or "service.name=" in (env.get(env.RESOURCE_ATTRIBUTES) or "")
    if service_name or not env_has_name:
        attributes[SERVICE_NAME] = service_name or DEFAULT_SERVICE_NAME
    created = Resource.create(attributes)
    try:
        scrubbed = _redacted_attributes(created.attributes)
    except Exception:  # never fail a provider for it: the attributes are the SDK's own types
        logger.debug("could not redact the resource's attributes", exc_info=True)
        return Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME})
    return created if scrubbed is None else Resource(scrubbed, created.schema_url)


def _redacted_attributes(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """``attributes`` with secret-named keys' values and secrets in strings redacted; ``None``
    when nothing changed."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        key = encodable(key) if isinstance(key, str) else key
        if is_secret_key(key) and value not in ("", None):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = encodable(redact(value))
        elif isinstance(value, (list, tuple)) and any(isinstance(item, str) for item in value):
            out[key] = tuple(encodable(redact(item)) if isinstance(item, str) else item for item in value)
        else:
            out[key] = value
    return None if out == dict(attributes) else out


def build_tracer_provider(
    exporters: str | Sequence[str] | None = None,
    *,
    service_name: str | None = None,
    span_exporters: Sequence[SpanExporter] = (),
) -> TracerProvider:
    """A TracerProvider with one batch processor per configured exporter.

    ``exporters`` overrides ``OTEL_TRACES_EXPORTER``; ``span_exporters`` adds exporter
    instances (each behind its own batch processor); ``service_name`` is used only when
    neither ``OTEL_SERVICE_NAME`` nor ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` is set.
    """
    processors = span_processors(exporters, span_exporters)
    slot = ProcessorSlot()
    provider = TracerProvider(resource=resource(service_name), active_span_processor=slot)  # type: ignore[arg-type]
    _slots[provider] = slot
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


_slots: weakref.WeakKeyDictionary[TracerProvider, ProcessorSlot] = weakref.WeakKeyDictionary()


def slot_of(provider: Any) -> ProcessorSlot | None:
    """The :class:`ProcessorSlot` of a provider :func:`build_tracer_provider` built, else None."""
    try:
        return _slots.get(provider)
    except TypeError:
        return None


# --- metrics ------------------------------------------------------------------------------------------
def metrics_exporter_names(value: str | Sequence[str] | None = None) -> list[str]:
    """Metrics exporter names: argument > ``OTEL_METRICS_EXPORTER`` > none."""
    return _names(env.METRICS_EXPORTER, value)


def create_metric_exporter(name: str) -> MetricExporter:
    """Instantiate one metric exporter by its ``OTEL_METRICS_EXPORTER`` name."""
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name == "otlp":
        return PerProcessMetricExporter(
            *_otlp_exporters(str(env.get(env.OTLP_METRICS_PROTOCOL)), "metric", "OTLPMetricExporter"))
    return _registered_exporter(  # type: ignore[no-any-return]
        "opentelemetry_metrics_exporter", name, "OTEL_METRICS_EXPORTER", "otlp, console, none")


class PerProcessMetricExporter(MetricExporter):
    """The SDK's OTLP metric exporter, made again by ``make`` in a forked child for the child's exports (the
    parent's gRPC channel or HTTP session is the parent's; see :mod:`cmbagent_otel._forkexport`)."""

    def __init__(self, exporter: MetricExporter, make: Callable[[], MetricExporter]) -> None:
        super().__init__(preferred_temporality=exporter._preferred_temporality,
                         preferred_aggregation=exporter._preferred_aggregation)
        self._outage = OutageTally()  # whether its exports are failing: a fork does not wait for them then
        self._own = PerProcess(exporter, make, outage=self._outage)

    @property
    def exporter(self) -> MetricExporter:
        """The wrapped exporter (in a forked child, the parent's until the child's first export made its own)."""
        return self._own.exporter

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        result = self._own.send(lambda exporter: exporter.export(metrics_data, timeout_millis=timeout_millis,
                                                                 **kwargs), MetricExportResult.FAILURE)
        if result is not MetricExportResult.SUCCESS:
            self._outage.failed(0)
        elif self._outage.ongoing:
            self._outage.recovered()
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._own.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._own.shutdown(timeout_millis=timeout_millis, **kwargs)


def build_meter_provider(
    exporters: str | Sequence[str] | None = None,
    *,
    service_name: str | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> MeterProvider | None:
    """A MeterProvider with one periodic reader per configured exporter, plus ``metric_readers``;
    ``None`` when there is neither (``OTEL_METRICS_EXPORTER`` unset or ``none``).

    ``exporters`` overrides ``OTEL_METRICS_EXPORTER``; the resource is the tracer provider's
    (:func:`resource`).
    """
    readers: list[MetricReader] = [PeriodicExportingMetricReader(create_metric_exporter(name))
                                   for name in metrics_exporter_names(exporters)]
    readers.extend(metric_readers)
    if not readers:
        return None
    # the conventions' buckets by View as well as by advice: an API without advice (1.27) ignores the latter
    views = [View(meter_name=scope, instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(list(bounds)))
             for (scope, name), bounds in histogram_buckets().items()]
    return MeterProvider(metric_readers=readers, resource=resource(service_name), views=views)
