"""Builds the aiohttp application: which paths go where."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flushgate.config import Access, Limits
from flushgate.proxy.chat_page import add_page_assets, chat_root
from flushgate.proxy.client_side import hold_little_for_the_client
from flushgate.proxy.errors import error_response
from flushgate.proxy.health import healthz, readyz
from flushgate.proxy.model_aliases import MODEL_REGISTRY, add_model_aliases
from flushgate.proxy.ollama.api import add_ollama_routes
from flushgate.proxy.ollama.models import ModelRegistry
from flushgate.proxy.passthrough import forward
from flushgate.proxy.security import install_guards
from flushgate.proxy.state import GATEWAY, Gateway

# The OpenAI-compatible surface vLLM serves; forwarded byte for byte.
PASSTHROUGH_PATHS = ("/v1/{tail:.*}", "/tokenize", "/detokenize", "/version")


async def not_found(request: web.Request) -> web.Response:
    return error_response(
        404,
        f"no route for {request.method} {request.path}",
        type_="invalid_request_error",
        code="not_found",
    )


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[GATEWAY].recorder.metrics.scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(gateway: Gateway, access: Access | None = None, limits: Limits | None = None) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    install_guards(app, access or Access(), limits or Limits(), forward)
    app.on_response_prepare.append(hold_little_for_the_client)
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/metrics", metrics)
    registry = ModelRegistry(gateway)
    app[MODEL_REGISTRY] = registry
    add_model_aliases(router, registry)  # before the /v1 pass-through, which takes everything else
    for path in PASSTHROUGH_PATHS:
        router.add_route("*", path, forward)
    add_page_assets(router)
    # GET /: the chat page for browsers, Ollama's "Ollama is running" for every other client
    add_ollama_routes(router, gateway, root=chat_root, registry=registry)
    router.add_route("*", "/{tail:.*}", not_found)
    return app
