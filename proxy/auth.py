"""API keys: ``Authorization: Bearer KEY`` on every route but the probes and the chat page's static files,
checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, MultiMapping

from flushgate.proxy.chat_page import ASSET_PREFIX, accepts_html
from flushgate.proxy.refusal import refuse

# Kubernetes probes carry no key.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ApiKeys:
    """The accepted keys, kept only as SHA-256 digests.

    Comparing fixed-length digests with ``hmac.compare_digest``, against every key without stopping at the first
    match, means neither the time taken nor an early exit tells a caller how much of a guess was right or how
    long a key is.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key) for key in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        offered = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(offered, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def bearer_token(headers: MultiMapping[str]) -> str | None:
    return bearer(headers.get(hdrs.AUTHORIZATION, ""))


def bearer(authorization: str) -> str | None:
    """The key in an ``Authorization`` value, if it is a bearer token."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _is_page(request: web.Request) -> bool:
    """The chat page and its static files hold no data: a browser loads them without a key, then the page asks
    for one when the API answers 401."""
    if request.path.startswith(ASSET_PREFIX + "/"):
        return True
    return request.path == "/" and request.method in ("GET", "HEAD") and accepts_html(request)


def require_api_key(keys: ApiKeys, *, protect_metrics: bool) -> Middleware:
    """401 without a valid key. The key is for the gateway alone, so it is not passed on to the engine."""
    open_paths = OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics"}

    @web.middleware
    async def api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or _is_page(request):
            return await handler(request)
        token = bearer_token(request.headers)
        if token is None or not keys.accepts(token):
            message = (
                "no API key given; send it as 'Authorization: Bearer KEY'"
                if token is None
                else "the API key given is not valid"
            )
            return refuse(request, 401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        headers = CIMultiDict(request.headers)
        del headers[hdrs.AUTHORIZATION]
        try:
            without_key = request.clone(headers=headers)
        except UnicodeEncodeError:  # aiohttp re-encodes a cloned request's headers as strict UTF-8
            return refuse(
                request,
                400,
                "a request header holds bytes that are not UTF-8; this gateway takes header values as UTF-8 text",
                code="invalid_header",
            )
        return await handler(without_key)

    return api_key
