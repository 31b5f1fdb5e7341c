"""The ``Expect`` request header, answered in the API's shape.

aiohttp answers an ``Expect`` other than ``100-continue`` before any middleware runs, with the header's value in
a plain-text 417; a value that is not UTF-8 makes that answer fail as a 500. This one answers 417 in the API's
shape without echoing the value, and leaves ``100-continue`` to aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import hdrs, web

from flushgate.proxy.refusal import refuse

ExpectHandler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse | None]]


async def use_own_expect_handler(app: web.Application) -> None:
    """On start-up, once every route is registered, put the check below in front of aiohttp's on each route."""
    for route in app.router.routes():
        if isinstance(route, web.ResourceRoute):  # aiohttp keeps the handler private; its constructor sets it
            route._expect_handler = only_continue(route._expect_handler)


def only_continue(original: ExpectHandler) -> ExpectHandler:
    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return refuse(
                request, 417, "the only Expect this gateway understands is 100-continue", code="expectation_failed"
            )
        return await original(request)

    return expect
