"""flushgate in front of a real vLLM it manages: text, usage, request ids and aborts, end to end."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from tests.real.conftest import GatewayProcess, engine_gauge

MODEL = "smollm2-135m-instruct"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


async def running_requests(session: aiohttp.ClientSession, engine_url: str) -> float:
    async with session.get(engine_url + "/metrics") as resp:
        return engine_gauge(await resp.text(), "vllm:num_requests_running")


async def until_no_request_runs(session: aiohttp.ClientSession, engine_url: str, within_s: float) -> float:
    """Seconds until vLLM reports no running request; fails after ``within_s``."""
    start = time.monotonic()
    while await running_requests(session, engine_url) > 0:
        if time.monotonic() - start > within_s:
            pytest.fail(f"vLLM still had running requests {within_s} s after the client left")
        await asyncio.sleep(0.05)  # vLLM publishes this only as a polled gauge
    return time.monotonic() - start


async def engine_idle(session: aiohttp.ClientSession, engine_url: str) -> None:
    """The shared engine runs nothing of an earlier test's, so the counts below are this test's own."""
    start = time.monotonic()
    while (running := await running_requests(session, engine_url)) > 0:
        assert time.monotonic() - start < 30, f"the engine still runs {running} requests from before this test"
        await asyncio.sleep(0.05)


async def test_streamed_chat_has_the_real_answer_and_usage(smol_gateway: GatewayProcess) -> None:
    client = openai.AsyncOpenAI(base_url=smol_gateway.url + "/v1", api_key="none", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            stream=True,
            temperature=0,
            max_tokens=32,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage: CompletionUsage | None = None
        finish: str | None = None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    finally:
        await client.close()
    text = "".join(pieces)
    assert "Paris" in text
    assert len([p for p in pieces if p]) > 3, "the answer arrived in one piece, not streamed"
    assert usage is not None
    assert finish in ("stop", "length")
    assert 0 < usage.completion_tokens <= 32
    async with aiohttp.ClientSession() as session:
        async with session.post(smol_gateway.url + "/tokenize", json={"model": MODEL, "messages": QUESTION}) as resp:
            assert resp.status == 200
            assert usage.prompt_tokens == (await resp.json())["count"]
        async with session.get(smol_gateway.url + "/metrics") as resp:
            # The official client's requests are plain POSTs: the gateway's own HTTP server answered them.
            assert engine_gauge(await resp.text(), "flushgate_own_server_requests_total") >= 2


async def test_the_request_id_reaches_vllm_and_comes_back(smol_gateway: GatewayProcess) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            smol_gateway.url + "/v1/chat/completions", json=body, headers={"X-Request-ID": "fg-test-7"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "fg-test-7"
        assert (await resp.json())["id"] == "chatcmpl-fg-test-7"


async def test_a_client_leaving_mid_stream_stops_the_generation(smol_gateway: GatewayProcess) -> None:
    engine_url = smol_gateway.engine["url"]
    body = {"model": MODEL, "messages": QUESTION, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        await engine_idle(session, engine_url)
        resp = await session.post(smol_gateway.url + "/v1/chat/completions", json=body)
        for _ in range(3):
            assert (await resp.content.readany()).startswith(b"data: ")
        assert await running_requests(session, engine_url) == 1
        resp.close()
        await until_no_request_runs(session, engine_url, within_s=2.0)


async def test_a_client_leaving_before_a_non_streamed_answer_stops_the_generation(
    smol_gateway: GatewayProcess,
) -> None:
    engine_url = smol_gateway.engine["url"]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        await engine_idle(session, engine_url)
        request = asyncio.create_task(session.post(smol_gateway.url + "/v1/chat/completions", json=body))
        start = time.monotonic()
        while await running_requests(session, engine_url) < 1:
            assert time.monotonic() - start < 30, "the request never started running"
            await asyncio.sleep(0.05)
        request.cancel()  # closes the client's connection
        await until_no_request_runs(session, engine_url, within_s=2.0)


async def test_readyz_reports_the_ready_engine_and_its_model(smol_gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(smol_gateway.url + "/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["ready"] is True
    assert body["engine"]["state"] == "ready"
    assert body["engine"]["model"] == MODEL


async def test_the_record_joins_vllms_own_timing_for_the_request(smol_gateway: GatewayProcess) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "ignore_eos": True, "stream": True}
    mark = smol_gateway.mark()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            smol_gateway.url + "/v1/chat/completions", json=body, headers={"X-Request-ID": "joined-1"}
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()
    record = await asyncio.to_thread(
        smol_gateway.wait_event, "request", after=mark, timeout_s=30, where=lambda e: e["request_id"] == "joined-1"
    )
    assert record["model"] == MODEL
    assert record["stream"] is True
    assert record["tokens"] == 16  # vLLM's own count, from its span
    split = record["split"]
    assert split["engine_prefill_ms"] > 0
    assert split["engine_decode_ms"] > 0
    assert split["engine_queue_ms"] >= 0
    assert record["first_token_ms"] >= record["upstream_ttfb_ms"]
    assert sum(split.values()) == pytest.approx(record["total_ms"], abs=0.01)
    # the engine's decode time matches what the gateway saw between first and last token, within 10 %
    seen = record["last_token_ms"] - record["first_token_ms"]
    assert split["engine_decode_ms"] == pytest.approx(seen, rel=0.1, abs=5)


async def test_a_connection_idle_past_vllms_default_keep_alive_still_carries_the_next_request(
    smol_gateway: GatewayProcess,
) -> None:
    """The managed engine is started to keep idle connections a second longer than the gateway does (60 s), so
    the next message of a conversation after a pause needs no new connection; vLLM's own default is 5 s."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}

    async def ask(request_id: str) -> dict[str, object]:
        mark = smol_gateway.mark()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                smol_gateway.url + "/v1/chat/completions", json=body, headers={"X-Request-ID": request_id}
            ) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        return await asyncio.to_thread(
            smol_gateway.wait_event, "request", after=mark, timeout_s=30, where=lambda e: e["request_id"] == request_id
        )

    await ask("keepalive-1")
    await asyncio.sleep(6.5)  # what is tested: an idle time longer than vLLM's default, not a wait for an event
    second = await ask("keepalive-2")
    assert second["upstream_reused"] is True
