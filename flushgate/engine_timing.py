"""vLLM's own per-request timing (queue, prefill, decode), joined to the gateway's record by request id.

vLLM reports it only as an OpenTelemetry span per finished request (``llm_request``, exported over OTLP). The
managed engine is pointed at a private OTLP/HTTP receiver here; spans arrive ~50 ms after a request ends and are
matched to the request through the id vLLM took from our ``X-Request-ID`` (``chatcmpl-<id>``, ``cmpl-<id>``).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# How the engine is told to export: OTLP over HTTP with protobuf bodies, flushed every 50 ms.
ENGINE_OTEL_ENV = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "50"}
_ID_PREFIXES = ("chatcmpl-", "cmpl-", "embd-", "tokn-")
_KEEP = 4096  # spans waiting for their request's record; old ones are dropped first


@dataclass(frozen=True, slots=True)
class EngineSplit:
    queue_s: float
    prefill_s: float
    decode_s: float
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int


def request_id_of(engine_id: str) -> str:
    for prefix in _ID_PREFIXES:
        if engine_id.startswith(prefix):
            return engine_id[len(prefix) :]
    return engine_id


class EngineTimings:
    """Spans by request id, with waiters for records that are ready before their span arrives."""

    def __init__(self) -> None:
        self._splits: collections.OrderedDict[str, EngineSplit] = collections.OrderedDict()
        self._waiters: dict[str, asyncio.Future[EngineSplit]] = {}

    def add(self, request_id: str, split: EngineSplit) -> None:
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(split)
            return
        self._splits[request_id] = split
        while len(self._splits) > _KEEP:
            self._splits.popitem(last=False)

    async def wait(self, request_id: str, timeout_s: float) -> EngineSplit | None:
        split = self._splits.pop(request_id, None)
        if split is not None:
            return split
        waiter = self._waiters.setdefault(request_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(request_id, None)

    def ingest(self, body: bytes) -> int:
        """Take the ``llm_request`` spans of one OTLP export; returns how many were taken."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        taken = 0
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if span.name != "llm_request":
                        continue
                    attrs = {a.key: _value(a.value) for a in span.attributes}
                    engine_id = attrs.get("gen_ai.request.id")
                    if not isinstance(engine_id, str):
                        continue
                    self.add(
                        request_id_of(engine_id),
                        EngineSplit(
                            queue_s=float(attrs.get("gen_ai.latency.time_in_queue", 0.0)),
                            prefill_s=float(attrs.get("gen_ai.latency.time_in_model_prefill", 0.0)),
                            decode_s=float(attrs.get("gen_ai.latency.time_in_model_decode", 0.0)),
                            e2e_s=float(attrs.get("gen_ai.latency.e2e", 0.0)),
                            prompt_tokens=int(attrs.get("gen_ai.usage.prompt_tokens", 0)),
                            completion_tokens=int(attrs.get("gen_ai.usage.completion_tokens", 0)),
                        ),
                    )
                    taken += 1
        return taken


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """A private OTLP/HTTP endpoint (``POST /v1/traces``) on 127.0.0.1 that feeds :class:`EngineTimings`."""

    def __init__(self, timings: EngineTimings, log: Any) -> None:
        self.timings = timings
        self._log = log
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        try:
            self.timings.ingest(await request.read())
        except Exception as exc:  # a malformed export must not take the receiver down
            self._log.warning("otlp_export_unreadable", error=repr(exc))
            return web.Response(status=400)
        return web.Response(body=b"", content_type="application/x-protobuf")
