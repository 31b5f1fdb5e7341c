"""The affinity key of a request: what stays the same across the turns of one conversation.

A chat's later turns resend every earlier message, so the messages up to and including the first user message
are the same in every turn, and differ between conversations that share only a system prompt. Sending every
turn to the engine picked by that key is what lets vLLM's prefix cache skip the prefill of the earlier turns.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

PROMPT_PREFIX_CHARS = 256  # /v1/completions: a prompt is keyed by its start


def affinity_key(body: bytes) -> int | None:
    """A 64-bit key from a JSON request body, or None when it names no conversation (or is not JSON)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return affinity_key_of(doc)


def affinity_key_of(doc: Any) -> int | None:
    """The same key from a request already parsed (the Ollama routes build theirs as a dict)."""
    if not isinstance(doc, dict):
        return None
    material = _leading_messages(doc.get("messages"))
    if material is None:
        material = _prompt_start(doc.get("prompt"))
    if material is None:
        return None
    model = doc.get("model")
    named = model.encode() if isinstance(model, str) else b""
    return int.from_bytes(blake2b(named + b"\0" + material, digest_size=8).digest(), "big")


def _leading_messages(messages: Any) -> bytes | None:
    if not isinstance(messages, list) or not messages:
        return None
    leading = []
    for message in messages:
        leading.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    return orjson.dumps(leading, option=orjson.OPT_SORT_KEYS)


def _prompt_start(prompt: Any) -> bytes | None:
    if isinstance(prompt, str) and prompt:
        return prompt[:PROMPT_PREFIX_CHARS].encode()
    if isinstance(prompt, list) and prompt:
        return orjson.dumps(prompt[:PROMPT_PREFIX_CHARS])
    return None
