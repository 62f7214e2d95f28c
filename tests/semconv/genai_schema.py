"""JSON Schemas for the GenAI content attributes, written for this project from the definitions of
the OpenTelemetry GenAI semantic conventions (input messages, output messages, system instructions:
a ChatMessage is ``{role, parts, name?}``, an OutputMessage adds ``finish_reason``, parts are typed
objects with the fields each type requires; tool-call arguments and results are any JSON value).

Stricter than the conventions where cmbagent-otel promises more: every part it emits is one of the
part types below (text, tool_call, tool_call_response, uri, or a bare generic part naming only its
type), and roles are the conventions' roles.
"""

from __future__ import annotations

from typing import Any

ROLES = ["system", "user", "assistant", "tool", "function"]
FINISH_REASONS = ["stop", "length", "content_filter", "tool_call", "error"]

_PARTS: dict[str, Any] = {
    "TextPart": {
        "type": "object",
        "properties": {"type": {"const": "text"}, "content": {"type": "string"}},
        "required": ["type", "content"],
    },
    "ToolCallRequestPart": {
        "type": "object",
        "properties": {
            "type": {"const": "tool_call"},
            "id": {"type": ["string", "null"]},
            "name": {"type": "string"},
            "arguments": {},
        },
        "required": ["type", "name"],
    },
    "ToolCallResponsePart": {
        "type": "object",
        "properties": {"type": {"const": "tool_call_response"}, "id": {"type": ["string", "null"]}, "response": {}},
        "required": ["type", "response"],
    },
    "UriPart": {
        "type": "object",
        "properties": {"type": {"const": "uri"}, "modality": {"type": "string"}, "uri": {"type": "string"}},
        "required": ["type", "modality", "uri"],
    },
    "GenericPart": {
        "type": "object",
        "properties": {"type": {"type": "string", "not": {"enum": ["text", "tool_call", "tool_call_response",
                                                                    "uri"]}}},
        "required": ["type"],
        "additionalProperties": False,
    },
}
_PART = {"oneOf": [{"$ref": f"#/$defs/{name}"} for name in _PARTS]}
_CHAT_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ROLES},
        "parts": {"type": "array", "items": _PART},
        "name": {"type": ["string", "null"]},
    },
    "required": ["role", "parts"],
}

INPUT_MESSAGES: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "InputMessages",
    "$defs": {**_PARTS, "ChatMessage": _CHAT_MESSAGE},
    "type": "array",
    "items": {"$ref": "#/$defs/ChatMessage"},
}
OUTPUT_MESSAGES: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "OutputMessages",
    "$defs": {**_PARTS, "OutputMessage": {
        **_CHAT_MESSAGE,
        "properties": {**_CHAT_MESSAGE["properties"], "finish_reason": {"enum": FINISH_REASONS}},
        "required": ["role", "parts", "finish_reason"],
    }},
    "type": "array",
    "items": {"$ref": "#/$defs/OutputMessage"},
}
SYSTEM_INSTRUCTIONS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "SystemInstructions",
    "$defs": dict(_PARTS),
    "type": "array",
    "items": _PART,
}
ANY_JSON: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}

BY_ATTRIBUTE: dict[str, dict[str, Any]] = {
    "gen_ai.input.messages": INPUT_MESSAGES,
    "gen_ai.output.messages": OUTPUT_MESSAGES,
    "gen_ai.system_instructions": SYSTEM_INSTRUCTIONS,
    "gen_ai.tool.call.arguments": ANY_JSON,
    "gen_ai.tool.call.result": ANY_JSON,
}
