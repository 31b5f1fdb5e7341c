"""The Ollama hot path: send the translated request, turn each engine event into one NDJSON line at once.

Per read from the engine: split out the complete SSE events, and for each one parse it, build its line and
write it (``write`` hands the bytes to the transport at once). Nothing is held back, except the fragments of a
tool call until it is whole. A stream that breaks ends with an ``{"error": ...}`` line, never silently.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from flushgate.proxy.affinity import affinity_key_of
from flushgate.proxy.headers import REQUEST_ID
from flushgate.proxy.ollama.errors import OllamaError, engine_error_message, error_line, ollama_error_response
from flushgate.proxy.ollama.events import EngineEvents, EngineStreamError
from flushgate.proxy.ollama.lines import AnswerClock, final_object, text_line, tool_calls_line
from flushgate.proxy.ollama.request import EngineCall
from flushgate.proxy.ollama.sse import SseEvents
from flushgate.proxy.pool import EngineMember
from flushgate.proxy.state import Gateway
from flushgate.proxy.upstream import closed_unanswered
from flushgate.record import RequestRecord
from flushgate.timings import FAST_CHUNK_S, now

NDJSON_HEADERS = {
    "Content-Type": "application/x-ndjson",
    # Keep later hops (nginx, CDNs) from buffering the stream.
    "X-Accel-Buffering": "no",
    "Cache-Control": "no-cache",
}
_ENGINE_ERROR_BODY_LIMIT = 1 << 16


def upstream_headers(request: web.Request, request_id: str) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
        REQUEST_ID: request_id,
    }
    auth = request.headers.get("Authorization")
    if auth:
        headers["Authorization"] = auth
    return headers


async def open_engine_stream(
    request: web.Request, gateway: Gateway, call: EngineCall, record: RequestRecord
) -> tuple[EngineMember, aiohttp.ClientResponse]:
    """The engine's streaming response and the engine giving it, or an OllamaError saying why there is none.

    The engine is picked as for the OpenAI routes (least outstanding, or this conversation's engine) and counts
    the request as outstanding until the caller releases it. An engine that fails before answering is left for
    another while retries remain: nothing has reached the client yet, and the body is ours to send again. A
    pooled connection the engine closed under the request with no answer sends it once more, held against nobody.
    """
    refusal = gateway.refusal()
    if refusal is not None:
        record.outcome = "rejected"
        raise OllamaError(503, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
    router = gateway.router
    assert router is not None  # Gateway makes one for its backend when none is given
    payload = orjson.dumps(call.body)
    key = affinity_key_of(call.body) if router.policy.mode == "prefix-affinity" else None
    headers = upstream_headers(request, record.request_id)
    tried: list[EngineMember] = []
    record.timings.upstream_call = now()
    while True:
        member = router.pick(key, tried)
        if member is None:
            refusal = router.no_engine()
            record.outcome = "rejected"
            raise OllamaError(503, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
        base = record.served_by = member.url
        router.acquire(member)
        kept = False
        try:
            try:
                upstream = await gateway.session.post(
                    URL(base + call.path, encoded=True),
                    data=payload,
                    headers=headers,
                    trace_request_ctx=record.timings,  # the session's tracing stamps connect or pooled reuse here
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if record.stale_resent is None and closed_unanswered(exc, record.timings):
                    record.stale_resent = base  # once, held against nobody: the engine may well be picked again
                    continue
                tried.append(member)
                failure = router.failed_before_answer(member, exc, record.failover, tried)
                if failure is None:
                    continue
                raise _upstream_error(record, failure.status, failure.message) from None
            router.answered(member, upstream.status)
            if upstream.status == 200:
                kept = True
                return member, upstream
            try:
                body = await upstream.content.read(_ENGINE_ERROR_BODY_LIMIT)
            finally:
                upstream.release()
            tried.append(member)
            if router.retries_status(member, upstream.status, record.failover, tried):
                continue
            # The engine's own verdict on the request (400 for a bad value, 404 for an unknown model, ...).
            status = upstream.status if 400 <= upstream.status < 600 else 502
            raise _upstream_error(record, status, engine_error_message(body))
        finally:
            if not kept:
                router.release(member)


def _upstream_error(record: RequestRecord, status: int, message: str) -> OllamaError:
    record.outcome = "upstream_error"
    record.error = message
    return OllamaError(status, message)


async def answer(
    request: web.Request, gateway: Gateway, call: EngineCall, record: RequestRecord, clock: AnswerClock
) -> web.StreamResponse:
    member, upstream = await open_engine_stream(request, gateway, call, record)
    clock.mark_headers()
    record.timings.upstream_headers = clock.headers / 1e9
    record.status = upstream.status
    router = gateway.router
    assert router is not None
    try:
        if call.stream:
            return await _stream_lines(request, upstream, gateway, call, record, clock)
        return await _collect(upstream, gateway, call, record, clock)
    finally:
        router.release(member)
        if record.outcome in ("upstream_error", "idle_timeout"):
            router.failed(member, "broken")
        if upstream.content.at_eof() and record.outcome == "completed":
            upstream.release()
        else:
            upstream.close()  # closing mid-answer is how vLLM learns to abort the request


async def _stream_lines(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    gateway: Gateway,
    call: EngineCall,
    record: RequestRecord,
    clock: AnswerClock,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=NDJSON_HEADERS | {REQUEST_ID: record.request_id})
    await response.prepare(request)
    timings = record.timings
    kind, model = call.kind, call.model_name
    events = EngineEvents()
    frames = SseEvents()
    read = upstream.content.readany
    write = response.write
    hops = gateway.hop_timing
    finished = False
    try:
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                await write(error_line(_broken_stream(gateway, record, exc)))
                return response
            if not chunk:
                if not finished:
                    await write(error_line(_cut_stream(record)))
                return response
            arrival = now()
            wrote = 0.0  # time inside this chunk's writes
            if hops:
                timings.arrivals.append(arrival)
            for data in frames.feed(chunk):
                stamp = perf_counter_ns()
                if data == b"[DONE]":
                    if finished:
                        continue
                    clock.generated = clock.generated or stamp
                    line = orjson.dumps(final_object(kind, model, events, clock)) + b"\n"
                    finished = True
                else:
                    try:
                        content, thinking = events.read(data, stamp)
                        line = text_line(kind, model, content, thinking) if content or thinking else b""
                        if events.finish_reason and events.has_tool_calls:  # the calls are whole now
                            line += tool_calls_line(kind, model, events.take_tool_calls())
                    except EngineStreamError as exc:
                        record.outcome = "upstream_error"
                        record.error = str(exc)
                        await write(error_line(str(exc)))
                        return response
                    if events.prompt_tokens is not None and not clock.generated:
                        clock.generated = stamp
                    if events.first_token_ns and not timings.first_token:
                        timings.first_token = events.first_token_ns / 1e9
                    if not line:
                        continue
                timings.events += 1
                timings.bytes_out += len(line)
                before = now()
                await write(line)
                wrote += now() - before
            timings.write_blocked += wrote
            if hops:
                took = now() - arrival
                timings.chunk_work += took - wrote
                if took > FAST_CHUNK_S:
                    timings.slow_chunks.append(took)
                else:
                    timings.fast_chunks += 1
    except ConnectionResetError as exc:  # the client went away
        record.outcome = "client_abort"
        record.error = repr(exc)
        return response


async def _collect(
    upstream: aiohttp.ClientResponse, gateway: Gateway, call: EngineCall, record: RequestRecord, clock: AnswerClock
) -> web.Response:
    """``stream: false``: the same events, gathered into one object."""
    events = EngineEvents()
    frames = SseEvents()
    content: list[str] = []
    thinking: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    headers = {REQUEST_ID: record.request_id}
    while True:
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return ollama_error_response(502, _broken_stream(gateway, record, exc), headers)
        if not chunk:
            return ollama_error_response(502, _cut_stream(record), headers)
        for data in frames.feed(chunk):
            stamp = perf_counter_ns()
            if data == b"[DONE]":
                clock.generated = clock.generated or stamp
                obj = final_object(
                    call.kind, call.model_name, events, clock, "".join(content), "".join(thinking), tool_calls
                )
                await upstream.content.read()  # to the end, so the connection goes back to the pool
                body = orjson.dumps(obj)
                record.timings.bytes_out = len(body)
                record.timings.events = 1
                return web.Response(body=body, content_type="application/json", headers=headers)
            try:
                text, thought = events.read(data, stamp)
                if events.prompt_tokens is not None and not clock.generated:
                    clock.generated = stamp
                if events.first_token_ns and not record.timings.first_token:
                    record.timings.first_token = events.first_token_ns / 1e9
                if events.finish_reason and events.has_tool_calls:
                    tool_calls += events.take_tool_calls()
            except EngineStreamError as exc:
                record.outcome = "upstream_error"
                record.error = str(exc)
                return ollama_error_response(502, str(exc), headers)
            if text:
                content.append(text)
            if thought:
                thinking.append(thought)


def _broken_stream(gateway: Gateway, record: RequestRecord, exc: BaseException) -> str:
    record.error = repr(exc)
    if isinstance(exc, TimeoutError):
        record.outcome = "idle_timeout"
        idle = gateway.timeouts.idle or 0
        return f"the engine sent nothing for {idle:g} s; the answer was ended"
    record.outcome = "upstream_error"
    return f"the engine at {record.served_by} ended the stream before it was complete"


def _cut_stream(record: RequestRecord) -> str:
    record.outcome = "upstream_error"
    record.error = "stream ended without [DONE]"
    return f"the engine at {record.served_by} ended the stream before it was complete"
