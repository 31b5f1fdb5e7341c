"""Bounds on what clients may send and hold: the declared body size, and how many requests run at once."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from flushgate.proxy.refusal import refuse

# Probes and metrics must answer even when the gateway is full.
UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1


def limit_body_size(max_bytes: int) -> Middleware:
    """413 for a body declared larger than ``max_bytes``, before a byte of it is read or forwarded."""

    @web.middleware
    async def body_size(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_bytes:
            return refuse(
                request,
                413,
                f"the request body is {declared} bytes; this gateway takes at most {max_bytes}",
                code="request_too_large",
            )
        return await handler(request)

    return body_size


class Admission:
    """How many requests are in flight, and how many may be."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def middleware(self) -> Middleware:
        """429 with ``Retry-After`` once ``limit`` requests are in flight: a full gateway says so at once
        instead of queueing without bound."""

        @web.middleware
        async def admission(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in UNCOUNTED_PATHS:
                return await handler(request)
            if self.active >= self.limit:
                return refuse(
                    request,
                    429,
                    f"the gateway is serving its limit of {self.limit} requests at once; retry shortly",
                    code="rate_limit_exceeded",
                    type_="requests",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.active += 1
            try:
                return await handler(request)
            finally:
                self.active -= 1

        return admission

    def leave(self, _: object = None) -> None:
        """One request taken outside the middleware (proxy/front.py) has ended."""
        self.active -= 1
