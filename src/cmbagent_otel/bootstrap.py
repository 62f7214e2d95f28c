"""``instrument()`` / ``uninstrument()``: the one-line setup, and the auto-instrumentation hook."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ._spans import workflow_tracers
from .instrumentation.ag2 import AG2Instrumentor
from .provider import build_tracer_provider, sdk_disabled, slot_of, span_processors
from .redaction import reload_settings

logger = logging.getLogger("cmbagent_otel")

_lock = threading.RLock()
_state: dict[str, Any] = {"active": False, "provider": None, "owned": False, "threading": False, "cmbagent": False,
                          "binding": None}
# The provider instrument() built, kept across uninstrument(): the global provider can be set
# only once per process, so a later instrument() puts fresh processors into this one.
_built: dict[str, TracerProvider | None] = {"provider": None}


def _app_provider() -> trace.TracerProvider | None:
    """The SDK provider the application already installed globally, if any."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def instrument(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    exporters: str | Sequence[str] | None = None,
    span_exporters: Sequence[SpanExporter] = (),
    service_name: str | None = None,
    capture_content: bool | str | None = None,
    logger_provider: Any = None,
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
    ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT``, ``NO_CONTENT``) overrides
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``; content events go to
    ``logger_provider`` (default: the global LoggerProvider).
    """
    with _lock:
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
                # a provider from an earlier round (maybe the global one): fresh processors
                for processor in span_processors(exporters, span_exporters):
                    slot.add_span_processor(processor)
                provider = built
            else:
                provider = build_tracer_provider(exporters, service_name=service_name, span_exporters=span_exporters)
                _built["provider"] = provider
            owned = True
            if set_global and _app_provider() is None:
                trace.set_tracer_provider(provider)
        binding = workflow_tracers.bind(provider)
        AG2Instrumentor().instrument(tracer_provider=provider, capture_content=capture_content,
                                     logger_provider=logger_provider)
        threaded = False
        if instrument_threading:
            threaded = _instrument_threading()
        cmbagent = False
        if instrument_cmbagent:
            cmbagent = _instrument_cmbagent(provider)
        _state.update(active=True, provider=provider, owned=owned, threading=threaded, cmbagent=cmbagent,
                      binding=binding)
        return provider


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


def _instrument_cmbagent(provider: trace.TracerProvider | None) -> bool:
    try:
        from .integrations.cmbagent import CmbagentInstrumentor, instrument_cmbagent

        if CmbagentInstrumentor().is_instrumented_by_opentelemetry:
            return False  # someone else (opentelemetry-instrument) owns it; leave it to them
        return instrument_cmbagent(tracer_provider=provider)
    except Exception:
        logger.debug("cmbagent_otel: cmbagent integration failed", exc_info=True)
        return False


def uninstrument() -> None:
    """Undo :func:`instrument`: restore every patched method; flush and shut down the span
    processors (and exporters) of a provider :func:`instrument` built. That provider stays
    (it may be the global one, which cannot be replaced), so a later :func:`instrument`
    records again through fresh processors."""
    with _lock:
        if not _state["active"]:
            return
        AG2Instrumentor().uninstrument()
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
        if _state["owned"] and isinstance(provider, TracerProvider):
            try:
                slot = slot_of(provider)
                if slot is not None:
                    slot.release()  # the provider stays usable for the next instrument()
                else:
                    provider.force_flush()
                    provider.shutdown()
            except Exception:
                logger.debug("cmbagent_otel: provider shutdown failed", exc_info=True)
        if _state["binding"] is not None:
            workflow_tracers.release(_state["binding"])
        _state.update(active=False, provider=None, owned=False, threading=False, cmbagent=False, binding=None)


def is_instrumented() -> bool:
    return bool(_state["active"])


class AutoConfigurator:
    """``opentelemetry_configurator`` entry point for ``opentelemetry-instrument``.

    Builds the provider from ``OTEL_*`` variables (as :func:`instrument` does) and installs
    it globally; the AG2 and cmbagent instrumentors are loaded through their own entry points.
    """

    def configure(self, **kwargs: Any) -> None:
        if sdk_disabled() or _app_provider() is not None:
            return
        trace.set_tracer_provider(build_tracer_provider())
