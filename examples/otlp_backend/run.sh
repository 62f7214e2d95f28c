#!/usr/bin/env bash
# Run the offline demo and send its spans over OTLP to a backend, and to the DAG tables.
#   BACKEND=jaeger  (default) OTLP/gRPC to localhost:4317, UI http://localhost:16686
#   BACKEND=tempo   OTLP/gRPC to localhost:4317 (Tempo's receiver), query via Grafana
#   BACKEND=phoenix OTLP/HTTP to localhost:6006/v1/traces, UI http://localhost:6006
# PYTHON: an interpreter with cmbagent-otel[ag2] (default: the clone's .venv/bin/python when ./dev
# made it, else python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$here/../../.venv/bin/python" ]; then py="$here/../../.venv/bin/python"
else py=python3; fi
export OTEL_TRACES_EXPORTER="${OTEL_TRACES_EXPORTER:-otlp,cmbagent_dag}"
export OTEL_SERVICE_NAME="${OTEL_SERVICE_NAME:-cmbagent-demo}"
case "${BACKEND:-jaeger}" in
  jaeger|tempo)
    export OTEL_EXPORTER_OTLP_PROTOCOL=grpc
    export OTEL_EXPORTER_OTLP_ENDPOINT="${OTEL_EXPORTER_OTLP_ENDPOINT:-http://localhost:4317}"
    export OTEL_EXPORTER_OTLP_INSECURE=true ;;
  phoenix)
    export OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
    export OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-http://localhost:6006/v1/traces}"
    export OTEL_RESOURCE_ATTRIBUTES="openinference.project.name=cmbagent" ;;
  *) echo "unknown BACKEND=$BACKEND (jaeger, tempo, phoenix)" >&2; exit 2 ;;
esac
exec "$py" "$here/../offline_demo/run.py"
