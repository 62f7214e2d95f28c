#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1:${PGPORT:-55432} for the DAG exporter tests.
# Installs Debian's postgresql when missing. Prints the SQLAlchemy URL on the last line, e.g.
#   export CMBAGENT_OTEL_TEST_PG_URL="$(.ci/start-postgres.sh | tail -n1)"
# Stop it with: su postgres -c "pg_ctl -D $PGDATA stop"  (PGDATA is printed on stderr).
set -euo pipefail
PORT="${PGPORT:-55432}"
DB="${PGDATABASE_NAME:-cmbagent_otel_test}"
DATA="${PGDATA_DIR:-/tmp/cmbagent-otel-pg-${PORT}}"

find_bin() {
  local name="$1" found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -n "$found" ] && [ -x "$found/$name" ]; then echo "$found/$name"; return; fi
  command -v "$name" || true
}

if [ -z "$(find_bin initdb)" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y postgresql >&2
fi
INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"

as_pg() {
  if [ "$(id -un)" = postgres ]; then bash -c "$1"; else su postgres -s /bin/bash -c "$1"; fi
}

if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  chown postgres:postgres "$DATA" 2>/dev/null || true
  chmod 700 "$DATA"
  as_pg "'$INITDB' -D '$DATA' -U postgres --auth=trust -E UTF8 >/dev/null"
fi
if ! as_pg "'$PG_CTL' -D '$DATA' status >/dev/null 2>&1"; then
  as_pg "'$PG_CTL' -D '$DATA' -l '$DATA/server.log' -w -o \"-h 127.0.0.1 -p $PORT -k /tmp\" start >&2"
fi
for _ in $(seq 1 60); do
  if pg_isready -h 127.0.0.1 -p "$PORT" -U postgres >/dev/null 2>&1; then break; fi
  sleep 0.5
done
if ! psql -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
  psql -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE $DB" >&2
fi
echo "PGDATA=$DATA" >&2
URL="postgresql+psycopg://postgres@127.0.0.1:${PORT}/${DB}"
export CMBAGENT_OTEL_TEST_PG_URL="$URL"
echo "$URL"
