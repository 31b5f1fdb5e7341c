"""Ollama's chat and generate requests as vLLM OpenAI requests, checked field by field.

The engine is always asked to stream (with a final usage event): that is what gives the answer's timings, and
``stream: false`` is served by collecting the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from flushgate.proxy.ollama.errors import OllamaError
from flushgate.proxy.ollama.models import ModelChoice
from flushgate.proxy.ollama.options import sampling_fields

Kind = Literal["chat", "generate"]
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
THINK_LEVELS = frozenset({"low", "medium", "high", "max"})


@dataclass(frozen=True, slots=True)
class EngineCall:
    path: str
    body: dict[str, Any]
    stream: bool  # what the client asked for; the engine always streams
    kind: Kind
    model_name: str


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise OllamaError(400, "missing request body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OllamaError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    return body


def requested_model(body: dict[str, Any]) -> str:
    model = body.get("model", body.get("name"))  # "name" is Ollama's deprecated spelling
    if model is None or model == "":
        raise OllamaError(400, "model is required")
    if not isinstance(model, str):
        raise OllamaError(400, "model must be a string")
    return model


def wants_stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise OllamaError(400, "stream must be true or false")
    return stream


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OllamaError(400, f"{name} must be a string")
    return value


def _check_keep_alive(body: dict[str, Any]) -> None:
    # Accepted in any of Ollama's forms and without effect: the engine keeps its one model resident.
    value = body.get("keep_alive")
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise OllamaError(400, 'keep_alive must be a duration such as "5m" or a number of seconds')


def _no_images(images: Any, model: str) -> None:
    if images:
        raise OllamaError(400, f"model '{model}' does not support images: it is served as a text-only model")


def _think(body: dict[str, Any], choice: ModelChoice) -> bool | None:
    value = body.get("think")
    if value is None:
        think = choice.thinking
    elif isinstance(value, bool):
        think = value
    elif isinstance(value, str) and value in THINK_LEVELS:
        think = True  # vLLM's chat templates know on and off; a level means on
    else:
        raise OllamaError(
            400, f'invalid think value: {value!r} (must be true, false, "low", "medium", "high" or "max")'
        )
    if think and not choice.model.thinking:
        raise OllamaError(400, f'"{choice.name}" does not support thinking')
    return think


def _format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise OllamaError(400, f'invalid format {value!r}: expected "json" or a JSON schema object')


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise OllamaError(400, "tools must be an array of tool objects")
    for tool in value:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OllamaError(400, 'each tool needs {"type": "function", "function": {"name": ...}}')
    return [{"type": "function", **{k: v for k, v in tool.items() if k != "type"}} for tool in value]


def _common_fields(body: dict[str, Any], choice: ModelChoice) -> dict[str, Any]:
    _check_keep_alive(body)
    if body.get("logprobs"):
        raise OllamaError(400, "logprobs are not supported by this server")
    fields: dict[str, Any] = {
        "model": choice.model.id,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    fields |= sampling_fields(body.get("options"), choice.model.max_model_len)
    response_format = _format(body.get("format"))
    if response_format is not None:
        fields["response_format"] = response_format
    return fields


def _thinking_fields(body: dict[str, Any], choice: ModelChoice) -> dict[str, Any]:
    think = _think(body, choice)
    return {} if think is None else {"chat_template_kwargs": {"enable_thinking": think}}


def chat_call(body: dict[str, Any], choice: ModelChoice) -> EngineCall | None:
    """The engine request for ``/api/chat``; None when there are no messages (Ollama's "load the model")."""
    stream = wants_stream(body)
    messages = body.get("messages")
    if messages is None or messages == []:
        _common_fields(body, choice)
        return None
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be an array of message objects")
    fields = _common_fields(body, choice) | _thinking_fields(body, choice)
    fields["messages"] = openai_messages(messages, choice.name)
    tools = _tools(body.get("tools"))
    if tools is not None:
        fields["tools"] = tools
    return EngineCall(CHAT_PATH, fields, stream, "chat", choice.name)


def generate_call(body: dict[str, Any], choice: ModelChoice) -> EngineCall | None:
    """The engine request for ``/api/generate``; None for an empty prompt (Ollama's "load the model")."""
    stream = wants_stream(body)
    prompt, system = _string(body, "prompt"), _string(body, "system")
    _no_images(body.get("images"), choice.name)
    if _string(body, "suffix"):
        raise OllamaError(400, "suffix (fill-in-the-middle) is not supported by this server")
    if _string(body, "template"):
        raise OllamaError(400, "template is not supported: the engine renders prompts with the model's own template")
    if body.get("context"):
        raise OllamaError(400, "context is not supported: send the conversation as messages to /api/chat")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise OllamaError(400, "raw must be true or false")
    if not prompt and not system:
        _common_fields(body, choice)
        return None
    fields = _common_fields(body, choice)
    if raw:
        if system:
            raise OllamaError(400, "raw mode does not support template, system, or context")
        return EngineCall(COMPLETIONS_PATH, fields | {"prompt": prompt}, stream, "generate", choice.name)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    fields |= _thinking_fields(body, choice) | {"messages": messages}
    return EngineCall(CHAT_PATH, fields, stream, "generate", choice.name)


def openai_messages(messages: list[Any], model: str) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones: thinking as ``reasoning``, tool calls with ids, tool results linked."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, function name) of the latest assistant tool calls
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OllamaError(400, f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise OllamaError(400, f"messages[{index}].role must be a non-empty string")
        role = role.lower()
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{index}].content must be a string")
        _no_images(message.get("images"), model)
        converted: dict[str, Any] = {"role": role, "content": content}
        thinking = message.get("thinking")
        if role == "assistant" and isinstance(thinking, str) and thinking:
            converted["reasoning"] = thinking
        if role == "assistant" and message.get("tool_calls"):
            converted["tool_calls"] = _openai_tool_calls(message["tool_calls"], index)
            unanswered = [(c["id"], c["function"]["name"]) for c in converted["tool_calls"]]
        if role == "tool":
            converted |= _tool_result_link(message, unanswered, index)
        out.append(converted)
    return out


def _openai_tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise OllamaError(400, f"messages[{index}].tool_calls must be an array")
    converted = []
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OllamaError(400, f"messages[{index}].tool_calls[{n}] needs a function with a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, dict):
            arguments = orjson.dumps(arguments).decode()
        elif not isinstance(arguments, str):
            raise OllamaError(400, f"messages[{index}].tool_calls[{n}].function.arguments must be an object")
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{index}_{n}"
        converted.append(
            {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}
        )
    return converted


def _tool_result_link(message: dict[str, Any], unanswered: list[tuple[str, str]], index: int) -> dict[str, Any]:
    """OpenAI ties a tool result to its call by id; Ollama by the tool's name, or by order."""
    link: dict[str, Any] = {}
    name = message.get("tool_name")
    if name is not None and not isinstance(name, str):
        raise OllamaError(400, f"messages[{index}].tool_name must be a string")
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        match = next((pair for pair in unanswered if name is None or pair[1] == name), None)
        call_id = match[0] if match else f"call_{index}"
        if match:
            unanswered.remove(match)
    link["tool_call_id"] = call_id
    if name:
        link["name"] = name
    return link
