"""``instrument()`` / ``uninstrument()``: the one-line setup, and the auto-instrumentation hook."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from . import _termination, _threadpool
from . import environment_variables as env
from ._forksafe import reset_in_child
from ._gcquiet import imports_settled
from ._spans import workflow_tracers
from .instrumentation._content import ContentMode
from .instrumentation.ag2 import AG2Instrumentor
from .provider import (
    ConfigurationError,
    build_meter_provider,
    build_tracer_provider,
    sdk_disabled,
    slot_of,
    span_processors,
)
from .redaction import reload_settings

logger = logging.getLogger("cmbagent_otel")

_lock = threading.RLock()
reset_in_child(sys.modules[__name__], "_lock")  # a forked child must not find it held
_state: dict[str, Any] = {"active": False, "provider": None, "owned": False, "threading": False, "cmbagent": False,
                          "binding": None, "meter_provider": None}
# The providers instrument() built, kept across uninstrument() while they are the global ones (a
# global provider can be set only once per process): a later instrument() puts fresh span
# processors into the tracer provider, and records into the same meter provider again.
_built: dict[str, Any] = {"provider": None, "meter_provider": None}


def _app_provider() -> trace.TracerProvider | None:
    """The SDK provider the application already installed globally, if any."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def _app_meter_provider() -> otel_metrics.MeterProvider | None:
    """The meter provider the application already installed globally, if any."""
    provider = otel_metrics.get_meter_provider()
    if isinstance(provider, otel_metrics.NoOpMeterProvider) or type(provider).__name__ == "_ProxyMeterProvider":
        return None
    return provider


def _meter_provider(meter_provider: otel_metrics.MeterProvider | None, service_name: str | None,
                    set_global: bool) -> tuple[otel_metrics.MeterProvider | None, bool]:
    """(the meter provider to record into, ``None``: the global one; whether instrument() built it)."""
    if meter_provider is not None:
        return meter_provider, False
    built = _built["meter_provider"]
    if built is not None:
        return built, True
    if _app_meter_provider() is not None:
        return None, False
    provider = build_meter_provider(service_name=service_name)  # None with OTEL_METRICS_EXPORTER unset / none
    if provider is None:
        return None, False
    if set_global and _app_meter_provider() is None:
        otel_metrics.set_meter_provider(provider)
        _built["meter_provider"] = provider  # the global one now: kept for the next instrument()
    return provider, True


