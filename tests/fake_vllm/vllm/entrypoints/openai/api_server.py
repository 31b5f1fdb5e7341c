"""A stand-in for vLLM's OpenAI server, found first on PYTHONPATH by tests of the engine supervisor.

It takes vLLM's command line, prints vLLM-like start-up lines, and behaves as the environment says:
- FAKE_ENGINE_GATE=PATH: stay unhealthy (loading) until PATH exists;
- FAKE_ENGINE_EXIT=N: print a traceback and exit with code N right after start-up lines;
- FAKE_ENGINE_IGNORE_TERM=1: ignore SIGTERM (to prove SIGKILL follows the grace period);
- FAKE_ENGINE_RECORD=PATH: append one line per event (pids, signals) to PATH.
A chat request may plant timings in its body (``fake_queue_s``, ``fake_prefill_s``, ``fake_tokens``,
``fake_token_gap_s``); without ``fake_tokens`` it streams until the client leaves. Like vLLM with
``--otlp-traces-endpoint``, it exports one ``llm_request`` span per finished request, carrying its measured times.
It starts one worker child in the same process group, as vLLM starts its EngineCore.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from aiohttp import ClientSession, web


def record(event: str) -> None:
    path = os.environ.get("FAKE_ENGINE_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(f"{event}\n")


def say(line: str) -> None:
    print(f"(APIServer pid={os.getpid()}) INFO {line}", flush=True)


async def health(request: web.Request) -> web.Response:
    gate = os.environ.get("FAKE_ENGINE_GATE")
    if gate and not os.path.exists(gate):  # noqa: ASYNC240 - one stat per health poll, in a test stand-in
        return web.Response(status=503)
    return web.Response(text="")


async def models(request: web.Request) -> web.Response:
    name = request.app["served_name"]
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "max_model_len": 2048}]})


def event(delta: str) -> bytes:
    return ('data: {"id": "x", "choices": [{"delta": {' + delta + "}}]}\n\n").encode()


async def chat(request: web.Request) -> web.StreamResponse:
    plan = await request.json()
    arrival = time.monotonic()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(event('"role": "assistant", "content": ""'))
    await asyncio.sleep(plan.get("fake_queue_s", 0))
    scheduled = time.monotonic()
    await asyncio.sleep(plan.get("fake_prefill_s", 0))
    first = time.monotonic()
    tokens = plan.get("fake_tokens")
    n = 0
    while tokens is None or n < tokens:  # without a planted count, streams until the client leaves
        if n:
            await asyncio.sleep(plan.get("fake_token_gap_s", 0.01))
        await response.write(event(f'"content": "t{n} "'))
        n += 1
    last = time.monotonic()
    await response.write(b"data: [DONE]\n\n")
    endpoint = request.app["traces"]
    if endpoint:
        rid = request.headers.get("X-Request-ID", "none")
        timing = {"queue": scheduled - arrival, "prefill": first - scheduled, "decode": last - first,
                  "e2e": last - arrival}  # fmt: skip
        await export_span(endpoint, f"chatcmpl-{rid}", timing, n)
    return response


async def export_span(endpoint: str, engine_id: str, t: dict[str, float], tokens: int) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    attributes = [
        KeyValue(key="gen_ai.request.id", value=AnyValue(string_value=engine_id)),
        KeyValue(key="gen_ai.latency.time_in_queue", value=AnyValue(double_value=t["queue"])),
        KeyValue(key="gen_ai.latency.time_in_model_prefill", value=AnyValue(double_value=t["prefill"])),
        KeyValue(key="gen_ai.latency.time_in_model_decode", value=AnyValue(double_value=t["decode"])),
        KeyValue(key="gen_ai.latency.e2e", value=AnyValue(double_value=t["e2e"])),
        KeyValue(key="gen_ai.usage.prompt_tokens", value=AnyValue(int_value=7)),
        KeyValue(key="gen_ai.usage.completion_tokens", value=AnyValue(int_value=tokens)),
    ]
    span = Span(name="llm_request", attributes=attributes)
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    async with ClientSession() as session, session.post(endpoint, data=body.SerializeToString()) as resp:
        assert resp.status == 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enable-request-id-headers", action="store_true")
    parser.add_argument("--otlp-traces-endpoint")
    args, rest = parser.parse_known_args()

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    record(f"server {os.getpid()}")
    record(f"worker {worker.pid}")
    record("args " + " ".join(rest))

    def on_term(signum: int, frame: object) -> None:
        record("sigterm")
        if os.environ.get("FAKE_ENGINE_IGNORE_TERM") == "1":
            return
        worker.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    say(f"version 0.0.0 model {args.model}")
    say("[core.py:133] Initializing a V1 LLM engine (v0.0.0) with config: model=...")
    say(f"[cpu_model_runner.py:68] Starting to load model {args.model}...")
    exit_code = os.environ.get("FAKE_ENGINE_EXIT")
    if exit_code:
        print("Traceback (most recent call last):\nRuntimeError: fake engine failure", flush=True)
        worker.kill()
        sys.exit(int(exit_code))
    say("[kv_cache_utils.py:2327] CPU KV cache size: 1,000 tokens")
    say(f"[entry.py:140] Starting vLLM server on http://{args.host}:{args.port}")

    app = web.Application()
    app["served_name"] = args.served_model_name
    app["traces"] = args.otlp_traces_endpoint
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=lambda *a: print("INFO:     Application startup complete.", flush=True),
        handle_signals=False,
    )


if __name__ == "__main__":
    main()
