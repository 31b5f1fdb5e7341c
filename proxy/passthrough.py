"""The hot path: forward a request upstream and stream the answer back, chunk by chunk, untouched.

Per chunk the loop does three things: read what upstream has, stamp the time, write it to the client. Nothing
is parsed, joined or held back; ``write`` hands the bytes to the transport at once and only waits when the
client's socket is full, which is the backpressure that reaches the engine.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from yarl import URL

from flushgate.proxy.errors import error_response, terminal_event
from flushgate.proxy.headers import (
    REQUEST_ID,
    client_response_headers,
    new_request_id,
    stream_kind,
    upstream_request_headers,
)
from flushgate.proxy.state import GATEWAY, Gateway
from flushgate.record import RequestRecord
from flushgate.timings import RequestTimings, now


async def forward(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    record = RequestRecord(
        request_id=request.headers.get(REQUEST_ID) or new_request_id(),
        method=request.method,
        path=request.path,
        timings=RequestTimings(start=now()),
    )
    gateway.enter()
    try:
        response = await _exchange(request, gateway, record)
        record.status = response.status
        return response
    except asyncio.CancelledError:
        record.outcome = "client_abort"  # aiohttp cancels the handler when the client's connection is lost
        raise
    finally:
        gateway.leave()
        record.timings.end = now()
        record.emit(gateway.log)


async def _exchange(request: web.Request, gateway: Gateway, record: RequestRecord) -> web.StreamResponse:
    refusal = gateway.refusal()
    if refusal is not None:
        record.outcome = "rejected"
        return error_response(
            503,
            refusal.message,
            code=refusal.code,
            headers={"Retry-After": str(refusal.retry_after_s), REQUEST_ID: record.request_id},
        )

    base = gateway.backend.base_url
    try:
        upstream = await gateway.session.request(
            request.method,
            URL(base + request.raw_path, encoded=True),
            headers=upstream_request_headers(request.headers, record.request_id, request.remote),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.outcome = "upstream_error"
        record.error = repr(exc)
        return _upstream_failure(exc, base, record.request_id)

    try:
        return await _relay(request, upstream, gateway, record)
    finally:
        # Anything short of a complete read closes the upstream connection, which is how vLLM learns to abort.
        if upstream.content.at_eof() and record.outcome == "completed":
            upstream.release()
        else:
            upstream.close()


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, gateway: Gateway, record: RequestRecord
) -> web.StreamResponse:
    timings = record.timings
    timings.upstream_headers = now()
    record.status = upstream.status
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=client_response_headers(upstream.headers, record.request_id),
    )
    try:
        await response.prepare(request)
        read = upstream.content.readany
        write = response.write
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                await _end_broken_stream(request, response, upstream, gateway, record, exc)
                return response
            if not chunk:
                return response
            stamp = now()
            if not timings.chunks:
                timings.first_chunk = stamp
            timings.last_chunk = stamp
            timings.chunks += 1
            timings.bytes_out += len(chunk)
            await write(chunk)
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError: the client went away
        record.outcome = "client_abort"
        record.error = repr(exc)
        return response


async def _end_broken_stream(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    gateway: Gateway,
    record: RequestRecord,
    exc: BaseException,
) -> None:
    """Make an unfinished upstream body unmistakable to the client.

    Event streams get a final error event. Any other body is cut off without its end marker (no last chunk,
    or fewer bytes than Content-Length), so an HTTP client reports a truncated response.
    """
    idle = isinstance(exc, TimeoutError)
    record.outcome = "idle_timeout" if idle else "upstream_error"
    record.error = repr(exc)
    if idle:
        message = f"the engine sent nothing for {gateway.timeouts.idle:g} s; the stream was ended"
        code = "idle_timeout"
    else:
        message = f"the engine at {gateway.backend.base_url} ended the stream before it was complete"
        code = "upstream_disconnected"
    kind = stream_kind(upstream.headers.get("Content-Type"))
    if kind is not None:
        await response.write(terminal_event(kind, message, code))
    elif request.transport is not None:
        request.transport.close()


def _upstream_failure(exc: BaseException, base: str, request_id: str) -> web.Response:
    headers = {REQUEST_ID: request_id}
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return error_response(
            504,
            f"connecting to the engine at {base} timed out",
            code="upstream_connect_timeout",
            headers=headers,
        )
    if isinstance(exc, TimeoutError):
        return error_response(
            504, f"the engine at {base} sent no response in time", code="upstream_timeout", headers=headers
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return error_response(
            502,
            f"the engine at {base} is unreachable: {exc.os_error.strerror or exc}",
            code="upstream_unreachable",
            headers=headers,
        )
    return error_response(
        502, f"the engine at {base} failed before answering: {exc}", code="upstream_error", headers=headers
    )
