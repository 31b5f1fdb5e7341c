"""One engine event at a time: the text it adds, and what the final Ollama line will need from it.

Text (answer and thinking) is handed on at once and never kept. Tool calls are the exception: vLLM streams their
arguments as fragments of a JSON string, while Ollama sends each call whole with its arguments as an object, so
the fragments are joined until the engine finishes the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


class EngineStreamError(Exception):
    """The engine reported an error inside its stream, or sent an event that cannot be read."""


@dataclass(slots=True)
class _ToolCallParts:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


# vLLM's finish reasons as Ollama's done_reason; a tool call ends Ollama's message with "stop".
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}


class EngineEvents:
    """The state of one engine stream (chat or completions events)."""

    __slots__ = ("_tool_calls", "completion_tokens", "finish_reason", "first_token_ns", "prompt_tokens")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.first_token_ns = 0
        self._tool_calls: dict[int, _ToolCallParts] = {}

    def read(self, data: bytes, stamp_ns: int) -> tuple[str, str]:
        """The (answer text, thinking text) this event adds; both empty for events that add none."""
        try:
            return self._read(data, stamp_ns)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:  # JSON of the wrong shape
            raise EngineStreamError(
                f"the engine sent an event of an unexpected shape ({exc}): {data[:200]!r}"
            ) from None

    def _read(self, data: bytes, stamp_ns: int) -> tuple[str, str]:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise EngineStreamError(f"the engine sent an event that is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise EngineStreamError(f"the engine sent an event that is not an object: {data[:200]!r}")
        if "error" in event or event.get("object") == "error":
            raise EngineStreamError(_error_text(event))
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
        choices = event.get("choices")
        if not choices:
            return "", ""
        choice = choices[0]
        finish = choice.get("finish_reason")
        if finish:
            self.finish_reason = finish
        delta = choice.get("delta")
        if delta is None:  # a completions event
            text = choice.get("text") or ""
            if text and not self.first_token_ns:
                self.first_token_ns = stamp_ns
            return text, ""
        content = delta.get("content") or ""
        # "reasoning" since vLLM 0.10; "reasoning_content" before.
        thinking = delta.get("reasoning") or delta.get("reasoning_content") or ""
        calls = delta.get("tool_calls")
        if calls:
            self._add_tool_call_parts(calls)
        if (content or thinking or calls) and not self.first_token_ns:
            self.first_token_ns = stamp_ns
        return content, thinking

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._tool_calls)

    def take_tool_calls(self) -> list[dict[str, Any]]:
        """The finished tool calls in Ollama's shape (arguments as an object), once the message is complete."""
        calls = []
        for index in sorted(self._tool_calls):
            parts = self._tool_calls[index]
            raw = "".join(parts.arguments) or "{}"
            try:
                arguments = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise EngineStreamError(
                    f"the model's call of {parts.name!r} has arguments that are not JSON: {raw!r}"
                ) from None
            if not isinstance(arguments, dict):
                raise EngineStreamError(f"the model's call of {parts.name!r} has arguments that are not an object")
            call: dict[str, Any] = {"function": {"index": index, "name": parts.name, "arguments": arguments}}
            if parts.id:
                call["id"] = parts.id
            calls.append(call)
        self._tool_calls.clear()
        return calls

    @property
    def done_reason(self) -> str:
        reason = self.finish_reason or "stop"
        return DONE_REASONS.get(reason, reason)

    def _add_tool_call_parts(self, calls: list[dict[str, Any]]) -> None:
        for position, call in enumerate(calls):
            index = call.get("index", position)
            parts = self._tool_calls.setdefault(index, _ToolCallParts())
            if call.get("id"):
                parts.id = call["id"]
            function = call.get("function") or {}
            if function.get("name"):
                parts.name += function["name"]
            if function.get("arguments"):
                parts.arguments.append(function["arguments"])


def _error_text(event: dict[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return str(event.get("message") or "the engine reported an error")