def instrument(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    exporters: str | Sequence[str] | None = None,
    span_exporters: Sequence[SpanExporter] = (),
    service_name: str | None = None,
    capture_content: bool | str | None = None,
    logger_provider: Any = None,
    meter_provider: otel_metrics.MeterProvider | None = None,
    metrics: bool | None = None,
    set_global: bool = True,
    instrument_threading: bool = True,
    instrument_cmbagent: bool = True,
) -> trace.TracerProvider | None:
    """Turn tracing on for AG2 / cmbagent in this process; returns the provider in use.

    Provider choice: ``tracer_provider`` if given; else the SDK provider the application
    already set globally (never replaced); else a new one built from ``OTEL_*`` variables
    (``exporters`` overrides ``OTEL_TRACES_EXPORTER``, ``span_exporters`` adds instances),
    installed as the global provider when ``set_global``. With ``OTEL_SDK_DISABLED=true``
    nothing is patched and ``None`` is returned. Calling it again while active returns the
    same provider without patching twice. ``capture_content`` (a bool, or a mode name:
    ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT``, ``NO_CONTENT``, or any other form the variable
    takes; anything else raises :class:`ConfigurationError`, as an unknown exporter name does) overrides
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``; content events go to
    ``logger_provider`` (default: the global LoggerProvider).

    Metrics (``docs/metrics.md``) go to ``meter_provider`` if given; else to the meter provider
    the application already set globally; else to one built from ``OTEL_METRICS_EXPORTER``
    (``otlp``, ``console``; installed globally when ``set_global``); with that unset or
    ``none``, to the global provider (a no-op until the application sets one). ``metrics=False``
    (or ``CMBAGENT_OTEL_METRICS=false``) records none.

    Called from the main thread, it also makes SIGTERM and SIGHUP (where their handler is still
    Python's default) end the run and its open steps as failed ("stopped by SIGTERM", their duration
    metrics recorded) and flush the tracer provider, then the meter provider, within the export
    timeout, before the process ends by that signal as it would have
    (``CMBAGENT_OTEL_FLUSH_ON_SIGNAL=false``: not);
    :func:`uninstrument` puts the default back.
    """
    capture_content = _capture_content(capture_content)
    # settled only after the application imported AG2 itself (see _gcquiet)
    with _lock, imports_settled(heap_imported="autogen" in sys.modules):
        if _state["active"]:
            return _state["provider"]  # type: ignore[no-any-return]
        if sdk_disabled():
            logger.info("cmbagent_otel: OTEL_SDK_DISABLED=true, instrumentation not installed")
            return None
        reload_settings()
        owned = False
        provider = tracer_provider or _app_provider()
        built = _built["provider"]
        if provider is None or (provider is built and tracer_provider is None):
            if built is not None and (slot := slot_of(built)) is not None:
                # a provider from an earlier round (maybe the global one): fresh processors (those kept for
                # a run left open at the last uninstrument() go on with that run's spans until it ends)
                for processor in span_processors(exporters, span_exporters):
                    slot.add_span_processor(processor)
                provider = built
            else:
                provider = build_tracer_provider(exporters, service_name=service_name, span_exporters=span_exporters)
                _built["provider"] = provider
            owned = True
            if set_global and _app_provider() is None:
                trace.set_tracer_provider(provider)
        metrics_on = bool(env.get(env.METRICS, metrics))
        meters, meters_owned = (_meter_provider(meter_provider, service_name, set_global) if metrics_on
                                else (None, False))
        binding = workflow_tracers.bind_providers(provider, meters, metrics_on)
        AG2Instrumentor().instrument(tracer_provider=provider, capture_content=capture_content,
                                     logger_provider=logger_provider, meter_provider=meters, metrics=metrics_on)
        threaded = False
        if instrument_threading:
            threaded = _instrument_threading()
            _threadpool.instrument()  # ThreadPool tasks: no submit() the threading instrumentation wraps
        cmbagent = False
        if instrument_cmbagent:
            cmbagent = _instrument_cmbagent(provider, meters, metrics_on)
        _state.update(active=True, provider=provider, owned=owned, threading=threaded, cmbagent=cmbagent,
                      binding=binding, meter_provider=meters if meters_owned else None)
        try:
            _termination.install(provider, meters, metrics_on)
        except Exception:
            logger.debug("cmbagent_otel: signal handler not installed", exc_info=True)
        return provider


def _capture_content(value: Any) -> Any:
    """``capture_content`` as the variable's parser reads a mode name (any case, ``-`` or ``_``). An
    invalid one is a programming error and raises, as an unknown exporter name does (it was logged as
    if the environment variable held it, and content stayed off)."""
    if value is None or isinstance(value, (bool, ContentMode)):
        return value
    try:
        return env.SETTINGS[env.CAPTURE_MESSAGE_CONTENT].parse(str(value))
    except ValueError:
        raise ConfigurationError(f"capture_content={value!r} is not a bool or one of SPAN_ONLY, EVENT_ONLY, "
                                 "SPAN_AND_EVENT, NO_CONTENT") from None


def _instrument_threading() -> bool:
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    except ImportError:
        return False
    instrumentor = ThreadingInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return False  # someone else owns it; leave it to them
    instrumentor.instrument()
    return True


def _instrument_cmbagent(provider: trace.TracerProvider | None, meter_provider: otel_metrics.MeterProvider | None,
                         metrics_on: bool) -> bool:
    try:
        from .integrations.cmbagent import CmbagentInstrumentor, instrument_cmbagent

        if CmbagentInstrumentor().is_instrumented_by_opentelemetry:
            return False  # someone else (opentelemetry-instrument) owns it; leave it to them
        return instrument_cmbagent(tracer_provider=provider, meter_provider=meter_provider, metrics=metrics_on)
    except Exception:
        logger.debug("cmbagent_otel: cmbagent integration failed", exc_info=True)
        return False


