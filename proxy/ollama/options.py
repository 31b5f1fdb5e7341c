"""Ollama's ``options`` object as vLLM sampling parameters.

Every option Ollama documents is accepted. Those with a vLLM counterpart are translated; those that only steer
llama.cpp (threads, GPU layers, mmap, mirostat, ...) are accepted and have no effect, so clients that always
send them keep working. A name Ollama does not know, or a value of the wrong type, is a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flushgate.proxy.ollama.errors import OllamaError

# Ollama option -> vLLM request field.
TRANSLATED: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "number"),
    "top_p": ("top_p", "number"),
    "top_k": ("top_k", "integer"),
    "min_p": ("min_p", "number"),
    "seed": ("seed", "integer"),
    "repeat_penalty": ("repetition_penalty", "number"),
    "presence_penalty": ("presence_penalty", "number"),
    "frequency_penalty": ("frequency_penalty", "number"),
}

# Options of llama.cpp's runner with no vLLM meaning: accepted, type-checked, without effect.
WITHOUT_EFFECT: dict[str, str] = {
    "num_keep": "integer",
    "typical_p": "number",
    "repeat_last_n": "integer",
    "tfs_z": "number",
    "mirostat": "integer",
    "mirostat_tau": "number",
    "mirostat_eta": "number",
    "penalize_newline": "boolean",
    "numa": "boolean",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "low_vram": "boolean",
    "f16_kv": "boolean",
    "logits_all": "boolean",
    "vocab_only": "boolean",
    "use_mmap": "boolean",
    "use_mlock": "boolean",
    "embedding_only": "boolean",
    "num_thread": "integer",
    "draft_num_predict": "integer",
}


def _integer(name: str, value: Any) -> int:
    # Ollama decodes JSON numbers as float64 and truncates them for integer options.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OllamaError(400, f'option "{name}" must be of type integer')
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OllamaError(400, f'option "{name}" must be of type number')
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OllamaError(400, f'option "{name}" must be of type boolean')
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {"integer": _integer, "number": _number, "boolean": _boolean}


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise OllamaError(400, 'option "stop" must be a string or an array of strings')


def sampling_fields(options: Any, context_length: int | None) -> dict[str, Any]:
    """The vLLM request fields for an Ollama ``options`` object (which may be absent)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:  # as Ollama: a null option keeps its default
            continue
        if name in TRANSLATED:
            target, kind = TRANSLATED[name]
            fields[target] = _CHECKS[kind](name, value)
        elif name == "num_predict":
            limit = _integer(name, value)
            if limit >= 0:  # -1 (unlimited) and -2 (fill the context) are vLLM's default: up to the context
                fields["max_tokens"] = limit
        elif name == "stop":
            fields["stop"] = _stop(value)
        elif name == "num_ctx":
            wanted = _integer(name, value)
            if context_length is not None and wanted > context_length:
                raise OllamaError(
                    400,
                    f"num_ctx {wanted} is larger than the engine's context length of {context_length} tokens; "
                    "the context is fixed when the engine starts",
                )
        elif name in WITHOUT_EFFECT:
            _CHECKS[WITHOUT_EFFECT[name]](name, value)
        else:
            raise OllamaError(400, f"unsupported option {name!r}")
    return fields
