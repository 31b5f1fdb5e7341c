"""The built-in chat page: a few static files, served to browsers as they are (no build step).

``GET /`` is shared: a browser (its ``Accept`` names ``text/html``) gets the page; any other client gets the
``fallback`` handler given to ``chat_root``, Ollama's "Ollama is running", which its clients probe for.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from flushgate.proxy.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PAGE_DIR = Path(__file__).resolve().parent / "page"
ASSET_PREFIX = "/ui"
ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\.(?:js|css|svg)")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}

# The page runs only its own files and talks only to its own origin; model output can never become markup, and
# this policy is the second wall should that ever break: no inline script, no foreign image, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def accepts_html(request: web.Request) -> bool:
    """True when the client lists ``text/html`` in ``Accept`` with a non-zero weight: a browser opening the URL."""
    for item in request.headers.get("Accept", "").split(","):
        media, _, params = item.partition(";")
        if media.strip().lower() != "text/html":
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        return weight > 0
    return False


def _file_response(path: Path) -> web.FileResponse:
    headers = {**PAGE_HEADERS, "Content-Type": f"{CONTENT_TYPES[path.suffix]}; charset=utf-8"}
    return web.FileResponse(path, headers=headers)


async def chat_page(request: web.Request) -> web.StreamResponse:
    return _file_response(PAGE_DIR / "index.html")


async def page_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = PAGE_DIR / name
    if not ASSET_NAME.fullmatch(name) or not path.is_file():
        return error_response(404, f"no page asset {name!r}", type_="invalid_request_error", code="not_found")
    return _file_response(path)


def chat_root(fallback: Handler) -> Handler:
    """The handler for ``GET /`` (and ``HEAD /``): the page for browsers, ``fallback`` for every other client."""

    async def root(request: web.Request) -> web.StreamResponse:
        if accepts_html(request):
            return await chat_page(request)
        return await fallback(request)

    return root


def add_page_assets(router: web.UrlDispatcher) -> None:
    """Register ``/ui/{name}``; ``/`` is registered by whoever answers it for non-browsers, through ``chat_root``."""
    router.add_get(ASSET_PREFIX + "/{name}", page_asset)
