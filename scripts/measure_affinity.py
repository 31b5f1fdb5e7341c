"""Prefix affinity against least-outstanding routing, measured on two real CPU vLLMs behind flushgate.

The same workload runs once per routing mode, over the same two engines: concurrent multi-turn conversations that
share a long system prompt, each turn resending the whole history, each user pausing a while (seeded, the same in
both runs) before the next turn, as people do. What each mode gets from vLLM's prefix cache
is read from the engines' own counters (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``), and the
time to first token as the client sees it. Each mode's conversations open with their own words, so neither run
finds the other's prompts cached.

    .venv/bin/python -m scripts.measure_affinity --out docs/scaling/affinity-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from scripts.machine_info import machine
from tests.real.conftest import MODEL_DIR, GatewayProcess
from tests.real.vllm_engines import VllmServer, start_engines

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a concise travel assistant. Answer in one short sentence, in English. " * 22
CITIES = ["Lyon", "Porto", "Kyoto", "Quito", "Oslo", "Tunis", "Hanoi", "Perth", "Cusco", "Riga", "Bruges", "Fez"]
FOLLOW_UPS = ["And in the afternoon?", "Where should I eat?", "What about the evening?", "One more tip?"]


async def conversation(
    client: openai.AsyncOpenAI, mode: str, index: int, turns: int, max_tokens: int, think_s: float
) -> list[dict[str, Any]]:
    pauses = random.Random(index)
    city = CITIES[index % len(CITIES)]
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": f"[{mode} run] " + SYSTEM},
        {"role": "user", "content": f"Plan a morning in {city} (trip {index})."},
    ]
    results = []
    for turn in range(turns):
        await asyncio.sleep(pauses.uniform(0, think_s))  # the user reading and typing
        request_id = f"{mode}-{index}-{turn}"
        sent = time.perf_counter()
        first: float | None = None
        text = []
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            max_tokens=max_tokens,
            temperature=0,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-ID": request_id},
        )
        prompt_tokens = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
        assert first is not None, f"{request_id}: no text came back"
        results.append(
            {"id": request_id, "turn": turn, "ttft_ms": (first - sent) * 1000, "prompt_tokens": prompt_tokens}
        )
        follow_up = FOLLOW_UPS[turn % len(FOLLOW_UPS)]
        messages = [*messages, {"role": "assistant", "content": "".join(text)}, {"role": "user", "content": follow_up}]
    return results


def record_of(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    return gateway.wait_event("request", timeout_s=60, where=lambda event: event["request_id"] == request_id)


def cache_counters(engines: list[VllmServer]) -> list[tuple[float, float]]:
    return [(e.counter("vllm:prefix_cache_hits"), e.counter("vllm:prefix_cache_queries")) for e in engines]


async def run_mode(engines: list[VllmServer], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    conversations, turns = args.conversations, args.turns
    upstreams = [arg for engine in engines for arg in ("--upstream", engine.url)]
    gateway = GatewayProcess(*upstreams, "--routing", mode, "--health-interval", "0")
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=300)
    before = cache_counters(engines)

    async def one(index: int) -> list[dict[str, Any]]:
        return await conversation(client, mode, index, turns, args.max_tokens, args.think_s)

    started = time.perf_counter()
    try:
        turns_done = [t for conv in await asyncio.gather(*(one(i) for i in range(conversations))) for t in conv]
    finally:
        await client.close()
    wall_s = time.perf_counter() - started
    records = {t["id"]: record_of(gateway, t["id"]) for t in turns_done}
    gateway.stop()
    after = cache_counters(engines)
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    engines_per_conversation = [
        len({records[f"{mode}-{i}-{turn}"]["engine"] for turn in range(turns)}) for i in range(conversations)
    ]
    later = [t["ttft_ms"] for t in turns_done if t["turn"] > 0]
    return {
        "mode": mode,
        "requests": len(turns_done),
        "wall_s": round(wall_s, 2),
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_query_tokens": queries,
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
        "per_engine_query_tokens": [a[1] - b[1] for a, b in zip(after, before, strict=True)],
        "engines_per_conversation_mean": statistics.fmean(engines_per_conversation),
        "ttft_ms_turn1_p50": round(statistics.median(t["ttft_ms"] for t in turns_done if t["turn"] == 0), 1),
        "ttft_ms_later_turns_p50": round(statistics.median(later), 1),
        "ttft_ms_later_turns_mean": round(statistics.fmean(later), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8, help="users chatting at the same time")
    parser.add_argument("--think-s", type=float, default=2.0, help="longest pause of a user between turns")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs:
        engines = start_engines(MODEL_DIR, 2, Path(logs))
        try:
            results = [asyncio.run(run_mode(engines, mode, args)) for mode in ("least-outstanding", "prefix-affinity")]
        finally:
            for engine in engines:
                engine.stop()
    report = {
        "what": "two CPU vLLM engines (SmolLM2-135M-Instruct, cpu preset, one core each) behind one flushgate",
        "workload": vars(args) | {"out": None, "system_prompt_tokens_approx": 330},
        "machine": machine(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
