#!/usr/bin/env bash
# Creates a separate venv with Arize Phoenix so its heavy dependency tree never touches the
# project venv. Idempotent: does nothing when the phoenix binary already works.
# Usage: .ci/setup-phoenix.sh [VENV_DIR]   (default /work/venv-phoenix; PYTHON picks the interpreter)
set -euo pipefail
VENV="${1:-${CMBAGENT_OTEL_PHOENIX_VENV:-/work/venv-phoenix}}"
PY="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/phoenix" ] && "$VENV/bin/python" -c "import phoenix" >/dev/null 2>&1; then
  echo "phoenix already installed in $VENV"
  exit 0
fi
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "arize-phoenix${PHOENIX_VERSION:+==$PHOENIX_VERSION}"
"$VENV/bin/python" -c "import phoenix, sys; print('phoenix', phoenix.__version__, 'in', sys.prefix)"
echo "phoenix install took $(( $(date +%s) - start ))s"
echo "export CMBAGENT_OTEL_PHOENIX_BIN=$VENV/bin/phoenix"
