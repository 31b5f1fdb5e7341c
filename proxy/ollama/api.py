"""Ollama's HTTP API: the route table and one handler per endpoint."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from flushgate.proxy.body import BodyStalled, arriving
from flushgate.proxy.headers import REQUEST_ID, new_request_id
from flushgate.proxy.ollama.errors import OllamaError, engine_error_message, ollama_error_response
from flushgate.proxy.ollama.lines import AnswerClock, Kind, created_at, load_object
from flushgate.proxy.ollama.models import ListedName, ModelRegistry
from flushgate.proxy.ollama.relay import answer, upstream_headers
from flushgate.proxy.ollama.request import chat_call, generate_call, parse_body, requested_model
from flushgate.proxy.pool import EngineMember
from flushgate.proxy.state import GATEWAY, Gateway
from flushgate.proxy.upstream import closed_unanswered
from flushgate.record import RequestRecord
from flushgate.timings import RequestTimings, now

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_BYTES = 32 << 20
RESIDENT_UNTIL = "9999-12-31T23:59:59Z"  # the engine's model never unloads; keep_alive has no effect

# Ollama's model management: the engine's model is chosen when flushgate starts, never through the API.
MANAGEMENT_ROUTES = (
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/{digest}"),
    ("HEAD", "/api/blobs/{digest}"),
)


def add_ollama_routes(
    router: web.UrlDispatcher,
    gateway: Gateway,
    root: Callable[[Handler], Handler] = lambda handler: handler,
    registry: ModelRegistry | None = None,
) -> None:
    """Register Ollama's API; must come before any catch-all route. ``root`` wraps the ``GET /`` handler, so the
    path can be shared with something else (the chat page, for browsers)."""
    api = OllamaApi(gateway, registry)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/", root(api.root)),
        ("GET", "/api/version", api.version),
        ("GET", "/api/tags", api.tags),
        ("GET", "/api/ps", api.ps),
        ("POST", "/api/show", api.show),
        ("POST", "/api/chat", api.chat),
        ("POST", "/api/generate", api.generate),
        ("POST", "/api/embed", api.embed),
        ("POST", "/api/embeddings", api.embeddings),
    ]
    routes += [(method, path, api.managed) for method, path in MANAGEMENT_ROUTES]
    for method, path, handler in routes:
        api.allowed.setdefault(path, set()).add(method)
        if method == "GET":
            api.allowed[path].add("HEAD")
            router.add_get(path, _guarded(handler, gateway))
        else:
            router.add_route(method, path, _guarded(handler, gateway))
    router.add_route("*", "/api/{tail:.*}", _guarded(api.unknown, gateway))


def _guarded(handler: Handler, gateway: Gateway) -> Handler:
    """Every failure answered in Ollama's shape; a bug is a logged 500 with a message, never a traceback page."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OllamaError as exc:
            return ollama_error_response(exc.status, exc.message, exc.headers)
        except (asyncio.CancelledError, web.HTTPException):
            raise
        except Exception as exc:
            gateway.log.error(
                "ollama_handler_failed", path=request.path, error=repr(exc), traceback=traceback.format_exc()
            )
            return ollama_error_response(500, f"internal error in flushgate: {exc!r}")

    return guarded


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


async def read_limited(request: web.Request) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in arriving(request.content.iter_any(), request.app[GATEWAY].body_timeout):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise OllamaError(413, f"request body larger than {MAX_BODY_BYTES >> 20} MiB")
            parts.append(chunk)
    except BodyStalled as exc:
        raise OllamaError(408, str(exc)) from exc
    return b"".join(parts)


