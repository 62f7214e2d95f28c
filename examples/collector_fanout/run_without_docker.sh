#!/usr/bin/env bash
# The DAG half of the fan-out without Docker: an ingest server on :4319 and the offline demo
# exporting to it over OTLP/HTTP (the same protocol the collector's otlphttp exporter speaks).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
db="${CMBAGENT_OTEL_DATABASE_URL:-sqlite:///$here/fanout.db}"
export CMBAGENT_OTEL_INGEST_TOKEN="${CMBAGENT_OTEL_INGEST_TOKEN:-local-demo-token}"
python -m cmbagent_otel.ingest --db "$db" --port 4319 --grpc-port 4320 &
ingest=$!
trap 'kill $ingest' EXIT
python - <<'PY'
import time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:4319/health", timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("ingest did not start")
        time.sleep(0.1)
PY
OTEL_TRACES_EXPORTER=otlp \
OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4319/v1/traces \
OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer%20$CMBAGENT_OTEL_INGEST_TOKEN" \
  python "$here/../offline_demo/run.py"
cmbagent-otel --db "$db" dag latest
