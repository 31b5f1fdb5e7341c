"""Which of the engine's routes the gateway forwards: inference and listing, nothing that changes the engine.

vLLM's server also carries routes that load and unload LoRA adapters, reset caches, put the engine to sleep,
profile it, run RPCs on its workers, pause it or swap its weights. A client of the gateway must never reach
those, so forwarding is an allowlist, checked on the decoded path exactly as the engine will route it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from flushgate.proxy.refusal import refuse

# From vLLM 0.32's own routers (vllm/entrypoints/*/api_router.py), the routes that generate, embed, score or list.
INFERENCE_ROUTES: tuple[str, ...] = (
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/score",
    "/v1/rerank",
    "/tokenize",
    "/detokenize",
    "/version",
)

_PARAM = re.compile(r"\{[^/{}]+\}")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


def route_pattern(route: str) -> re.Pattern[str]:
    """``{name}`` stands for one path segment; a last ``/*`` for one or more further segments."""
    rest = route.endswith("/*")
    literal = route[:-2] if rest else route
    parts = [re.escape(piece) for piece in _PARAM.split(literal)]
    pattern = "[^/]+".join(parts) + ("(?:/[^/]+)+" if rest else "")
    return re.compile(pattern)


class RoutePolicy:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.routes = (*INFERENCE_ROUTES, *extra)
        self._patterns = tuple(route_pattern(route) for route in self.routes)
        # The routes' own spellings, as the checks below answer them: the usual paths skip decoding and matching.
        self._known: frozenset[str] = frozenset()
        self._known = frozenset(route for route in self.routes if self.forwards(route))

    def allows(self, raw_path: str) -> bool:
        """Whether the path as sent (before any ``?``) names an allowed route once decoded.

        Anything the engine might resolve differently from how it reads here is refused: a target that is not
        a plain absolute path, an empty or dot segment, or an encoded slash that decodes to a new segment.
        """
        path = raw_path.split("?", 1)[0]
        return path in self._known or self._checked(path)

    def _checked(self, path: str) -> bool:
        if not path.startswith("/") or "//" in path:
            return False
        decoded = unquote(path, errors="strict")
        if _DOT_SEGMENT.search(decoded) or "//" in decoded or any(ord(c) < 0x20 for c in decoded):
            return False
        return any(pattern.fullmatch(decoded) for pattern in self._patterns)

    def forwards(self, raw_path: str) -> bool:
        """``allows``, with percent-escapes that are not UTF-8 (they name no route of the engine) refused."""
        try:
            return self.allows(raw_path)
        except UnicodeDecodeError:
            return False


def forward_only_allowed_routes(policy: RoutePolicy, passthrough: Handler) -> Middleware:
    """403 for any path the pass-through would send to the engine that is not on the allowlist."""

    @web.middleware
    async def allowed_routes(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.handler is passthrough and not policy.forwards(request.raw_path):
            return refuse(
                request,
                403,
                f"{request.method} {request.path} is not forwarded to the engine: the gateway serves only its "
                "inference and listing routes (an operator can allow more with --allow-route)",
                code="route_not_allowed",
            )
        return await handler(request)

    return allowed_routes
