#!/usr/bin/env bash
# Builds Jaeger v2 -- an OpenTelemetry Collector distribution with OTLP receivers, the batch and
# memory_limiter processors, OTLP exporters, Jaeger's storage and its query API/UI -- from the Go
# module proxy with the ordinary `go` client, once, into <project>/.tools/jaeger/<version>/jaeger.
# No Docker and no prebuilt download. Prints the binary's path on the last line, e.g.
#   export CMBAGENT_OTEL_JAEGER_BIN="$(.ci/build-jaeger.sh | tail -n1)"
# Exit status 3 when `go` is missing. CMBAGENT_OTEL_JAEGER_VERSION picks another module version.
#
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@VERSION` is refused (the module's go.mod
# has a replace directive), so the module is downloaded into Go's module cache, copied to a
# writable temporary folder and built there as the main module. About 4 minutes on a clean
# 2-core machine (mostly module downloads); Go's module and build caches make a rebuild quick.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${CMBAGENT_OTEL_JAEGER_VERSION:-v1.76.0}"
MODULE=github.com/jaegertracing/jaeger
TOOLS="$ROOT/.tools/jaeger"
DEST="$TOOLS/$VERSION"
BIN="$DEST/jaeger"

usable() { [ -x "$BIN" ] && "$BIN" --help >/dev/null 2>&1; }

finish() {
  ln -sfn "$VERSION" "$TOOLS/current"   # the tests' default binary: .tools/jaeger/current/jaeger
  echo "$BIN"
  exit 0
}

if usable; then finish; fi
# Go's own installer puts it in /usr/local/go, which is not always on PATH
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
if ! command -v go >/dev/null 2>&1; then
  echo "build-jaeger: the Go toolchain ('go') is not on PATH: cannot build Jaeger $VERSION." >&2
  echo "  Install Go (https://go.dev/doc/install, or your distribution's golang package) and rerun," >&2
  echo "  or point CMBAGENT_OTEL_JAEGER_BIN at an existing Jaeger v2 binary." >&2
  exit 3
fi

mkdir -p "$DEST"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DEST/.lock"
  flock 9              # two ./dev runs at once: the second waits, then finds the binary
  if usable; then finish; fi
fi

start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/cmbagent-otel-jaeger.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
echo "build-jaeger: downloading $MODULE@$VERSION through the Go module proxy" >&2
# outside any Go module, so that `go mod download` only fetches the named module
dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
if [ -z "$dir" ] || [ ! -f "$dir/go.mod" ]; then
  echo "build-jaeger: go mod download did not report the module's folder" >&2
  exit 1
fi
cp -R "$dir" "$work/src"
chmod -R u+w "$work/src"   # the module cache is read-only
echo "build-jaeger: go build ./cmd/jaeger (dependencies come from the module proxy too)" >&2
(cd "$work/src" && go build -trimpath -buildvcs=false \
    -ldflags "-s -w -X $MODULE/internal/version.latestVersion=$VERSION" \
    -o "$BIN.partial" ./cmd/jaeger)
mv -f "$BIN.partial" "$BIN"
usable || { echo "build-jaeger: $BIN does not run" >&2; exit 1; }
echo "build-jaeger: Jaeger $VERSION built in $(( $(date +%s) - start ))s" >&2
finish