def uninstrument() -> None:
    """Undo :func:`instrument`: restore every patched method; flush and shut down the span
    processors (and exporters) of a provider :func:`instrument` built. That provider stays
    (it may be the global one, which cannot be replaced), so a later :func:`instrument`
    records again through fresh processors. A meter provider it built is flushed, and shut
    down unless it is the global one (a later :func:`instrument` records into it again).

    Called inside a run (its workflow, phase or step blocks still open, in any thread), the
    processors are kept until that run's spans have ended, and flushed and shut down then: the
    rest of the run is recorded through them (its blocks, not the AG2 calls, which are no longer
    patched) and its rows end ``completed``/``failed`` instead of ``executing``/``running``. A
    later :func:`instrument` adds fresh processors, which get the spans of every other trace;
    the open run stays with the processors that recorded its start. A run still open when the
    interpreter exits is ended failed (``error.type=process_exited``) first."""
    with _lock:
        if not _state["active"]:
            return
        AG2Instrumentor().uninstrument()
        try:
            _termination.uninstall()
        except Exception:
            logger.debug("cmbagent_otel: signal handler not removed", exc_info=True)
        _threadpool.uninstrument()
        if _state["threading"]:
            from opentelemetry.instrumentation.threading import ThreadingInstrumentor

            ThreadingInstrumentor().uninstrument()
        if _state["cmbagent"]:
            try:
                from .integrations.cmbagent import CmbagentInstrumentor

                CmbagentInstrumentor().uninstrument()
            except Exception:
                logger.debug("cmbagent_otel: cmbagent integration removal failed", exc_info=True)
        provider = _state["provider"]
        binding = _state["binding"]
        if _state["owned"] and isinstance(provider, TracerProvider):
            try:
                slot = slot_of(provider)
                if slot is not None:
                    # the provider stays usable for the next instrument(); a run still open keeps its
                    # processors, and its blocks their tracer, until its spans have ended
                    then = (lambda: workflow_tracers.release(binding)) if binding is not None else None
                    binding = None
                    slot.release_when_closed(then)
                else:
                    provider.force_flush()
                    provider.shutdown()
            except Exception:
                logger.debug("cmbagent_otel: provider shutdown failed", exc_info=True)
        if binding is not None:
            workflow_tracers.release(binding)
        meters = _state["meter_provider"]
        if isinstance(meters, MeterProvider):
            try:
                meters.force_flush()
                if meters is not _built["meter_provider"]:
                    meters.shutdown()
            except Exception:
                logger.debug("cmbagent_otel: meter provider flush failed", exc_info=True)
        _state.update(active=False, provider=None, owned=False, threading=False, cmbagent=False, binding=None,
                      meter_provider=None)


def is_instrumented() -> bool:
    return bool(_state["active"])


class AutoConfigurator:
    """``opentelemetry_configurator`` entry point for ``opentelemetry-instrument``.

    Builds the tracer provider (and, when ``OTEL_METRICS_EXPORTER`` names an exporter, the meter
    provider) from ``OTEL_*`` variables (as :func:`instrument` does) and installs them globally;
    the AG2 and cmbagent instrumentors are loaded through their own entry points. What
    :func:`instrument` does beyond the instrumentors is done here too: SIGTERM/SIGHUP end the open
    run failed and flush the providers before the process ends by the signal, a run still open at
    the interpreter's exit is ended failed, and ``multiprocessing.pool.ThreadPool`` tasks run in
    the context they were submitted from (under ``opentelemetry-instrument`` none of it was done:
    a run stopped by SIGTERM stayed ``executing``, its nodes ``running``, and the spans queued
    were lost).
    """

    def configure(self, **kwargs: Any) -> None:
        if sdk_disabled():
            return
        if _app_provider() is None:
            trace.set_tracer_provider(build_tracer_provider())
        meters = None
        if _app_meter_provider() is None:
            meters = build_meter_provider()  # None unless OTEL_METRICS_EXPORTER names an exporter
            if meters is not None:
                otel_metrics.set_meter_provider(meters)
        try:
            _threadpool.instrument()
            _termination.install(trace.get_tracer_provider(), meters, bool(env.get(env.METRICS)))
        except Exception:
            logger.debug("cmbagent_otel: signal handler or thread pool context not installed", exc_info=True)
