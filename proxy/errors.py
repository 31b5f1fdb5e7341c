"""Every error the gateway itself produces, shaped in one place as the client's API expects it."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from flushgate.proxy.headers import StreamKind


def error_payload(message: str, type_: str, code: str) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "server_error",
    code: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped JSON error: ``{"error": {"message", "type", "param", "code"}}``."""
    return web.Response(
        status=status,
        body=orjson.dumps(error_payload(message, type_, code)),
        content_type="application/json",
        headers=headers,
    )


def terminal_event(kind: StreamKind, message: str, code: str) -> bytes:
    """The last event of a stream that could not finish, so no client mistakes it for a complete answer."""
    body = orjson.dumps(error_payload(message, "server_error", code))
    if kind == "sse":
        return b"data: " + body + b"\n\n"
    return body + b"\n"
