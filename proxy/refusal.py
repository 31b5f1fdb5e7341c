"""A request the gateway turns away before it reaches a handler, answered in the shape its API uses.

Ollama's routes (``/api/...``) answer ``{"error": "message"}``; everything else answers OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from flushgate.proxy.errors import error_payload
from flushgate.proxy.state import GATEWAY


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def refusal_body(path: str, message: str, *, code: str, type_: str = "invalid_request_error") -> bytes:
    """The JSON body of a refusal on ``path``: Ollama's shape on its routes, OpenAI's everywhere else."""
    if is_ollama_path(path):
        return orjson.dumps({"error": message})
    return orjson.dumps(error_payload(message, type_, code))


def refuse(
    request: web.Request,
    status: int,
    message: str,
    *,
    code: str,
    type_: str = "invalid_request_error",
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The refusal, logged once as a ``refused`` event so an operator sees who was turned away and why."""
    request.app[GATEWAY].log.info(
        "refused", status=status, code=code, method=request.method, path=request.path, remote=request.remote
    )
    body = refusal_body(request.path, message, code=code, type_=type_)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
