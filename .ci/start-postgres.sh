#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1:${PGPORT:-55432} for the tests; prints the
# SQLAlchemy URL on the last line, e.g.
#   export CMBAGENT_OTEL_TEST_PG_URL="$(.ci/start-postgres.sh | tail -n1)"
# As root it installs Debian's postgresql when missing and runs the server as the `postgres`
# user; as any other user it runs the server as that user (the PostgreSQL server programs must
# be installed: initdb, pg_ctl), no sudo needed. Data: PGDATA_DIR, default
# /tmp/cmbagent-otel-pg-<port> (root) or /tmp/cmbagent-otel-pg-<user>-<port>.
# A server this script starts is recorded in .tools/services/postgres.env; stop it with
# `./dev stop-services` (.ci/stop-postgres.sh). A server that was already running is left alone.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${PGPORT:-55432}"
# one start at a time per port: .ci/run starts it for the oldest AG2 line's run while ./dev test's
# setup starts it too; the second waits here, then finds the server running and prints its URL.
# The lock's descriptor is closed for the server (9>&- below): a postmaster that inherited it held
# the lock for its whole life and the second start waited for ever (a CI ran out of its 90 minutes).
# The wait is bounded all the same: after it the start goes on unlocked, as before the lock existed.
if command -v flock >/dev/null 2>&1; then
  exec 9>"/tmp/cmbagent-otel-pg-start-${PORT}.lock"
  if ! flock -w "${CMBAGENT_OTEL_PG_LOCK_WAIT_S:-300}" 9; then
    echo "start-postgres: another start still holds /tmp/cmbagent-otel-pg-start-${PORT}.lock; going on without it" >&2
  fi
fi
DB="${PGDATABASE_NAME:-cmbagent_otel_test}"
ME="$(id -un)"
if [ "$(id -u)" = 0 ]; then
  DATA="${PGDATA_DIR:-/tmp/cmbagent-otel-pg-${PORT}}"
  OWNER=postgres
else
  DATA="${PGDATA_DIR:-/tmp/cmbagent-otel-pg-${ME}-${PORT}}"
  OWNER="$ME"
fi
STATE="$ROOT/.tools/services/postgres.env"

find_bin() {
  local name="$1" found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -n "$found" ] && [ -x "$found/$name" ]; then echo "$found/$name"; return; fi
  command -v "$name" || true
}

if [ -z "$(find_bin initdb)" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "start-postgres: the PostgreSQL server programs (initdb, pg_ctl) are not installed and only root" >&2
    echo "  can install them here. Either install them (e.g. 'sudo apt-get install postgresql'), or point" >&2
    echo "  CMBAGENT_OTEL_TEST_PG_URL at an existing server, or set CMBAGENT_OTEL_SKIP_SERVICES=1." >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # the lock ./dev's Graphviz install takes too: apt/dpkg refuse a second run at once
  apt_locked() {
    if command -v flock >/dev/null 2>&1; then flock -o /tmp/cmbagent-otel-apt.lock apt-get "$@"; else apt-get "$@"; fi
  }
  apt_locked update >&2
  apt_locked install -y postgresql >&2
fi
INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"
PG_ISREADY="$(find_bin pg_isready)"
PSQL="$(find_bin psql)"

as_owner() {
  if [ "$ME" = "$OWNER" ]; then bash -c "$1"; else su "$OWNER" -s /bin/bash -c "$1"; fi
}

running() { as_owner "'$PG_CTL' -D '$DATA' status >/dev/null 2>&1"; }

if ! running && "$PG_ISREADY" -h 127.0.0.1 -p "$PORT" >/dev/null 2>&1; then
  echo "start-postgres: another server already listens on 127.0.0.1:$PORT. Use it through" >&2
  echo "  CMBAGENT_OTEL_TEST_PG_URL=postgresql+psycopg://USER@127.0.0.1:$PORT/DB, or pick a free port with PGPORT." >&2
  exit 1
fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  [ "$ME" = "$OWNER" ] || chown "$OWNER:$OWNER" "$DATA"
  chmod 700 "$DATA"
  as_owner "'$INITDB' -D '$DATA' -U postgres --auth=trust -E UTF8 >/dev/null"
fi
note="was already running, not started from this checkout: ./dev stop-services leaves it alone"
if [ -f "$STATE" ] && grep -qxF "PGDATA=$(printf %q "$DATA")" "$STATE"; then
  note="started earlier from this checkout: stop it with ./dev stop-services"
fi
if ! running; then
  note="stop it with ./dev stop-services"
  # unix socket inside the data dir: never collides with another user's server on /tmp
  as_owner "'$PG_CTL' -D '$DATA' -l '$DATA/server.log' -w -t 60 -o \"-h 127.0.0.1 -p $PORT -k '$DATA'\" start >&2" 9>&-
  mkdir -p "$(dirname "$STATE")"
  printf 'PGDATA=%q\nPGPORT=%q\nPGOWNER=%q\n' "$DATA" "$PORT" "$OWNER" >"$STATE"
fi
deadline=$(( $(date +%s) + 30 ))
until "$PG_ISREADY" -h 127.0.0.1 -p "$PORT" -U postgres >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "start-postgres: server on 127.0.0.1:$PORT not ready after 30s; see $DATA/server.log" >&2
    exit 1
  fi
  sleep 0.2
done
if ! "$PSQL" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
  "$PSQL" -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE $DB" >&2
fi
echo "PGDATA=$DATA ($note)" >&2
echo "postgresql+psycopg://postgres@127.0.0.1:${PORT}/${DB}"
