"""The metrics cmbagent-otel records: GenAI client metrics and run-level ``cmbagent.*`` metrics.

Recorded whether or not the span of the same operation is sampled (a metric counts every
operation; sampling only thins out traces). Two instrumentation scopes, as for spans:

=================================  ===========  ==========  ===================================================
metric                             instrument   unit        attributes
=================================  ===========  ==========  ===================================================
``gen_ai.client.token.usage``      histogram    ``{token}`` ``gen_ai.token.type`` (``input``/``output``),
                                                            ``gen_ai.operation.name``, ``gen_ai.provider.name``,
                                                            ``gen_ai.request.model``, ``gen_ai.response.model``,
                                                            ``server.address``/``server.port`` (when known)
``gen_ai.client.operation.duration``  histogram ``s``       the same but ``gen_ai.token.type``; ``error.type``
                                                            when the call raised
``cmbagent.llm.cost``              counter      ``USD``     ``gen_ai.provider.name``, ``gen_ai.request.model``,
                                                            ``gen_ai.response.model``
``cmbagent.code.execution.failures``  counter   ``{execution}``  ``cmbagent.code.language``, ``error.type``
                                                            (``nonzero_exit_code`` or the exception's class)
``gen_ai.workflow.duration``       histogram    ``s``       ``gen_ai.workflow.name``, ``error.type`` on failure
``cmbagent.workflow.duration``     histogram    ``s``       ``cmbagent.workflow.name``, ``cmbagent.workflow.mode``,
                                                            ``error.type`` on failure
``cmbagent.step.duration``         histogram    ``s``       ``cmbagent.workflow.name``, ``cmbagent.phase``,
                                                            ``cmbagent.step.agent``, ``error.type`` on failure
=================================  ===========  ==========  ===================================================

The first four come from the AG2 instrumentor's scope (``cmbagent_otel.ag2``), the run-level
durations from the workflow scope (``cmbagent_otel.workflow``). The two ``gen_ai.client.*``
histograms follow the GenAI semantic conventions of the declared schema, ``gen_ai.workflow.duration``
the GenAI repository's unreleased draft (bucket boundaries: the conventions' advice);
``docs/metrics.md`` has the details. Each instrument records at most :data:`SERIES_MAX` attribute
sets, then one overflow series. Every recording is guarded: a failing meter never reaches the
application.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, TypeVar

from opentelemetry import metrics as otel_metrics

from . import semconv
from ._forksafe import reset_in_child
from .version import __version__

logger = logging.getLogger("cmbagent_otel")


GEN_AI_CLIENT_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
GEN_AI_CLIENT_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
GEN_AI_WORKFLOW_DURATION: Final = "gen_ai.workflow.duration"
LLM_COST: Final = "cmbagent.llm.cost"
CODE_EXECUTION_FAILURES: Final = "cmbagent.code.execution.failures"
WORKFLOW_DURATION: Final = "cmbagent.workflow.duration"
STEP_DURATION: Final = "cmbagent.step.duration"

GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
TOKEN_INPUT: Final = "input"
TOKEN_OUTPUT: Final = "output"

# the GenAI conventions' advice (ExplicitBucketBoundaries)
TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS: Final = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# runs and plan steps last seconds to hours
RUN_BUCKETS: Final = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)

_M = TypeVar("_M")


def get_meter(scope_name: str, meter_provider: otel_metrics.MeterProvider | None = None) -> otel_metrics.Meter:
    """The meter of one instrumentation scope from ``meter_provider`` (``None``: the global one).

    A provider that fails to give one yields a no-op meter: metrics off, never an error in the app.
    """
    try:
        return otel_metrics.get_meter(scope_name, __version__, meter_provider=meter_provider,
                                      schema_url=semconv.SCHEMA_URL)
    except Exception:
        logger.warning("cmbagent_otel: the meter provider failed to create a meter; %s metrics are off",
                       scope_name, exc_info=True)
        return otel_metrics.NoOpMeter(scope_name)


def histogram_buckets() -> dict[tuple[str, str], tuple[float, ...]]:
    """Each of our histograms, as (meter scope, instrument name), with its conventions' bucket boundaries.

    The MeterProvider :func:`cmbagent_otel.provider.build_meter_provider` builds sets them by View too:
    an opentelemetry-api without bucket advice (1.27, the oldest supported) takes none from
    :func:`_histogram`, and its SDK would use its default boundaries.
    """
    return {(semconv.SCOPE_AG2, GEN_AI_CLIENT_TOKEN_USAGE): TOKEN_BUCKETS,
            (semconv.SCOPE_AG2, GEN_AI_CLIENT_OPERATION_DURATION): DURATION_BUCKETS,
            (semconv.SCOPE_WORKFLOW, GEN_AI_WORKFLOW_DURATION): RUN_BUCKETS,
            (semconv.SCOPE_WORKFLOW, WORKFLOW_DURATION): RUN_BUCKETS,
            (semconv.SCOPE_WORKFLOW, STEP_DURATION): RUN_BUCKETS}


def _histogram(meter: otel_metrics.Meter, name: str, unit: str, description: str,
               buckets: tuple[float, ...]) -> otel_metrics.Histogram:
    try:
        return meter.create_histogram(name, unit=unit, description=description,
                                      explicit_bucket_boundaries_advisory=list(buckets))
    except TypeError:  # an API without bucket advice
        return meter.create_histogram(name, unit=unit, description=description)


#: Attribute sets (series) each instrument records at most; a recording past them is counted in one
#: overflow series (``otel.metric.overflow=true``; the specification's default limit). The SDK keeps every
#: attribute set it was given for the provider's life: a service naming each run after its request
#: (``workflow(f"request {id}")``) made three new series per run, a model server reporting a new model
#: name per response (a dated snapshot, a router's deployment id) or code blocks tagged with any
#: language made new ones per call, for ever.
SERIES_MAX: Final = 2000
OVERFLOW: Final = MappingProxyType({"otel.metric.overflow": True})


class _Series:
    """The attribute sets one instrument was given, up to :data:`SERIES_MAX`."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[frozenset[Any]] = set()

    def bounded(self, attributes: Mapping[str, Any]) -> Mapping[str, Any]:
        """``attributes``, or :data:`OVERFLOW` once :data:`SERIES_MAX` other sets were recorded."""
        seen, key = self._seen, frozenset(attributes.items())
        if key in seen:
            return attributes
        if len(seen) < SERIES_MAX:  # two threads may both add one: a bound, not an exact count
            seen.add(key)
            return attributes
        return OVERFLOW


