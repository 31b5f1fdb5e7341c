"""Ollama's response objects: one per NDJSON line, the final one with counts and measured durations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from time import perf_counter_ns
from typing import Any, Literal

import orjson

from flushgate.proxy.ollama.events import EngineEvents

Kind = Literal["chat", "generate"]


def created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class AnswerClock:
    """When each phase of one answer ended, in ``perf_counter_ns`` nanoseconds, as seen by the gateway.

    ``headers``: the engine accepted the request (vLLM answers with headers once the prompt is rendered and
    tokenized and the request is queued). ``first_token``: the first event with generated text. ``generated``:
    the engine reported the end of generation (its usage event, else its ``[DONE]``).
    """

    start: int
    headers: int = 0
    generated: int = 0

    def mark_headers(self) -> None:
        self.headers = perf_counter_ns()

    def metrics(self, events: EngineEvents) -> dict[str, int]:
        """Ollama's counts and durations; a duration the engine gave no events for is left out, never zero."""
        end = perf_counter_ns()
        generated = self.generated or end
        first = events.first_token_ns
        out = {"total_duration": end - self.start, "load_duration": self.headers - self.start}
        if events.prompt_tokens is not None:
            out["prompt_eval_count"] = events.prompt_tokens
        out["prompt_eval_duration"] = (first or generated) - self.headers
        if events.completion_tokens is not None:
            out["eval_count"] = events.completion_tokens
        if first:
            out["eval_duration"] = generated - first
        return {k: v for k, v in out.items() if v > 0 or k.endswith("_count")}


def _message(content: str, thinking: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def text_line(kind: Kind, model: str, content: str, thinking: str) -> bytes:
    if kind == "chat":
        obj: dict[str, Any] = {"model": model, "created_at": created_at(), "message": _message(content, thinking)}
    else:
        obj = {"model": model, "created_at": created_at(), "response": content}
        if thinking:
            obj["thinking"] = thinking
    obj["done"] = False
    return orjson.dumps(obj) + b"\n"


def tool_calls_line(kind: Kind, model: str, tool_calls: list[dict[str, Any]]) -> bytes:
    if kind == "chat":
        obj: dict[str, Any] = {"model": model, "created_at": created_at(), "message": _message("", "", tool_calls)}
    else:
        obj = {"model": model, "created_at": created_at(), "response": "", "tool_calls": tool_calls}
    obj["done"] = False
    return orjson.dumps(obj) + b"\n"


def final_object(
    kind: Kind,
    model: str,
    events: EngineEvents,
    clock: AnswerClock,
    content: str = "",
    thinking: str = "",
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The last object: the whole answer when not streamed (empty text when streamed), plus the metrics."""
    if kind == "chat":
        obj: dict[str, Any] = {
            "model": model,
            "created_at": created_at(),
            "message": _message(content, thinking, tool_calls),
        }
    else:
        obj = {"model": model, "created_at": created_at(), "response": content}
        if thinking:
            obj["thinking"] = thinking
        if tool_calls:
            obj["tool_calls"] = tool_calls
    obj["done"] = True
    obj["done_reason"] = events.done_reason
    obj |= clock.metrics(events)
    return obj


def load_object(kind: Kind, model: str) -> dict[str, Any]:
    """Ollama's answer to a request without a prompt: the model is loaded (here: always resident)."""
    obj: dict[str, Any] = {"model": model, "created_at": created_at()}
    if kind == "chat":
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    return obj | {"done": True, "done_reason": "load"}
