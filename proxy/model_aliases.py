"""Thinking aliases on the OpenAI API: ``MODEL:think`` / ``MODEL:nothink`` for UIs that only offer a model list.

Only two requests are touched. ``GET /v1/models`` lists each alias beside its model; a chat completion that names
an alias is sent to the engine with the real model name and ``chat_template_kwargs.enable_thinking`` set. Every
other request, and every chat completion naming a plain model, is forwarded untouched by the pass-through.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web

from flushgate.proxy.body import BodyStalled, arriving
from flushgate.proxy.client_side import AiohttpClient, ClientSide
from flushgate.proxy.ollama.errors import OllamaError
from flushgate.proxy.ollama.models import ModelRegistry
from flushgate.proxy.passthrough import exchange, forward, named_model
from flushgate.proxy.refusal import refuse
from flushgate.proxy.state import GATEWAY, Gateway
from flushgate.timings import now

ALIAS_BODY_LIMIT = 8 << 20  # a chat body this large is forwarded as it comes, unread
MODEL_REGISTRY = web.AppKey("model_registry", ModelRegistry)  # for the hot route's own server (proxy/front.py)


def add_model_aliases(router: web.UrlDispatcher, registry: ModelRegistry) -> None:
    """Register before the ``/v1`` pass-through route."""

    async def models(request: web.Request) -> web.StreamResponse:
        client = AiohttpClient(request)
        return client.handler_result(await list_models(client, request.app[GATEWAY], registry))

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _chat_with_alias(request, registry)

    router.add_get("/v1/models", models)
    router.add_post("/v1/chat/completions", chat)


async def _alias_names(registry: ModelRegistry) -> dict[str, tuple[str, bool]]:
    """Alias -> (served model id, thinking on); empty when no alias is configured or the engine is unavailable."""
    if not registry.settings.thinking_aliases:
        return {}
    try:
        names = await registry.names()
    except (OllamaError, aiohttp.ClientError, TimeoutError):
        return {}
    return {n.name: (n.model.id, n.thinking) for n in names if n.thinking is not None}


async def list_models(client: ClientSide, gateway: Gateway, registry: ModelRegistry) -> web.Response | None:
    """``GET /v1/models`` with the aliases added: the response to send, or None once it was relayed to
    ``client`` unchanged (no alias configured or known)."""
    aliases = await _alias_names(registry)
    if not aliases:
        return await exchange(client, gateway, None)
    async with gateway.session.get(gateway.backend.base_url + "/v1/models") as upstream:
        raw = await upstream.read()
        if upstream.status != 200:
            return web.Response(status=upstream.status, body=raw, content_type=upstream.content_type)
    listing: dict[str, Any] = orjson.loads(raw)
    cards = {card.get("id"): card for card in listing.get("data", [])}
    for alias, (model_id, _) in aliases.items():
        if model_id in cards:
            listing["data"].append({**cards[model_id], "id": alias, "parent": model_id})
    return web.Response(body=orjson.dumps(listing), content_type="application/json")


def names_alias(model: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a model name ends in an alias tag (``OllamaSettings.alias_suffixes``); only such a name costs a look
    at the engine's models."""
    return model.endswith(suffixes)  # no suffixes: an empty tuple, which nothing ends with


async def _chat_with_alias(request: web.Request, registry: ModelRegistry) -> web.StreamResponse:
    size = request.content_length
    if not registry.settings.thinking_aliases or size is None or size > ALIAS_BODY_LIMIT:
        return await forward(request)
    received = now()
    try:
        raw = b"".join([part async for part in arriving(request.content.iter_any(), request.app[GATEWAY].body_timeout)])
    except BodyStalled as exc:
        refusal = refuse(request, 408, str(exc), code="request_body_timeout")
        refusal.force_close()
        return refusal
    body_done = now()
    named = named_model(raw)
    name = named or ""
    # Only a name ending in an alias tag costs a look at the engine's models.
    aliased = names_alias(name, registry.settings.alias_suffixes)
    target = (await _alias_names(registry)).get(name) if aliased else None
    if target is None:
        return await forward(request, raw, received, body_done, named)
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return await forward(request, raw, received, body_done)  # the engine answers bad JSON in its own words
    model_id, thinking = target
    payload["model"] = model_id
    kwargs = payload.get("chat_template_kwargs")
    payload["chat_template_kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}), "enable_thinking": thinking}
    return await forward(request, orjson.dumps(payload), received, body_done)
