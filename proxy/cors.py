"""Cross-origin access for browser pages: none unless an operator names the origins.

The gateway answers preflights itself (they never reach the engine, and carry no API key), and it decides the
``Access-Control-*`` headers of every response: any the engine sent are dropped, so an engine started with its
own permissive CORS settings cannot open the gateway to other sites.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from flushgate.proxy.refusal import refuse

ALLOWED_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = "X-Request-ID, Server-Timing, Retry-After"
PREFLIGHT_MAX_AGE_S = 600


class CorsPolicy:
    def __init__(self, origins: Iterable[str]) -> None:
        listed = [origin.rstrip("/").lower() for origin in origins]
        self.any_origin = "*" in listed
        self.origins = frozenset(origin for origin in listed if origin != "*")
        # Only listed origins may read: a cache must not serve one origin's answer to another (``Vary: Origin``).
        self.varies_by_origin = bool(self.origins) and not self.any_origin

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allowed_origin(self, request: web.BaseRequest) -> str | None:
        """The value for ``Access-Control-Allow-Origin``, or None when this request's origin may not read."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not is_preflight(request):
                return await handler(request)
            if self.allowed_origin(request) is None:
                return refuse(
                    request,
                    403,
                    f"cross-origin requests from {request.headers[hdrs.ORIGIN]!r} are not allowed "
                    "(an operator can allow an origin with --cors-origin)",
                    code="cors_origin_not_allowed",
                )
            return web.Response(status=204)  # its Access-Control-* headers are set as it is sent

        return preflight

    def shape_without_origin(self, headers: CIMultiDict[str]) -> None:
        """What every response gets, whoever asked: the engine's own CORS headers dropped, and ``Vary: Origin``
        where only listed origins are allowed (a cache must not serve one origin's answer to another)."""
        for name in [name for name in headers if name.lower().startswith("access-control-")]:
            headers.popall(name, None)
        if self.varies_by_origin:
            headers.add(hdrs.VARY, hdrs.ORIGIN)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Runs on every response just before its headers go out, the engine's pass-through included."""
        self.shape_without_origin(response.headers)
        if not self.enabled:
            return
        allowed = self.allowed_origin(request)
        if allowed is None:
            return
        headers = response.headers
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
        if not is_preflight(request):
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
            return
        headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOWED_METHODS
        headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(PREFLIGHT_MAX_AGE_S)
        if asked := request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS):
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked


def is_preflight(request: web.BaseRequest) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )
