"""The hot path: forward a request upstream and stream the answer back, chunk by chunk, untouched.

Per chunk the loop reads what upstream has, stamps the time, writes it to the client and notes how long the
write took. Nothing is parsed, joined or held back (the only look inside is a short pattern search for the first
generated token, and only until it is found); ``write`` hands the bytes to the transport at once and only waits
when the client's socket is full, which is the backpressure that reaches the engine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from flushgate.proxy.affinity import affinity_key
from flushgate.proxy.body import OutgoingBody, read_ahead
from flushgate.proxy.errors import error_response, terminal_event
from flushgate.proxy.headers import (
    REQUEST_ID,
    client_response_headers,
    new_request_id,
    stream_kind,
    upstream_request_headers,
)
from flushgate.proxy.pool import EngineMember
from flushgate.proxy.router import RETRY_STATUSES, Router
from flushgate.proxy.state import GATEWAY, Gateway
from flushgate.proxy.upstream import FailedBeforeAnswer, Unavailable
from flushgate.record import RequestRecord
from flushgate.timings import FAST_CHUNK_S, RequestTimings, now

# A chunk that carries generated output: text, reasoning or the start of a tool call (OpenAI and Ollama shapes).
FIRST_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|reasoning|text|thinking|response)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[\s*\{'
)
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
TIMING_OPT_IN = "X-Flushgate-Timing"
CONTENT_CAP = 1 << 20  # --log-content keeps at most this much of each side
# Engine answers that mean "not this engine, not now": tried on another engine while the client has seen nothing.


async def forward(
    request: web.Request, body: bytes | None = None, received: float = 0.0, body_done: float = 0.0
) -> web.StreamResponse:
    """Forward ``request``. A caller that already read the client's body passes it as ``body`` (possibly
    rewritten), with when the request arrived (``received``) and when its body was read (``body_done``)."""
    gateway = request.app[GATEWAY]
    record = RequestRecord(
        request_id=request.headers.get(REQUEST_ID) or new_request_id(),
        method=request.method,
        path=request.path,
        timings=RequestTimings(start=received or now(), body_done=body_done),
    )
    gateway.enter()
    try:
        return await _exchange(request, gateway, record, body)
    except asyncio.CancelledError:
        record.outcome = "client_abort"  # aiohttp cancels the handler when the client's connection is lost
        raise
    finally:
        gateway.leave()
        record.timings.end = now()
        gateway.recorder.finish(record)


async def _exchange(
    request: web.Request, gateway: Gateway, record: RequestRecord, body: bytes | None
) -> web.StreamResponse:
    refusal = gateway.refusal()
    if refusal is not None:
        return _refused(refusal, record)

    router = gateway.router
    assert router is not None  # Gateway makes one for its backend when none is given
    timings = record.timings
    headers = upstream_request_headers(request.headers, record.request_id, request.remote)
    outgoing: OutgoingBody | None = None
    if body is not None:
        timings.body_done = timings.body_done or now()
        timings.bytes_in = request.content_length or len(body)
        if record.model is None and (found := MODEL_FIELD.search(body)):
            record.model = found.group(1).decode("utf-8", "replace")
        if gateway.log_content:
            record.content = {"request": body[:CONTENT_CAP].decode("utf-8", "replace")}
        headers.popall("Content-Length", None)  # aiohttp sets the new body's length
        outgoing = OutgoingBody(body, None)
    elif request.body_exists and router.several:
        try:
            outgoing = await read_ahead(_request_body(request, record, gateway.log_content, gateway.max_body_bytes))
        except BodyTooLarge as exc:
            return _too_large(record, exc, exc)
    elif not request.body_exists:
        timings.body_done = timings.start
    key: int | None = None
    if outgoing is not None and outgoing.complete and router.policy.mode == "prefix-affinity":
        key = affinity_key(outgoing.head)
    tried: list[EngineMember] = []
    timings.upstream_call = now()
    while True:
        member = router.pick(key, tried)
        if member is None:  # every engine left the pool or went loading/stopping since the refusal check
            return _refused(router.no_engine(), record)
        router.acquire(member)
        try:
            response = await _attempt(request, gateway, record, member, headers, outgoing, tried)
            if response is not None:
                return response
        finally:
            router.release(member)
        tried.append(member)


async def _attempt(
    request: web.Request,
    gateway: Gateway,
    record: RequestRecord,
    member: EngineMember,
    headers: CIMultiDict[str],
    body: OutgoingBody | None,
    tried: list[EngineMember],
) -> web.StreamResponse | None:
    """One try at one engine: its response relayed, an error response, or None to try another engine."""
    router = gateway.router
    assert router is not None
    base = member.url
    record.served_by = base
    data: bytes | AsyncIterator[bytes] | None = None
    if body is not None:
        data = body.payload()
    elif request.body_exists:
        data = _request_body(request, record, gateway.log_content, gateway.max_body_bytes)
    try:
        upstream = await gateway.session.request(
            request.method,
            URL(base + request.raw_path, encoded=True),
            headers=headers,
            data=data,
            allow_redirects=False,
            trace_request_ctx=record.timings,
        )
    except (aiohttp.ClientError, TimeoutError, BodyTooLarge) as exc:
        too_large = _cause(exc, BodyTooLarge)
        if too_large:  # the client's fault, not the engine's: no failover, nothing held against the engine
            return _too_large(record, too_large, exc)
        failure = FailedBeforeAnswer.of(exc, base)
        router.failed(member, "connect" if failure.connect else "broken")
        if _may_retry(router, record, body, [*tried, member]):
            record.failover.append({"engine": base, "error": repr(exc)})
            return None
        record.outcome = "upstream_error"
        record.error = repr(exc)
        record.status = failure.status
        return error_response(
            failure.status, failure.message, code=failure.code, headers={REQUEST_ID: record.request_id}
        )

    router.answered(member, upstream.status)
    if upstream.status in RETRY_STATUSES and _may_retry(router, record, body, [*tried, member]):
        upstream.close()
        record.failover.append({"engine": base, "error": f"status {upstream.status}"})
        return None
    try:
        return await _relay(request, upstream, gateway, record)
    finally:
        if record.outcome in ("upstream_error", "idle_timeout"):
            router.failed(member, "broken")
        # Anything short of a complete read closes the upstream connection, which is how vLLM learns to abort.
        if upstream.content.at_eof() and record.outcome == "completed":
            upstream.release()
        else:
            upstream.close()


def _may_retry(router: Router, record: RequestRecord, body: OutgoingBody | None, tried: list[EngineMember]) -> bool:
    """Another engine may be tried, and the body can be sent again (or there is none)."""
    return (body is None or body.replayable) and router.may_retry(len(record.failover), tried)


def _refused(refusal: Unavailable, record: RequestRecord) -> web.Response:
    """503 with ``Retry-After``: the gateway is draining, or no engine can take the request yet."""
    record.outcome = "rejected"
    record.status = 503
    return error_response(
        503,
        refusal.message,
        code=refusal.code,
        headers={"Retry-After": str(refusal.retry_after_s), REQUEST_ID: record.request_id},
    )


def _too_large(record: RequestRecord, reason: BodyTooLarge, raised: BaseException) -> web.Response:
    record.outcome = "rejected"
    record.error = repr(raised)
    record.status = 413
    headers = {REQUEST_ID: record.request_id}
    return error_response(413, str(reason), type_="invalid_request_error", code="request_too_large", headers=headers)


class BodyTooLarge(Exception):
    """A streamed request body grew past the gateway's limit (a declared one is refused before it is read)."""


async def _request_body(request: web.Request, record: RequestRecord, keep: bool, limit: int) -> AsyncIterator[bytes]:
    """The client's body as it arrives, noting its size, its end, and the model it names."""
    timings = record.timings
    kept = bytearray() if keep else None
    async for chunk in request.content.iter_any():
        timings.bytes_in += len(chunk)
        if limit and timings.bytes_in > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes, the most this gateway takes")
        if record.model is None and (found := MODEL_FIELD.search(chunk)):
            record.model = found.group(1).decode("utf-8", "replace")
        if kept is not None and len(kept) < CONTENT_CAP:
            kept += chunk[: CONTENT_CAP - len(kept)]
        yield chunk
    timings.body_done = now()
    if kept is not None:
        record.content = {"request": kept.decode("utf-8", "replace")}


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, gateway: Gateway, record: RequestRecord
) -> web.StreamResponse:
    timings = record.timings
    timings.upstream_headers = now()
    record.status = upstream.status
    kind = stream_kind(upstream.headers.get("Content-Type"))
    record.stream = kind is not None
    headers = client_response_headers(upstream.headers, record.request_id)
    headers["Server-Timing"] = _server_timing(timings)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    kept = bytearray() if gateway.log_content else None
    # Per-chunk sums live in locals while the stream runs and are added to the record when it ends.
    blocked = 0.0
    fast = events = 0
    try:
        await response.prepare(request)
        read = upstream.content.readany
        write = response.write
        arrived = timings.arrivals.append
        slow = timings.slow_chunks.append
        hops = gateway.hop_timing
        separator = b"\n\n" if kind == "sse" else b"\n"
        token_seen = kind is None or not hops  # only event streams are searched for their first token
        last = b""
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                await _end_broken_stream(request, response, upstream, gateway, record, exc, last)
                return response
            if not chunk:
                break
            last = chunk
            timings.bytes_out += len(chunk)
            if kept is not None and len(kept) < CONTENT_CAP:
                kept += chunk[: CONTENT_CAP - len(kept)]
            if not hops:
                await write(chunk)
                continue
            stamp = now()
            arrived(stamp)
            await write(chunk)
            took = now() - stamp  # all of it inside the write: backpressure from the client, if any
            blocked += took
            if took > FAST_CHUNK_S:
                slow(took)
            else:
                fast += 1
            events += chunk.count(separator)
            if not token_seen and FIRST_TOKEN.search(chunk):
                timings.first_token = stamp
                token_seen = True
        _add_chunk_sums(timings, blocked, fast, events)
        blocked, fast, events = 0.0, 0, 0
        if kind == "sse" and (gateway.timing_summary or request.headers.get(TIMING_OPT_IN) == "summary"):
            await response.write(await _timing_comment(gateway, record))
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError: the client went away
        record.outcome = "client_abort"
        record.error = repr(exc)
    finally:
        _add_chunk_sums(timings, blocked, fast, events)
        if kept is not None:
            record.content = {**(record.content or {}), "response": kept.decode("utf-8", "replace")}
    return response


