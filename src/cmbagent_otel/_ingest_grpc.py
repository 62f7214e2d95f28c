"""OTLP/gRPC trace receiver of ``cmbagent-otel ingest``, on grpcio's server.

grpcio does the transport work: HTTP/2, a bounded worker pool, a cap on concurrent RPCs
(RESOURCE_EXHAUSTED beyond it), ``grpc.max_receive_message_length`` (checked on the
decompressed message) and gzip/deflate decompression. The service takes the raw request
bytes (no deserializer), so decoding is the same bounded walk the HTTP receiver uses.

Status codes follow the OTLP specification: OK with an ``ExportTraceServiceResponse``
(``partial_success`` when spans were rejected), INVALID_ARGUMENT for malformed requests,
UNAUTHENTICATED without the bearer token, RESOURCE_EXHAUSTED above the size limit, and
UNAVAILABLE with a ``google.rpc.RetryInfo`` delay while the database is down or the memory
budget is in use (the SDK's OTLP exporter retries after that delay).
"""

from __future__ import annotations

import errno
import logging
from concurrent import futures
from typing import Any

import grpc

from ._ingest_core import IngestCore, IngestError
from .otlp_decode import encode_response

logger = logging.getLogger("cmbagent_otel.ingest")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}


def _retry_info(seconds: int) -> bytes:
    from google.protobuf.duration_pb2 import Duration
    from google.rpc.error_details_pb2 import RetryInfo

    return RetryInfo(retry_delay=Duration(seconds=seconds)).SerializeToString()


class TraceService:
    """``TraceService/Export`` over raw bytes."""

    def __init__(self, core: IngestCore) -> None:
        self.core = core

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        core = self.core
        metadata = dict(context.invocation_metadata() or ())
        if not core.authorized(metadata.get("authorization")):
            self._abort(context, IngestError("unauthenticated", "missing or invalid bearer token"))
        if not core.enter():
            self._abort(context, IngestError("unavailable", "ingest is busy (too many requests in flight)"))
        ticket = core.admission.ticket()
        try:
            ticket.hold(len(request) * core.factor("protobuf"))
            outcome = core.process(request, "protobuf", False, ticket)
        except IngestError as err:
            self._abort(context, err)
        except Exception:
            logger.exception("cmbagent-otel ingest: unexpected error (gRPC)")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            ticket.close()
            core.leave()
        return encode_response("protobuf", outcome.rejected, outcome.error_message)

    def _abort(self, context: grpc.ServicerContext, err: IngestError) -> None:
        if err.kind == "unavailable":
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", _retry_info(self.core.retry_after)),))
        context.abort(_CODES.get(err.kind, grpc.StatusCode.UNKNOWN), err.message)


class GrpcReceiver:
    """A grpcio server bound to ``host:port`` serving :class:`TraceService`."""

    def __init__(self, core: IngestCore, host: str, port: int, *, workers: int, max_concurrent: int) -> None:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmbagent-otel-ingest-grpc"),
            maximum_concurrent_rpcs=max_concurrent,
            options=[
                ("grpc.max_receive_message_length", core.max_bytes),
                ("grpc.max_send_message_length", 1 << 20),
                ("grpc.so_reuseport", 0),  # a second ingest on the same port must fail, not share it
            ],
        )
        service = TraceService(core)
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(service.export)})
        self._server.add_generic_rpc_handlers((handler,))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio reports a port in use this way
            raise OSError(errno.EADDRINUSE, f"cannot listen on {address} (OTLP/gRPC): {exc}") from None
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._server.start()
            self._started = True

    def stop(self, grace: float | None = 5.0) -> Any:
        self._server.stop(grace).wait()