class OllamaApi:
    def __init__(self, gateway: Gateway, registry: ModelRegistry | None = None) -> None:
        self.gateway = gateway
        self.registry = registry or ModelRegistry(gateway)
        self.allowed: dict[str, set[str]] = {}

    async def root(self, request: web.Request) -> web.Response:
        # The exact text Ollama answers; some clients probe for it.
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": self.gateway.ollama.api_version})

    async def tags(self, request: web.Request) -> web.Response:
        return _json({"models": [self._listing(n) for n in await self.registry.names()]})

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for listed in await self.registry.names():
            entry = self._listing(listed)
            del entry["modified_at"]
            entry["expires_at"] = RESIDENT_UNTIL
            if listed.model.max_model_len:
                entry["context_length"] = listed.model.max_model_len
            models.append(entry)
        return _json({"models": models})

    def _listing(self, listed: ListedName) -> dict[str, Any]:
        model = listed.model
        details = model.details
        return {
            "name": listed.name,
            "model": listed.name,
            "modified_at": details.modified_at or created_at(),
            "size": details.size,
            "digest": details.digest,
            "details": details.as_ollama(),
            "capabilities": model.capabilities,
        }

    async def show(self, request: web.Request) -> web.Response:
        body = parse_body(await read_limited(request))
        choice = await self.registry.resolve(requested_model(body))
        model = choice.model
        details = model.details
        arch = details.architecture or "unknown"
        info: dict[str, Any] = {"general.architecture": arch}
        if details.parameter_count:
            info["general.parameter_count"] = details.parameter_count
        if model.max_model_len:
            info[f"{arch}.context_length"] = model.max_model_len
        source = model.root or model.id
        thinking = "" if choice.thinking is None else f"# thinking {'on' if choice.thinking else 'off'}\n"
        return _json(
            {
                "modelfile": f"# Served by flushgate from the engine's model {model.id}\n{thinking}FROM {source}\n",
                "parameters": "",
                "template": "",  # the chat template is the model's own, applied by the engine
                "details": details.as_ollama(),
                "model_info": info,
                "capabilities": model.capabilities,
                "modified_at": details.modified_at or created_at(),
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "generate")

    async def _generation(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        gateway = self.gateway
        request_id = request.headers.get(REQUEST_ID) or new_request_id()
        timings = RequestTimings(start=now())
        record = RequestRecord(request_id, request.method, request.path, timings, api="ollama")
        clock = AnswerClock(start=perf_counter_ns())
        gateway.enter()
        try:
            try:
                raw = await read_limited(request)
                timings.body_done = now()
                timings.bytes_in = len(raw)
                body = parse_body(raw)
                record.model = requested_model(body)
                choice = await self.registry.resolve(record.model)
                call = chat_call(body, choice) if kind == "chat" else generate_call(body, choice)
                if call is None:
                    response: web.StreamResponse = _json(load_object(kind, choice.name))
                else:
                    record.stream = call.stream
                    response = await answer(request, gateway, call, record, clock)
            except OllamaError as exc:
                if record.outcome == "completed":
                    record.outcome = "rejected"
                    record.error = exc.message
                response = ollama_error_response(exc.status, exc.message, exc.headers | {REQUEST_ID: request_id})
            record.status = response.status
            return response
        except asyncio.CancelledError:
            record.outcome = "client_abort"  # the client's connection is gone
            raise
        finally:
            gateway.leave()
            timings.end = now()
            gateway.recorder.finish(record)

    async def embed(self, request: web.Request) -> web.Response:
        body = parse_body(await read_limited(request))
        name = requested_model(body)
        inputs = body.get("input")
        if not (isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs))):
            raise OllamaError(400, "invalid input type: input must be a string or an array of strings")
        result = await self._embeddings(request, name, inputs, body.get("dimensions"))
        return _json(result)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = parse_body(await read_limited(request))
        name = requested_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        result = await self._embeddings(request, name, prompt, None)
        return _json({"embedding": result["embeddings"][0]})

    async def _embeddings(
        self, request: web.Request, name: str, inputs: str | list[str], dimensions: Any
    ) -> dict[str, Any]:
        start = perf_counter_ns()
        choice = await self.registry.resolve(name)
        gateway = self.gateway
        refusal = gateway.refusal()
        if refusal is not None:
            raise OllamaError(503, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
        payload: dict[str, Any] = {"model": choice.model.id, "input": inputs}
        if isinstance(dimensions, int) and not isinstance(dimensions, bool):
            payload["dimensions"] = dimensions
        router = gateway.router
        assert router is not None
        headers = upstream_headers(request, request.headers.get(REQUEST_ID) or new_request_id())
        headers["Accept"] = "application/json"
        data = orjson.dumps(payload)
        tried: list[EngineMember] = []
        failover: list[dict[str, str]] = []
        traced = RequestTimings(now())  # the session's tracing says here whether the engine connection was pooled
        resent = False
        gateway.enter()
        try:
            while True:  # an embedding changes nothing: an engine that fails before answering leaves it to another
                member = router.pick(None, tried)
                if member is None:
                    refusal = router.no_engine()
                    raise OllamaError(503, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
                router.acquire(member)
                headed = False
                try:
                    async with gateway.session.post(
                        member.url + "/v1/embeddings", data=data, headers=headers, trace_request_ctx=traced
                    ) as resp:
                        headed = True
                        raw = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if not resent and not headed and closed_unanswered(exc, traced):
                        resent = True  # once, held against nobody, as for a chat
                        continue
                    tried.append(member)
                    failure = router.failed_before_answer(member, exc, failover, tried)
                    if failure is None:
                        continue
                    raise OllamaError(failure.status, failure.message) from None
                finally:
                    router.release(member)
                tried.append(member)
                router.answered(member, status)
                if router.retries_status(member, status, failover, tried):
                    continue
                break
        finally:
            gateway.leave()
        if failover:
            gateway.log.info("embeddings_failover", path=request.path, engine=member.url, failover=failover)
        if status == 404 and b"Not Found" in raw:  # vLLM has no embeddings route for this model
            raise OllamaError(400, f"model '{name}' does not support embeddings: the engine serves it for generation")
        if status != 200:
            code = status if 400 <= status < 600 else 502
            raise OllamaError(code, f"the engine cannot embed with '{name}': {engine_error_message(raw)}")
        try:
            reply = orjson.loads(raw)
            vectors = [item["embedding"] for item in sorted(reply["data"], key=lambda item: item["index"])]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise OllamaError(502, "the engine's embeddings answer is not OpenAI's shape") from None
        result: dict[str, Any] = {"model": name, "embeddings": vectors, "total_duration": perf_counter_ns() - start}
        usage = reply.get("usage") or {}
        if isinstance(usage.get("prompt_tokens"), int):
            result["prompt_eval_count"] = usage["prompt_tokens"]
        return result

    async def managed(self, request: web.Request) -> web.Response:
        what = request.path.removeprefix("/api/").split("/", 1)[0]
        return ollama_error_response(
            403,
            f"{what} is not available: the models are managed by flushgate, which serves the model its engine "
            "was started with; change flushgate's configuration to serve another model",
        )

    async def unknown(self, request: web.Request) -> web.Response:
        path = request.path
        allowed = self.allowed.get("/api/blobs/{digest}" if path.startswith("/api/blobs/") else path)
        if allowed:
            methods = ", ".join(sorted(allowed))
            message = f"method {request.method} not allowed on {path}; use {methods}"
            return ollama_error_response(405, message, {"Allow": methods})
        return ollama_error_response(404, f"no route for {request.method} {path}")
