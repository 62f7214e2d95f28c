"""``python -m cmbagent_otel.cli``: the ``cmbagent-otel`` command without its console script."""

from __future__ import annotations

from . import main

raise SystemExit(main())
