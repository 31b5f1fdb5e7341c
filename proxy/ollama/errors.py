"""Errors in Ollama's own shape: ``{"error": "message"}`` with the HTTP status Ollama would use."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


class OllamaError(Exception):
    """A request that cannot be served; raised anywhere in the translation, answered by the route handler."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def ollama_error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json", headers=headers
    )


def error_line(message: str) -> bytes:
    """The last line of an NDJSON stream that could not finish; Ollama's clients raise it as an error."""
    return orjson.dumps({"error": message}) + b"\n"


def engine_error_message(body: bytes) -> str:
    """The message inside an error the engine sent (OpenAI's or vLLM's older shape), else the body as text."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text or "the engine answered with an empty error"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(payload.get("message"), str):
            return str(payload["message"])
        if isinstance(payload.get("detail"), str):  # FastAPI's own errors, e.g. a route the engine lacks
            return str(payload["detail"])
    return body.decode("utf-8", "replace")
