#!/usr/bin/env bash
# The collector fan-out on this machine, without Docker:
#
#   offline demo --OTLP/gRPC--> Jaeger v2 running jaeger-collector.yaml (memory_limiter, batch)
#                                 +--> Jaeger's own storage, UI and query API
#                                 +--> cmbagent-otel ingest (OTLP/HTTP, bearer token) --> DAG database
#
# then waits until Jaeger has the run's trace and the database has its run, prints the run's DAG
# and the trace's address in the Jaeger UI.
#
#   PYTHON      an interpreter with cmbagent-otel[ag2] installed (default: the clone's .venv/bin/python
#               when ./dev made it, else python3)
#   JAEGER_BIN  the Jaeger v2 binary (default: $CMBAGENT_OTEL_JAEGER_BIN, else .tools/jaeger/current/jaeger,
#               which `./dev setup --jaeger` builds)
#   CMBAGENT_OTEL_DATABASE_URL   default sqlite:///<this folder>/fanout.db
#   CMBAGENT_OTEL_INGEST_PORT    default 4319 (CMBAGENT_OTEL_INGEST_GRPC_PORT, its unused gRPC port: 4320);
#               Jaeger's addresses: the JAEGER_* variables listed in
#               jaeger-collector.yaml (defaults 127.0.0.1:4317, 4318, 16686, 16685, 13133)
#   KEEP_RUNNING=1  leave Jaeger and the ingest running afterwards to browse the UI (Ctrl-C stops them)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"
else py=python3; fi
jaeger="${JAEGER_BIN:-${CMBAGENT_OTEL_JAEGER_BIN:-$root/.tools/jaeger/current/jaeger}}"
if [ ! -x "$jaeger" ]; then
  echo "no Jaeger binary at $jaeger: run ./dev setup --jaeger (needs Go), or set JAEGER_BIN" >&2
  exit 2
fi
db="${CMBAGENT_OTEL_DATABASE_URL:-sqlite:///$here/fanout.db}"
ingest_port="${CMBAGENT_OTEL_INGEST_PORT:-4319}"
ingest_grpc_port="${CMBAGENT_OTEL_INGEST_GRPC_PORT:-4320}"   # 4317 is the collector's
export CMBAGENT_OTEL_INGEST_TOKEN="${CMBAGENT_OTEL_INGEST_TOKEN:-local-demo-token}"
export CMBAGENT_OTEL_INGEST_ENDPOINT="http://127.0.0.1:$ingest_port"
grpc="${JAEGER_OTLP_GRPC_ENDPOINT:-127.0.0.1:4317}"
query="http://${JAEGER_QUERY_HTTP_ENDPOINT:-127.0.0.1:16686}"
health="http://${JAEGER_HEALTH_ENDPOINT:-127.0.0.1:13133}/status"
service=cmbagent-fanout-demo
log="${TMPDIR:-/tmp}/cmbagent-otel-fanout-jaeger.$$.log"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# poll a URL until it answers 200, with a deadline
wait_for() {
  "$py" - "$1" "$2" <<'PY'
import sys, time, urllib.request
url, what = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{what} did not become ready at {url}")
    time.sleep(0.1)
PY
}

"$py" -m cmbagent_otel.ingest --db "$db" --host 127.0.0.1 --port "$ingest_port" --grpc-port "$ingest_grpc_port" &
pids+=($!)
"$jaeger" --config "$here/jaeger-collector.yaml" >"$log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$ingest_port/health" "cmbagent-otel ingest"
wait_for "$health" "Jaeger (log: $log)"

OTEL_TRACES_EXPORTER=otlp \
OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
OTEL_EXPORTER_OTLP_ENDPOINT="http://$grpc" \
OTEL_SERVICE_NAME="$service" \
  "$py" "$here/../offline_demo/run.py"

# the collector batches for up to 2 s and the ingest then writes: wait for both ends
run_id="$("$py" - "$query" "$service" "$db" <<'PY'
import json, sys, time, urllib.request, uuid
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
query, service, db = sys.argv[1:]
deadline = time.monotonic() + 60
trace = None
while trace is None:
    with urllib.request.urlopen(f"{query}/api/traces?service={service}&limit=1", timeout=5) as resp:
        data = json.load(resp)["data"] or []
    if data:
        trace = data[0]
    elif time.monotonic() > deadline:
        sys.exit("Jaeger did not receive the trace")
    else:
        time.sleep(0.2)
run_id = str(uuid.UUID(hex=trace["traceID"]))
print(f"Jaeger has the run's trace: {len(trace['spans'])} spans, {query}/trace/{trace['traceID']}", file=sys.stderr)
engine = create_engine(db)
while True:
    try:
        with engine.connect() as conn:
            status = conn.execute(text("select status from workflow_runs where id = :id"), {"id": run_id}).scalar()
    except OperationalError:  # schema not created yet by the ingest's first write
        status = None
    if status in ("completed", "failed"):
        break
    if time.monotonic() > deadline:
        sys.exit(f"the ingest did not store run {run_id}")
    time.sleep(0.2)
print(run_id)
PY
)"
"$py" -m cmbagent_otel.cli --db "$db" dag "$run_id"
echo "Jaeger UI: $query/trace/${run_id//-/}"
if [ "${KEEP_RUNNING:-0}" = 1 ]; then
  echo "Jaeger and the ingest keep running; Ctrl-C stops them"
  wait
fi
