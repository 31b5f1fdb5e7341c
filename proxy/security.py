"""Puts the gateway's guards in front of every route, in the order a request meets them."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from flushgate.config import Access, Limits
from flushgate.proxy.auth import ApiKeys, require_api_key
from flushgate.proxy.cors import CorsPolicy
from flushgate.proxy.engine_routes import RoutePolicy, forward_only_allowed_routes
from flushgate.proxy.expect import use_own_expect_handler
from flushgate.proxy.limits import Admission, limit_body_size


@dataclass(frozen=True, slots=True)
class Guards:
    """The guards as installed, for the hot route's own server (proxy/front.py) to apply the same rules."""

    cors: CorsPolicy
    keys: ApiKeys
    routes: RoutePolicy
    max_body_bytes: int
    admission: Admission | None


GUARDS = web.AppKey("guards", Guards)


def install_guards(app: web.Application, access: Access, limits: Limits, passthrough: Handler) -> None:
    """Preflights first (a browser sends them without a key), then the key, then the route allowlist (so an
    unknown caller learns nothing about routes), then body size and the concurrency cap (so refused requests
    never hold a slot). ``passthrough`` is the handler whose paths go to the engine as they are."""
    cors = CorsPolicy(access.cors_origins)
    app.middlewares.append(cors.middleware())
    app.on_response_prepare.append(cors.on_response_prepare)
    keys = ApiKeys(access.api_keys)
    if keys:
        app.middlewares.append(require_api_key(keys, protect_metrics=access.metrics_auth))
    routes = RoutePolicy(access.allow_routes)
    app.middlewares.append(forward_only_allowed_routes(routes, passthrough))
    if limits.max_body_bytes:
        app.middlewares.append(limit_body_size(limits.max_body_bytes))
    admission = Admission(limits.max_concurrent) if limits.max_concurrent else None
    if admission is not None:
        app.middlewares.append(admission.middleware())
    app.on_startup.append(use_own_expect_handler)
    app[GUARDS] = Guards(cors, keys, routes, limits.max_body_bytes, admission)
