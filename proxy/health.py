"""Liveness and readiness, shaped for Kubernetes probes."""

from __future__ import annotations

import orjson
from aiohttp import web

from flushgate.proxy.state import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the gateway's event loop answers. Never depends on the engine."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    if gateway.draining:
        body: dict[str, object] = {"ready": False, "reason": "draining", "inflight": gateway.inflight}
        return web.Response(status=503, body=orjson.dumps(body), content_type="application/json")
    readiness = await gateway.backend.readiness(gateway.session)
    body = {"ready": readiness.ready, **readiness.detail}
    return web.Response(
        status=200 if readiness.ready else 503, body=orjson.dumps(body), content_type="application/json"
    )
