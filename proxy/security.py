"""Puts the gateway's guards in front of every route, in the order a request meets them."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from flushgate.config import Access, Limits
from flushgate.proxy.auth import ApiKeys, require_api_key
from flushgate.proxy.cors import CorsPolicy
from flushgate.proxy.engine_routes import RoutePolicy, forward_only_allowed_routes
from flushgate.proxy.expect import use_own_expect_handler
from flushgate.proxy.limits import Admission, limit_body_size


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
    app.middlewares.append(forward_only_allowed_routes(RoutePolicy(access.allow_routes), passthrough))
    if limits.max_body_bytes:
        app.middlewares.append(limit_body_size(limits.max_body_bytes))
    if limits.max_concurrent:
        app.middlewares.append(Admission(limits.max_concurrent).middleware())
    app.on_startup.append(use_own_expect_handler)
