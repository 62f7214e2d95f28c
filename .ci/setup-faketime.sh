#!/usr/bin/env bash
# Installs Debian's faketime (libfaketime) for tests/faults/test_faults28_clock_jumps.py, which move
# the wall clock of a child process only (LD_PRELOAD; the system clock is never touched). Those tests
# skip without it locally and fail under CI=true. Idempotent: does nothing when the library is there.
# Usage: .ci/setup-faketime.sh   (needs root or sudo for apt-get)
set -euo pipefail
for lib in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
  if [ -f "$lib" ]; then
    echo "libfaketime already installed: $lib"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# under ./dev's apt lock: Graphviz and PostgreSQL may be installing at the same time, and apt/dpkg
# refuse a second run at once instead of waiting
LOCK=()
if command -v flock >/dev/null 2>&1; then LOCK=(flock -o /tmp/cmbagent-otel-apt.lock); fi
$SUDO "${LOCK[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO "${LOCK[@]}" apt-get install -y -qq faketime >/dev/null
ls /usr/lib/*/faketime/libfaketime.so.1