def _add_chunk_sums(timings: RequestTimings, blocked: float, fast: int, events: int) -> None:
    timings.write_blocked += blocked
    timings.fast_chunks += fast
    timings.events += events


def _server_timing(t: RequestTimings) -> str:
    """What is known before the body starts: reading the client's body, connecting, the engine's first byte."""
    parts = []
    if t.body_done:
        parts.append(f"client-body;dur={(t.body_done - t.start) * 1000:.3f}")
    if t.connect_end:
        parts.append(f"upstream-connect;dur={(t.connect_end - t.connect_start) * 1000:.3f}")
    elif t.connection_reused:
        parts.append('upstream-connect;dur=0;desc="reused"')
    sent = max(t.body_done, t.connect_end, t.start)
    parts.append(f"engine-ttfb;dur={(t.upstream_headers - sent) * 1000:.3f}")
    return ", ".join(parts)


async def _timing_comment(gateway: Gateway, record: RequestRecord) -> bytes:
    """An SSE comment line (clients ignore it) with the request's record so far, engine split included."""
    await gateway.recorder.join_engine(record, timeout_s=0.5)
    record.timings.end = now()
    fields = record.fields()
    fields.pop("content", None)
    return b": flushgate-timing " + orjson.dumps(fields) + b"\n\n"


async def _end_broken_stream(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    gateway: Gateway,
    record: RequestRecord,
    exc: BaseException,
    last: bytes,
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
        engine = record.served_by or gateway.backend.base_url
        message = f"the engine at {engine} ended the stream before it was complete"
        code = "upstream_disconnected"
    kind = stream_kind(upstream.headers.get("Content-Type"))
    if kind is not None:
        separator = b"\n\n" if kind == "sse" else b"\n"
        # An event cut in the middle is closed first, so the error is an event of its own.
        await response.write(
            (separator if last and not last.endswith(separator) else b"") + terminal_event(kind, message, code)
        )
    elif request.transport is not None:
        request.transport.close()


def _cause(exc: BaseException, kind: type[BodyTooLarge]) -> BodyTooLarge | None:
    """``exc`` or the error it was raised from, if of ``kind`` (aiohttp wraps what a request body raises)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def connection_tracing() -> aiohttp.TraceConfig:
    """Stamps connect start/end, or notes a pooled connection, into the ``RequestTimings`` of each request."""
    trace = aiohttp.TraceConfig()

    async def create_start(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connect_start = now()
            timings.connection_reused = False

    async def create_end(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connect_end = now()

    async def reused(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connection_reused = True

    trace.on_connection_create_start.append(create_start)
    trace.on_connection_create_end.append(create_end)
    trace.on_connection_reuseconn.append(reused)
    return trace