class ModelMetrics:
    """The AG2 instrumentor's instruments: model calls (GenAI client metrics, cost) and failed code runs."""

    __slots__ = ("_cost_series", "_duration_series", "_failure_series", "_token_series", "code_failures", "cost",
                 "duration", "token_usage")

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self._duration_series, self._token_series = _Series(), _Series()
        self._cost_series, self._failure_series = _Series(), _Series()
        self.token_usage = _histogram(meter, GEN_AI_CLIENT_TOKEN_USAGE, "{token}",
                                      "Number of input and output tokens used.", TOKEN_BUCKETS)
        self.duration = _histogram(meter, GEN_AI_CLIENT_OPERATION_DURATION, "s", "GenAI operation duration.",
                                   DURATION_BUCKETS)
        self.cost = meter.create_counter(LLM_COST, unit="USD", description="Cost of model calls as AG2 reports it.")
        self.code_failures = meter.create_counter(CODE_EXECUTION_FAILURES, unit="{execution}",
                                                  description="Code executions that failed (non-zero exit code "
                                                              "or an exception).")

    def live(self) -> bool:
        """Whether recording does anything: ``False`` for the global provider's proxy instruments
        while no MeterProvider is set, and for no-op ones, so a model call skips its metric work."""
        real = getattr(self.duration, "_real_instrument", self.duration)  # a proxy's delegate, once set
        return real is not None and not isinstance(real, otel_metrics.NoOpHistogram)

    def model_call(self, attributes: CallAttributes, seconds: float, error_type: str | None,
                   input_tokens: int | None, output_tokens: int | None, cost: float | None) -> None:
        """One model call ended after ``seconds``. Token counts (and cost) are recorded only for a
        call that succeeded: a failed one has its duration with ``error.type``."""
        try:
            if error_type is not None:
                self.duration.record(seconds, self._duration_series.bounded(
                    {**attributes.base, semconv.ERROR_TYPE: error_type}))
                return
            admitted = attributes.admitted
            if admitted is None or admitted[0] is not self:  # once per attribute set and instruments
                admitted = attributes.admitted = (
                    self, self._duration_series.bounded(attributes.base), self._token_series.bounded(attributes.input),
                    self._token_series.bounded(attributes.output), self._cost_series.bounded(attributes.cost))
            self.duration.record(seconds, admitted[1])
            if input_tokens is not None:
                self.token_usage.record(input_tokens, admitted[2])
            if output_tokens is not None:
                self.token_usage.record(output_tokens, admitted[3])
            if cost is not None:
                self.cost.add(cost, admitted[4])
        except Exception:
            logger.debug("cmbagent_otel: could not record model call metrics", exc_info=True)

    def code_failure(self, language: str, error_type: str) -> None:
        try:
            self.code_failures.add(1, self._failure_series.bounded(
                {semconv.CODE_LANGUAGE: language, semconv.ERROR_TYPE: error_type}))
        except Exception:
            logger.debug("cmbagent_otel: could not record a failed code execution", exc_info=True)


