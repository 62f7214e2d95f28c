"""Offline model backends for demos, tests and benchmarks (no API key, no network).

* :class:`ScriptedModelClient`: an AG2 ``ModelClient`` (``model_client_cls``) that answers
  from a script, so the real ``OpenAIWrapper.create`` path runs without a provider.
* :class:`FakeOpenAIServer`: an OpenAI-compatible ``/v1/chat/completions`` server on
  127.0.0.1, so the real ``openai`` client path runs too.

A script item is a string (assistant text), or a dict ``{"tool_calls": [{"name": ...,
"arguments": {...}}]}`` for a tool call. When the script is exhausted the client answers
``default`` (``"TERMINATE"``).
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from ._forksafe import reset_in_child

Responder = Callable[[list[dict[str, Any]]], "str | dict[str, Any]"]
#: Answers from the whole chat-completions request body (messages, tools, response_format...).
RequestResponder = Callable[[dict[str, Any]], "str | dict[str, Any]"]
#: Answers with raw HTTP: (request body, request headers) -> (status, response headers, body bytes).
RawResponder = Callable[[dict[str, Any], dict[str, str]], "tuple[int, dict[str, str], bytes]"]

_ids = itertools.count(1)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _message(item: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(item, str):
        return {"role": "assistant", "content": item}
    calls = []
    for call in item.get("tool_calls", []):
        arguments = call.get("arguments", {})
        calls.append({
            # one width for every id: a count from the message holding it (the usage below) must not change
            # with how many calls the process made before (call_9 then call_10 added a token)
            "id": call.get("id") or f"call_{next(_ids):06d}",
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            },
        })
    return {"role": "assistant", "content": item.get("content"), "tool_calls": calls or None}


class _Script:
    """Thread-safe iterator over a script, falling back to ``default`` when exhausted."""

    def __init__(self, script: Iterable[str | dict[str, Any]] | None, responder: Responder | None, default: str):
        self._items = iter(script or ())
        self._responder = responder
        self._default = default
        self._lock = threading.Lock()
        reset_in_child(self, "_lock")

    def next(self, messages: list[dict[str, Any]]) -> str | dict[str, Any]:
        if self._responder is not None:
            return self._responder(messages)
        with self._lock:
            return next(self._items, self._default)


class ScriptedModelClient:
    """AG2 ``ModelClient`` answering from a script.

    Use ``{"model": "scripted", "model_client_cls": "ScriptedModelClient"}`` in the
    config list, then ``agent.register_model_client(ScriptedModelClient, script=[...])``.
    ``price_per_1k`` sets the reported cost (USD per 1000 tokens).
    """

    def __init__(
        self,
        config: dict[str, Any],
        script: Iterable[str | dict[str, Any]] | None = None,
        responder: Responder | None = None,
        default: str = "TERMINATE",
        price_per_1k: float = 0.002,
        **_: Any,
    ) -> None:
        self.model = str(config.get("model", "scripted"))
        self._script = _Script(script, responder, default)
        self._price = price_per_1k

    def create(self, params: dict[str, Any]) -> SimpleNamespace:
        messages = list(params.get("messages") or [])
        item = self._script.next(messages)
        message = _message(item)
        prompt_tokens = sum(_tokens(str(m.get("content") or "")) for m in messages)
        completion_tokens = _tokens(json.dumps(message))
        tool_calls = None
        if message.get("tool_calls"):
            tool_calls = [
                SimpleNamespace(id=c["id"], type="function",
                                function=SimpleNamespace(name=c["function"]["name"],
                                                         arguments=c["function"]["arguments"]))
                for c in message["tool_calls"]
            ]
        choice = SimpleNamespace(
            index=0,
            finish_reason="tool_calls" if tool_calls else "stop",
            message=SimpleNamespace(role="assistant", content=message.get("content"), tool_calls=tool_calls,
                                    function_call=None, _raw=message),
        )
        return SimpleNamespace(
            id=f"chatcmpl-scripted{next(_ids)}",  # OpenAI's form, as the tool call ids (call_N)
            model=self.model,
            choices=[choice],
            usage=SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens),
            cost=(prompt_tokens + completion_tokens) * self._price / 1000,
        )

    def message_retrieval(self, response: SimpleNamespace) -> list[str | dict[str, Any]]:
        out: list[str | dict[str, Any]] = []
        for choice in response.choices:
            raw = choice.message._raw
            out.append(raw if raw.get("tool_calls") else (raw.get("content") or ""))
        return out

    def cost(self, response: SimpleNamespace) -> float:
        return float(response.cost)

    @staticmethod
    def get_usage(response: SimpleNamespace) -> dict[str, Any]:
        return {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "total_tokens": response.usage.total_tokens,
            "cost": response.cost,
            "model": response.model,
        }


def scripted_llm_config(model: str = "scripted") -> dict[str, Any]:
    """An ``llm_config`` selecting :class:`ScriptedModelClient` (register it on the agent)."""
    return {"config_list": [{"model": model, "model_client_cls": "ScriptedModelClient"}], "cache_seed": None}


class FakeOpenAIServer:
    """OpenAI-compatible chat completions server on 127.0.0.1 (an ephemeral port).

    ``with FakeOpenAIServer(script=[...]) as server:`` then use ``server.base_url`` and
    any api key in ``llm_config``. ``server.requests`` keeps the received request bodies
    and headers for assertions. ``request_responder`` answers from the whole request body
    (which agent asks can be told from its system prompt, tools or response_format); it
    takes precedence over ``script``/``responder`` and the API-key routes. ``raw_responder``
    (a hostile server in tests: any status, headers and body bytes) takes precedence over all.
    """

    def __init__(
        self,
        script: Iterable[str | dict[str, Any]] | None = None,
        responder: Responder | None = None,
        default: str = "TERMINATE",
        status: int = 200,
        request_responder: RequestResponder | None = None,
        raw_responder: RawResponder | None = None,
    ) -> None:
        self._raw_responder = raw_responder
        self._script = _Script(script, responder, default)
        self._request_responder = request_responder
        self._default = default
        self._routes: dict[str, _Script] = {}
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                owner.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if owner._raw_responder is not None:
                    status, headers, data = owner._raw_responder(body, dict(self.headers))
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if owner.status != 200:
                    payload = {"error": {"message": "fake failure", "type": "server_error", "code": owner.status}}
                    self._send(owner.status, payload)
                    return
                messages = body.get("messages") or []
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                if owner._request_responder is not None:
                    try:
                        message = _message(owner._request_responder(body))
                    except Exception as exc:  # the scenario's own error: make the client see it
                        self._send(500, {"error": {"message": f"responder failed: {exc!r}", "type": "server_error"}})
                        return
                else:
                    script = owner._routes.get(token, owner._script)
                    message = _message(script.next(messages))
                prompt_tokens = sum(_tokens(str(m.get("content") or "")) for m in messages)
                completion_tokens = _tokens(json.dumps(message))
                if message.get("tool_calls") is None:
                    message.pop("tool_calls", None)
                self._send(200, {
                    "id": f"chatcmpl-{next(_ids)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "fake"),
                    "choices": [{
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                    }],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def route(self, api_key: str, script: Iterable[str | dict[str, Any]]) -> None:
        """Answer requests made with ``api_key`` from ``script`` (one script per agent)."""
        self._routes[api_key] = _Script(script, None, self._default)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- one offline agent factory for every AG2 line ----------------------------------------------
_shared_server: FakeOpenAIServer | None = None
_shared_lock = threading.Lock()
reset_in_child(sys.modules[__name__], "_shared_lock")  # a forked child must not find it held


def offline_backend() -> str:
    """``client`` (ScriptedModelClient) where the AG2 line accepts custom model clients in
    ``llm_config`` (ag2 0.14), else ``server`` (the loopback FakeOpenAIServer: cmbagent_autogen
    validates config entries strictly). ``CMBAGENT_OTEL_OFFLINE_BACKEND`` forces one."""
    from . import environment_variables

    forced = environment_variables.get(environment_variables.OFFLINE_BACKEND)
    if forced is not None:
        return str(forced)
    return _probed_backend()


@functools.lru_cache(maxsize=1)
def _probed_backend() -> str:
    try:
        from autogen import ConversableAgent

        ConversableAgent("backend_probe", llm_config=scripted_llm_config(), human_input_mode="NEVER")
        return "client"
    except Exception:
        return "server"


def shared_server() -> FakeOpenAIServer:
    """A process-wide FakeOpenAIServer, started on first use."""
    global _shared_server
    with _shared_lock:
        if _shared_server is None:
            _shared_server = FakeOpenAIServer().start()
        return _shared_server


def offline_agent(name: str, script: Iterable[str | dict[str, Any]], **kwargs: Any) -> Any:
    """A ``ConversableAgent`` whose model answers from ``script``, on any AG2 line."""
    from autogen import ConversableAgent

    kwargs.setdefault("human_input_mode", "NEVER")
    if offline_backend() == "client":
        agent = ConversableAgent(name, llm_config=scripted_llm_config(), **kwargs)
    else:
        server = shared_server()
        key = f"offline-{name}-{next(_ids)}"
        config = {"model": "scripted", "api_key": key, "base_url": server.base_url}
        agent = ConversableAgent(name, llm_config={"config_list": [config], "cache_seed": None}, **kwargs)
        agent._offline_api_key = key
    activate(agent, script)
    return agent


def activate(agent: Any, script: Iterable[str | dict[str, Any]]) -> None:
    """(Re)attach ``script`` to ``agent``'s model; needed again after registering a tool,
    which rebuilds the agent's model client."""
    if offline_backend() == "client":
        agent.register_model_client(ScriptedModelClient, script=list(script))
        return
    shared_server().route(agent._offline_api_key, list(script))


class ExitingConsole:
    """An AG2 IOStream whose human types ``exit`` at every prompt and sees nothing printed."""

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", flush: bool = False) -> None:
        pass

    def send(self, message: Any) -> None:
        pass

    def input(self, prompt: str = "", *, password: bool = False) -> str:
        return "exit"
