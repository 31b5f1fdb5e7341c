"""Two real CPU vLLMs behind one flushgate: a conversation stays where its prefix is cached, and killing one
engine mid-load loses no request that had not started streaming."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ollama
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from flushgate.proxy.affinity import affinity_key
from flushgate.proxy.pool import url_hash
from flushgate.proxy.router import rendezvous_score
from tests.real.conftest import MODEL_DIR, GatewayProcess
from tests.real.vllm_engines import VllmServer, start_engines

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(600)]  # the first test also waits for two engines
MODEL = "smollm2-135m-instruct"
# ~330 tokens: more than two of the CPU build's 128-token KV cache blocks, so a repeated prefix is a cache hit.
SYSTEM = "You are a concise travel assistant. Answer in one short sentence, in English. " * 22
BLOCK_TOKENS = 128
GUARD_S = 120


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    from flushgate.engine.embedded_model import ensure_smollm2

    if not MODEL_DIR.exists():
        ensure_smollm2(MODEL_DIR)
    servers = start_engines(MODEL_DIR, 2, tmp_path_factory.mktemp("vllm"))
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gateway(engines: list[VllmServer]) -> Iterator[GatewayProcess]:
    # Active checks off: what the gateway learns about a dead engine here, it learns from requests alone; and an
    # ejection outlasts the test, so nothing depends on how long the requests take.
    upstreams = [arg for engine in engines for arg in ("--upstream", engine.url)]
    process = GatewayProcess(
        *upstreams, "--routing", "prefix-affinity", "--health-interval", "0", "--eject-time", "600"
    )
    yield process
    process.stop()


def client_of(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=GUARD_S)


def opening(question: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def preferred_engine(messages: list[ChatCompletionMessageParam], urls: list[str]) -> str:
    """The engine prefix affinity picks for a conversation, worked out as the router does."""
    key = affinity_key(orjson.dumps({"model": MODEL, "messages": messages}))
    assert key is not None
    return max(urls, key=lambda url: rendezvous_score(key, url_hash(url)))


def conversations_for(
    engine: VllmServer, urls: list[str], count: int, tag: str
) -> list[list[ChatCompletionMessageParam]]:
    found: list[list[ChatCompletionMessageParam]] = []
    i = 0
    while len(found) < count:
        messages = opening(f"{tag} {i}: name one thing to see in Lyon.")
        if preferred_engine(messages, urls) == engine.url:
            found.append(messages)
        i += 1
    return found


def record_of(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    return gateway.wait_event("request", timeout_s=GUARD_S, where=lambda event: event["request_id"] == request_id)


async def test_affinity_keeps_a_multi_turn_conversation_on_the_engine_that_has_its_prefix_cached(
    engines: list[VllmServer], gateway: GatewayProcess
) -> None:
    client = client_of(gateway)
    messages = opening("Plan a morning in Lyon.")
    hits_before = [engine.counter("vllm:prefix_cache_hits") for engine in engines]
    queries_before = [engine.counter("vllm:prefix_cache_queries") for engine in engines]
    turns = 4
    try:
        for turn in range(turns):
            reply = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=12,
                temperature=0,
                extra_headers={"X-Request-ID": f"affinity-turn-{turn}"},
            )
            text = reply.choices[0].message.content or ""
            messages = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "And next?"}]
    finally:
        await client.close()
    served = {record_of(gateway, f"affinity-turn-{turn}")["engine"] for turn in range(turns)}
    assert len(served) == 1
    home = next(i for i, engine in enumerate(engines) if engine.url in served)
    other = 1 - home
    hits = engines[home].counter("vllm:prefix_cache_hits") - hits_before[home]
    assert hits >= (turns - 1) * 2 * BLOCK_TOKENS  # every later turn found at least the system prompt cached
    assert engines[other].counter("vllm:prefix_cache_queries") == queries_before[other]


async def test_an_ollama_conversation_stays_on_one_engine_too(
    engines: list[VllmServer], gateway: GatewayProcess
) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Plan an evening in Lyon."},
    ]
    queries_before = [engine.counter("vllm:prefix_cache_queries") for engine in engines]
    turns = 3
    for turn in range(turns):
        client = ollama.AsyncClient(host=gateway.url, timeout=GUARD_S, headers={"X-Request-ID": f"ollama-turn-{turn}"})
        reply = await client.chat(model=MODEL, messages=messages, options={"num_predict": 12, "temperature": 0})
        messages += [
            {"role": "assistant", "content": reply.message.content or ""},
            {"role": "user", "content": "More?"},
        ]
    records = [record_of(gateway, f"ollama-turn-{turn}") for turn in range(turns)]
    assert {record["api"] for record in records} == {"ollama"}
    served = {record["engine"] for record in records}
    assert len(served) == 1
    other = next(i for i, engine in enumerate(engines) if engine.url not in served)
    assert engines[other].counter("vllm:prefix_cache_queries") == queries_before[other]


@dataclass
class Outcome:
    chunks: int = 0
    done: bool = False
    error_code: object = None


async def stream_chat(
    client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], request_id: str, started: asyncio.Event
) -> Outcome:
    outcome = Outcome()
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            max_tokens=64,
            extra_body={"ignore_eos": True},  # a known length, so the stream is still running when its engine dies
            extra_headers={"X-Request-ID": request_id},
        )
        async for _chunk in stream:
            outcome.chunks += 1
            started.set()
        outcome.done = True
    except openai.APIStatusError as exc:  # an HTTP error status instead of a stream: the request was lost
        outcome.error_code = exc.status_code
    except openai.APIError as exc:  # the stream's terminal error event
        outcome.error_code = exc.body.get("code") if isinstance(exc.body, dict) else exc.body
    return outcome


async def test_killing_an_engine_mid_load_loses_no_request_that_had_not_started_streaming(
    engines: list[VllmServer], gateway: GatewayProcess
) -> None:
    victim, survivor = engines
    urls = [engine.url for engine in engines]
    client = client_of(gateway)
    try:
        on_victim = conversations_for(victim, urls, 2, "before, victim")
        on_survivor = conversations_for(survivor, urls, 2, "before, survivor")
        started = {f"before-{i}": asyncio.Event() for i in range(4)}
        running = [
            asyncio.create_task(stream_chat(client, messages, rid, started[rid]))
            for rid, messages in zip(started, [*on_victim, *on_survivor], strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(started[f"before-{i}"].wait() for i in range(2))), GUARD_S)
        victim.kill()  # both of its streams have started; the survivor's two are running too

        later = [
            msgs for pair in zip(conversations_for(victim, urls, 3, "after, victim"),
                                 conversations_for(survivor, urls, 3, "after, survivor"), strict=True)
            for msgs in pair
        ]  # fmt: skip
        after = [await stream_chat(client, msgs, f"after-{i}", asyncio.Event()) for i, msgs in enumerate(later)]
        before = await asyncio.wait_for(asyncio.gather(*running), GUARD_S)
    finally:
        await client.close()

    # Streams that had started on the killed engine end with the terminal error event, not silently.
    for outcome in before[:2]:
        assert outcome.chunks >= 1
        assert not outcome.done
        assert outcome.error_code == "upstream_disconnected"
    # Everything else completes: the survivor's streams, and every request sent after the kill.
    assert all(outcome.done for outcome in before[2:])
    assert all(outcome.done and outcome.chunks > 1 for outcome in after)
    records = [record_of(gateway, f"after-{i}") for i in range(len(later))]
    assert all(record["engine"] == survivor.url for record in records)
    # The first one that preferred the dead engine was tried there first, before any byte went to its client.
    assert [attempt["engine"] for attempt in records[0]["failover"]] == [victim.url]
    assert all("failover" not in record for record in records[1:])  # the dead engine was out of rotation by then
