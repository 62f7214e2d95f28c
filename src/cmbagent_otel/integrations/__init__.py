"""Optional integrations with applications built on AG2 (currently cmbagent)."""

from __future__ import annotations
