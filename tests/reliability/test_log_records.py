"""Our log records never carry a secret, their tracebacks included.

Found by the eleventh campaign: telemetry's own failures are logged at DEBUG on the
``cmbagent_otel`` logger with ``exc_info=True``, and the exception is often the application's (a
model response whose ``usage`` property raises, a hostile ``__str__``...): its message, quoting a key
(``quota exceeded for key sk-...``), went whole into the log record's traceback. A filter on each of
our loggers (``cmbagent_otel``, ``cmbagent_otel.dag``, ``cmbagent_otel.ingest``) redacts the
formatted traceback and the message of every record emitted.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import pytest
from autogen import ConversableAgent

from cmbagent_otel.testing import ScriptedModelClient
from tests.conftest import client_key

from .conftest import needs_custom_client
from .test_secrets import Sink, assert_clean, instrument, sink  # noqa: F401 (sink: fixture)

pytestmark = pytest.mark.usefixtures("isolated_secrets")
KEY = f"sk-proj-QZ{secrets.token_hex(16)}"


class QuotaResponse:
    """A response whose ``usage`` raises with the key in its message (AG2 reads it through the client)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.cost = 0.0
        self.id = "resp-quota"

    @property
    def usage(self) -> Any:
        raise RuntimeError(f"quota exceeded for key {KEY}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class QuotaClient(ScriptedModelClient):
    def create(self, params: dict[str, Any]) -> Any:
        return QuotaResponse(super().create(params))

    def message_retrieval(self, response: Any) -> list[Any]:
        return super().message_retrieval(response._inner)

    def cost(self, response: Any) -> float:
        return 0.0

    @staticmethod
    def get_usage(response: Any) -> dict[str, Any]:
        return {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost": 0.0, "model": "scripted"}


@needs_custom_client
def test_a_logged_traceback_quoting_a_key_is_redacted(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    instrument(sink)
    assistant = ConversableAgent("assistant", llm_config={"config_list": [
        {"model": "scripted", client_key(): "QuotaClient"}], "cache_seed": None}, human_input_mode="NEVER")
    assistant.register_model_client(QuotaClient, script=["ok"])
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER")
    user.initiate_chat(assistant, message="hi", max_turns=1, silent=True)
    logged = [r for r in caplog.records if r.name == "cmbagent_otel" and r.exc_info]
    assert logged and any("quota exceeded for key" in caplog.handler.format(r) for r in logged)  # still logged
    assert_clean(sink, caplog, KEY[8:])


def test_records_without_a_secret_are_kept_as_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("cmbagent_otel.dag").debug("wrote %d rows to %s", 3, "runs")
    logging.getLogger("cmbagent_otel.ingest").debug("token %s", KEY)
    assert [r.getMessage() for r in caplog.records] == ["wrote 3 rows to runs", "token [REDACTED]"]