class CallAttributes:
    """The metric attributes of a model call, built once per (provider, server, request model,
    response model) and shared: ``base`` (duration), ``input`` / ``output`` (token usage, with
    ``gen_ai.token.type``), ``cost`` (provider and models only). ``admitted``: what
    :meth:`ModelMetrics.model_call` records them as (each, or the overflow series), decided once."""

    __slots__ = ("admitted", "base", "cost", "input", "output")

    def __init__(self, provider: str, request_model: str | None, response_model: str | None,
                 server: tuple[str, int] | None) -> None:
        base: dict[str, Any] = {semconv.GEN_AI_OPERATION_NAME: semconv.OP_CHAT,
                                semconv.GEN_AI_PROVIDER_NAME: provider}
        if request_model:
            base[semconv.GEN_AI_REQUEST_MODEL] = request_model
        if response_model:
            base[semconv.GEN_AI_RESPONSE_MODEL] = response_model
        self.cost = {k: v for k, v in base.items() if k != semconv.GEN_AI_OPERATION_NAME}
        if server is not None:
            base[semconv.SERVER_ADDRESS], base[semconv.SERVER_PORT] = server
        self.base = base
        self.input = {**base, GEN_AI_TOKEN_TYPE: TOKEN_INPUT}
        self.output = {**base, GEN_AI_TOKEN_TYPE: TOKEN_OUTPUT}
        self.admitted: tuple[Any, ...] | None = None


class RunMetrics:
    """The workflow scope's instruments: how long runs and plan steps take."""

    __slots__ = ("_series", "gen_ai_workflow", "step", "workflow")

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self._series = (_Series(), _Series(), _Series())  # per histogram
        self.gen_ai_workflow = _histogram(meter, GEN_AI_WORKFLOW_DURATION, "s", "GenAI workflow duration.",
                                          RUN_BUCKETS)
        self.workflow = _histogram(meter, WORKFLOW_DURATION, "s", "Duration of a cmbagent run (workflow).",
                                   RUN_BUCKETS)
        self.step = _histogram(meter, STEP_DURATION, "s", "Duration of a plan step.", RUN_BUCKETS)

    def ended(self, kind: str, attributes: Mapping[str, Any] | None, seconds: float, error_type: str | None,
              workflow_name: str | None = None) -> None:
        """A workflow or step span (``kind``) with span attributes ``attributes`` ended after ``seconds``."""
        try:
            attributes = attributes or {}
            if kind == semconv.KIND_WORKFLOW:
                name = attributes.get(semconv.WORKFLOW_NAME)
                run: dict[str, Any] = {semconv.GEN_AI_WORKFLOW_NAME: name} if name is not None else {}
                mine = {k: attributes[k] for k in (semconv.WORKFLOW_NAME, semconv.WORKFLOW_MODE) if k in attributes}
                if error_type is not None:
                    run[semconv.ERROR_TYPE] = mine[semconv.ERROR_TYPE] = error_type
                self.gen_ai_workflow.record(seconds, self._series[0].bounded(run))
                self.workflow.record(seconds, self._series[1].bounded(mine))
            elif kind == semconv.KIND_STEP:
                step = {k: attributes[k] for k in (semconv.PHASE, semconv.STEP_AGENT) if k in attributes}
                if workflow_name is not None:
                    step[semconv.WORKFLOW_NAME] = workflow_name
                if error_type is not None:
                    step[semconv.ERROR_TYPE] = error_type
                self.step.record(seconds, self._series[2].bounded(step))
        except Exception:
            logger.debug("cmbagent_otel: could not record a run duration", exc_info=True)


TIMED_KINDS: Final = frozenset({semconv.KIND_WORKFLOW, semconv.KIND_STEP})
"""Span kinds whose duration is a run-level metric (:meth:`RunMetrics.ended`)."""


# Instruments already made, per meter provider and class: instrument() after uninstrument() (a
# service re-instrumenting, a test suite) reuses them. Made again, they accumulated in the API's
# global proxy provider, which keeps every meter and instrument asked of it until an SDK provider
# is set (2 meters and 7 instruments per instrument() call, for ever). Weak keys: a provider
# the application drops is not kept alive by this memo.
_made: weakref.WeakKeyDictionary[Any, dict[type, Any]] = weakref.WeakKeyDictionary()
_made_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_made_lock")


def _instruments(cls: type[_M], scope_name: str, meter_provider: otel_metrics.MeterProvider | None) -> _M:
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    with _made_lock:
        try:
            made = _made.get(provider)
        except TypeError:  # a provider that takes no weak reference: made afresh each time
            return cls(get_meter(scope_name, meter_provider))
        found = made.get(cls) if made is not None else None
        if found is None:
            found = cls(get_meter(scope_name, meter_provider))
            if made is None:
                made = _made[provider] = {}
            made[cls] = found
        return found  # type: ignore[no-any-return]


def model_metrics(meter_provider: otel_metrics.MeterProvider | None = None) -> ModelMetrics | None:
    """The AG2 scope's instruments from ``meter_provider`` (``None``: the global provider); ``None`` on failure."""
    try:
        return _instruments(ModelMetrics, semconv.SCOPE_AG2, meter_provider)
    except Exception:
        logger.warning("cmbagent_otel: could not create the model metrics; they are off", exc_info=True)
        return None


def run_metrics(meter_provider: otel_metrics.MeterProvider | None = None) -> RunMetrics | None:
    """The workflow scope's instruments from ``meter_provider`` (``None``: the global provider); ``None`` on failure."""
    try:
        return _instruments(RunMetrics, semconv.SCOPE_WORKFLOW, meter_provider)
    except Exception:
        logger.warning("cmbagent_otel: could not create the run metrics; they are off", exc_info=True)
        return None
