#!/usr/bin/env bash
# Stop the PostgreSQL server that .ci/start-postgres.sh started from this checkout (recorded in
# .tools/services/postgres.env). A server it did not start is never touched. The data directory
# is kept (the next start reuses it); pass --purge to delete it as well.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$ROOT/.tools/services/postgres.env"
if [ ! -f "$STATE" ]; then
  echo "stop-postgres: no PostgreSQL was started from $ROOT (nothing recorded in $STATE)" >&2
  exit 0
fi
PGDATA="" PGPORT="" PGOWNER=""
# shellcheck disable=SC1090
. "$STATE"
PG_CTL="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)/pg_ctl"
[ -x "$PG_CTL" ] || PG_CTL="$(command -v pg_ctl)"
as_owner() {
  if [ "$(id -un)" = "$PGOWNER" ]; then bash -c "$1"; else su "$PGOWNER" -s /bin/bash -c "$1"; fi
}
if as_owner "'$PG_CTL' -D '$PGDATA' status >/dev/null 2>&1"; then
  as_owner "'$PG_CTL' -D '$PGDATA' -m fast -w stop >&2"
  echo "stop-postgres: stopped the server on 127.0.0.1:$PGPORT ($PGDATA)" >&2
else
  echo "stop-postgres: the server of $PGDATA was not running" >&2
fi
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$PGDATA"
  echo "stop-postgres: removed $PGDATA" >&2
fi
rm -f "$STATE"
