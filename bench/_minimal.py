"""The ``minimal`` variant of ``bench_overhead.py``: a lower bound for our own code per span.

It emits, for the group workload (``_workload.build_chat``, content capture off), the same spans as
``cmbagent_otel.instrument()``: same names, kinds, parents, statuses, attributes (same keys, same
order, same values but for the fresh ids) and handoff events; ``bench/span_snapshot.py --variant
minimal --workloads group --content off`` compares it with a snapshot of ours. Unlike ``sdk_floor``
(ours' attribute values copied from a recorded chat: the SDK's share alone), it computes every
value from the chat as it runs, with the least Python that can: one plain function per wrapped AG2
method (as ours and the floor patch them: no wrapt proxy), spans started as ours starts them
(``start_span`` with the context read once, one new ``Context`` attached; the floor goes through
``start_as_current_span``, whose ``use_span`` and ``contextlib`` layers ours and this skip), attributes
written inline into one dict literal per span, and no registry but what the
DAG attributes need: the session id, per conversation its id, execution order, node names and
numbering, and a stack of open agent turns (their node, depth and whether speakers under them are
DAG nodes).

What it leaves out, so that it is a bound and not a product: anything this workload's output does
not show. No content capture, secrets redaction or bounds on the model's text, no metrics, no
suppression, sampling shortcut or error status of its own, no guard around the telemetry (an
exception in it breaks the app), a plain list as the stack (one thread, no async, no context
handed to threads or subprocesses), the provider read as this workload's custom client, no
workflow, cmbagent, nested-chat, human-input or code-execution spans. ``(minimal - sdk_floor) /
spans`` is then the least own code any instrumentation emitting ours' output here can have.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any


class _Conversation:
    """Per conversation: its id, the execution order, and per DAG node its children's count."""

    __slots__ = ("children", "id", "names", "order")

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.order = 0
        self.children: dict[str, int] = {}
        self.names: dict[tuple[str, str], int] = {}


