"""Credentials of more services never reach telemetry, even when nobody registered them.

The seventh campaign left keys whose shape was not known: GitLab tokens (``glpat-``,
``gldt-``, ``glrt-``...), npm (``npm_``), PyPI (``pypi-AgE…``), SendGrid (``SG.x.y``),
DigitalOcean (``dop_v1_``), Stripe restricted keys (``rk_live_``), Slack app-level tokens
(``xapp-``) and Slack tokens other than ``xoxa/b/p`` (``xoxe-``, ``xoxs-``, ``xoxr-``). A tool's
traceback or a provider's error quoting one put it whole into exception events, statuses,
message content and DB rows. They are redacted by shape now; look-alikes (``work_dir``,
``npm_install``, ``glue-code``, ``SG.1``) are kept.
"""

from __future__ import annotations

import secrets

import pytest

from cmbagent_otel import redaction

from .conftest import needs_custom_client
from .test_credential_forms import assert_refused_call_is_clean
from .test_secrets import Sink, sink  # noqa: F401 (sink: fixture)


def _alnum(n: int) -> str:
    return secrets.token_hex(n)[:n]


def credentials() -> dict[str, str]:
    """A fresh credential of each shape."""
    return {
        "gitlab personal": "glpat-" + _alnum(20), "gitlab deploy": "gldt-" + _alnum(24),
        "gitlab runner": "glrt-" + _alnum(20), "npm": "npm_" + _alnum(36),
        "pypi": "pypi-AgEIcHlwaS5vcmc" + _alnum(70), "sendgrid": f"SG.{_alnum(22)}.{_alnum(43)}",
        "digitalocean": "dop_v1_" + _alnum(64), "stripe restricted": "rk_live_" + _alnum(24),
        "slack app": f"xapp-1-A0{_alnum(10)}-{_alnum(30)}", "slack refresh": "xoxe-1-" + _alnum(40),
        "slack session": "xoxs-" + _alnum(30),
    }


def test_the_shapes_are_redacted() -> None:
    for name, value in credentials().items():
        for text in (f"rejected: {value} (retry)", f"token={value}"[6:], f'{{"k": "{value}"}}', value):
            redacted = redaction.redact(text)
            assert redacted is not None
            assert value not in redacted and value[len(value) // 2:] not in redacted, (name, redacted)
            assert redaction.REDACTED in redacted


LOOK_ALIKES = [
    "work_dir = os.path.join(base_dir, 'step-3'); npm_install done",
    "use glue-code and gl-matrix-2.8.1 for the plot", "SG.1 holds, see section SG.2.3",
    "rk_live_ok", "the npm_ config", "xapp-beta is out", "dop_v1_ is a prefix",
    "pypi-AgE", "A KIA car, ASIA region", "xoxo-gossip-girl-fan-club",
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_kept(text: str) -> None:
    assert redaction.redact(text) == text


def test_a_shape_split_across_two_texts_is_caught() -> None:
    key = "npm_" + _alnum(36)
    first, second = f"the token is {key[:17]}", f"{key[17:]} and that is all"
    redaction.learn_split_secrets([first, second])
    assert key[:17] not in str(redaction.redact(first))
    assert key[17:] not in str(redaction.redact(second))


@needs_custom_client
def test_unregistered_service_credentials_never_reach_telemetry(sink: Sink,  # noqa: F811
                                                                caplog: pytest.LogCaptureFixture) -> None:
    assert_refused_call_is_clean(sink, caplog, {name: (f"{name}: {value}", value)
                                                for name, value in credentials().items()})