def install(provider: Any) -> Callable[[], None]:
    """Patch AG2 with the minimal wrappers emitting into ``provider``; returns what undoes it."""
    from autogen.agentchat import conversable_agent, groupchat
    from autogen.oai import client as oai_client
    from opentelemetry.context import Context, attach, detach, get_current
    from opentelemetry.trace import SpanKind, get_current_span
    from opentelemetry.trace.propagation import _SPAN_KEY

    start_span = provider.get_tracer("minimal").start_span
    copy = dict.copy
    session = uuid.uuid4().hex
    manager_cls = groupchat.GroupChatManager
    client_kind, internal = SpanKind.CLIENT, SpanKind.INTERNAL
    # open turns, innermost last: (conversation, DAG node, its order index, its DAG depth, event depth
    # of what starts under it, whether a turn under it is a speaker's, i.e. a DAG node of its own)
    stack: list[tuple[_Conversation, str, int, int, int, bool]] = []
    agent = conversable_agent.ConversableAgent
    originals = {(owner, attr): vars(owner)[attr] for owner, attr in (
        (agent, "initiate_chat"), (agent, "generate_reply"), (agent, "execute_function"),
        (oai_client.OpenAIWrapper, "create"), (groupchat.GroupChat, "select_speaker"))}
    initiate_chat = originals[agent, "initiate_chat"]
    generate_reply = originals[agent, "generate_reply"]
    execute_function = originals[agent, "execute_function"]
    create = originals[oai_client.OpenAIWrapper, "create"]
    select_speaker = originals[groupchat.GroupChat, "select_speaker"]

    def conversation(self: Any, recipient: Any, *args: Any, **kwargs: Any) -> Any:
        c = _Conversation()
        c.order = 1
        node = "conversation_1"  # a conversation outside any other: the run's first node of its trace
        attrs = {"cmbagent.span.kind": "conversation", "cmbagent.execution_order": 1,
                 "cmbagent.session.id": session, "session.id": session, "gen_ai.conversation.id": c.id,
                 "cmbagent.dag.node": node, "cmbagent.dag.node_type": "agent", "cmbagent.dag.depth": 0,
                 "cmbagent.dag.order_index": 1001, "gen_ai.agent.name": recipient.name,
                 "cmbagent.conversation.initiator": self.name, "cmbagent.conversation.recipient": recipient.name}
        max_turns = kwargs.get("max_turns")
        if max_turns is not None:
            attrs["cmbagent.conversation.max_turns"] = max_turns
        ctx = get_current()
        span = start_span(f"conversation {recipient.name}", ctx, internal, attrs)
        values = copy(ctx)
        values[_SPAN_KEY] = span
        token = attach(Context(values))
        stack.append((c, node, 1001, 0, 0, False))
        try:
            result = initiate_chat(self, recipient, *args, **kwargs)
            span.set_attributes({
                "cmbagent.conversation.chat_count": len(result.chat_history),
                "cmbagent.llm.cost_usd": float(result.cost["usage_including_cached_inference"]["total_cost"])})
            return result
        finally:
            stack.pop()
            span.end()
            detach(token)

    def turn(self: Any, messages: Any = None, sender: Any = None, **kwargs: Any) -> Any:
        c, node, index, depth, event_depth, speakers = stack[-1]
        c.order += 1
        name = self.name
        attrs = {"cmbagent.span.kind": "agent", "cmbagent.execution_order": c.order,
                 "cmbagent.session.id": session, "session.id": session, "gen_ai.conversation.id": c.id}
        if speakers:  # a speaker's turn in a group chat: a DAG node under the conversation's
            key = (node, name)
            seen = c.names[key] = c.names.get(key, 0) + 1
            child = f"{node}_{name}" if seen == 1 else f"{node}_{name}_{seen}"
            number = c.children[node] = c.children.get(node, 0) + 1
            attrs["cmbagent.dag.node"] = child
            attrs["cmbagent.dag.node_type"] = "sub_agent"
            attrs["cmbagent.dag.depth"] = depth + 1
            attrs["cmbagent.dag.parent_node"] = node
            attrs["cmbagent.dag.order_index"] = index = index * 1000 + number
            frame = (c, child, index, depth + 1, 0, False)
        else:
            attrs["cmbagent.dag.node"] = node
            attrs["cmbagent.event.depth"] = event_depth
            frame = (c, node, index, depth, event_depth + 1, type(self) is manager_cls)
        attrs["gen_ai.operation.name"] = "invoke_agent"
        attrs["gen_ai.agent.name"] = name
        client = self.client
        if client is not None:
            first = client._config_list[0]
            attrs["gen_ai.provider.name"] = "ag2.custom_client"
            attrs["gen_ai.request.model"] = first["model"]
        if sender is not None:
            attrs["cmbagent.agent.sender"] = sender.name
        ctx = get_current()
        span = start_span(f"invoke_agent {name}", ctx, internal, attrs)
        values = copy(ctx)
        values[_SPAN_KEY] = span
        token = attach(Context(values))
        stack.append(frame)
        try:
            return generate_reply(self, messages, sender, **kwargs)
        finally:
            stack.pop()
            span.end()
            detach(token)

    def model_call(self: Any, **config: Any) -> Any:
        c, node, _, _, event_depth, _ = stack[-1]
        c.order += 1
        model = config.get("model") or self._config_list[0]["model"]
        attrs = {"cmbagent.span.kind": "llm", "cmbagent.execution_order": c.order,
                 "cmbagent.session.id": session, "session.id": session, "gen_ai.conversation.id": c.id,
                 "cmbagent.dag.node": node, "cmbagent.event.depth": event_depth, "gen_ai.operation.name": "chat",
                 "gen_ai.provider.name": "ag2.custom_client", "gen_ai.system": "ag2.custom_client",
                 "gen_ai.request.model": model, "gen_ai.agent.name": config["agent"].name}
        ctx = get_current()
        span = start_span(f"chat {model}", ctx, client_kind, attrs)
        values = copy(ctx)
        values[_SPAN_KEY] = span
        token = attach(Context(values))
        try:
            response = create(self, **config)
            usage = response.usage
            span.set_attributes({
                "gen_ai.response.model": response.model, "gen_ai.response.id": response.id,
                "gen_ai.usage.input_tokens": usage.prompt_tokens, "gen_ai.usage.output_tokens": usage.completion_tokens,
                "cmbagent.llm.cost_usd": response.cost,
                "gen_ai.response.finish_reasons": [choice.finish_reason for choice in response.choices]})
            return response
        finally:
            span.end()
            detach(token)

    def tool(self: Any, func_call: Any, call_id: Any = None, *args: Any, **kwargs: Any) -> Any:
        c, node, _, _, event_depth, _ = stack[-1]
        c.order += 1
        name = func_call["name"]
        attrs = {"cmbagent.span.kind": "tool", "cmbagent.execution_order": c.order,
                 "cmbagent.session.id": session, "session.id": session, "gen_ai.conversation.id": c.id,
                 "cmbagent.dag.node": node, "cmbagent.event.depth": event_depth,
                 "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.type": "function",
                 "gen_ai.agent.name": self.name, "gen_ai.tool.call.id": call_id}
        ctx = get_current()
        span = start_span(f"execute_tool {name}", ctx, internal, attrs)
        values = copy(ctx)
        values[_SPAN_KEY] = span
        token = attach(Context(values))
        try:
            return execute_function(self, func_call, call_id, *args, **kwargs)
        finally:
            span.end()
            detach(token)

    def selection(self: Any, last_speaker: Any, selector: Any) -> Any:
        frame = stack[-1]
        c = frame[0]
        c.order += 1
        order = c.order
        chosen = select_speaker(self, last_speaker, selector)
        get_current_span().add_event("cmbagent.handoff", {
            "cmbagent.handoff.from": last_speaker.name,
            "cmbagent.handoff.reason": self.speaker_selection_method.__name__,
            "cmbagent.handoff.candidates": [a.name for a in self.agents], "cmbagent.handoff.to": chosen.name,
            "cmbagent.span.kind": "speaker_selection", "cmbagent.execution_order": order,
            "cmbagent.event.depth": frame[4]})
        return chosen

    for (owner, attr), patched in zip(originals, (conversation, turn, tool, model_call, selection), strict=True):
        setattr(owner, attr, patched)

    def uninstall() -> None:
        for (owner, attr), original in originals.items():
            setattr(owner, attr, original)

    return uninstall
