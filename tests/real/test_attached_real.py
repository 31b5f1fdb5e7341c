"""Gateways attached to the shared real CPU vLLM (SmolLM2-135M-Instruct): ``--workers 2`` serving one port (and
its ``/metrics`` answering for both), and the chat page behind ``--api-key``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from playwright.async_api import expect

from tests.chat_browser import chat_page
from tests.real.conftest import GatewayProcess
from tests.real.test_chat_page_real import running_requests
from tests.test_security import CHUNKED_HEAD, answer_after, openai_error
from tests.test_workers import WorkerGroup, completed_by_worker, request_id_is

MODEL = "smollm2-135m-instruct"
KEY = "real-page-key"


@pytest.fixture
def keyed_gateway(smol_gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess("--upstream", smol_gateway.engine["url"], env={"FLUSHGATE_API_KEY": KEY})
    yield gateway
    gateway.stop()


async def capital_of_france(base: str, headers: dict[str, str] | None = None) -> str:
    """The answer through the official ``openai`` client, a new one (so a new connection) each time."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            extra_headers=headers,
        )
    finally:
        await client.close()
    return reply.choices[0].message.content or ""


async def test_two_workers_on_one_port_both_answer_with_the_real_engine(smol_gateway: GatewayProcess) -> None:
    group = await WorkerGroup.start(smol_gateway.engine["url"], 2)
    try:
        listening = [await group.event("listening") for _ in range(2)]
        assert sorted(event["worker"] for event in listening) == [0, 1]
        served: dict[int, int] = {}
        for i in range(32):  # a new client, so a new connection, each time: the kernel picks the worker
            assert "Paris" in await capital_of_france(group.base, {"X-Request-ID": f"workers-{i}"})
            record = await group.event("request", request_id_is(f"workers-{i}"))
            served[record["worker"]] = served.get(record["worker"], 0) + 1
            if len(served) == 2:
                break
        assert sorted(served) == [0, 1]
        # /metrics, from whichever worker a scrape reaches, counts both workers' requests, each under its own label
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(4):
                async with http.get(group.base + "/metrics") as resp:
                    text = await resp.text()
                assert completed_by_worker(text) == served
    finally:
        await group.kill()


async def test_the_chat_page_asks_for_the_key_and_streams_the_real_answer(
    keyed_gateway: GatewayProcess, tmp_path: Path
) -> None:
    async with chat_page(tmp_path) as chat:
        await chat.page.goto(keyed_gateway.url + "/")
        await expect(chat.page.locator("#status")).to_contain_text("no API key given")
        await chat.page.fill("#api-key", KEY)
        await chat.page.press("#api-key", "Enter")
        await expect(chat.page.locator("#model option")).to_have_count(1)
        answer = await chat.ask("What is the capital of France?")
        await chat.wait_finished(answer)
        await expect(answer.locator(".body")).to_contain_text("Paris")


async def test_a_stalled_request_body_gets_408_and_leaves_the_real_engine_serving(
    smol_gateway: GatewayProcess,
) -> None:
    """A chat whose body stops (chunked, streamed on to vLLM; and one short of its Content-Length) gets 408, the
    engine's request is closed, vLLM runs nothing afterwards, and the next chat answers."""
    engine = smol_gateway.engine["url"]
    gateway = GatewayProcess("--upstream", engine, "--body-timeout", "0.5")
    try:
        port = int(gateway.url.rsplit(":", 1)[1])
        body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "Hi"}]}'
        chunked = CHUNKED_HEAD + b"%x\r\n%b\r\n" % (len(body) // 2, body[: len(body) // 2])
        short = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        for sent in (chunked, short + body[:10]):
            answer, after = await answer_after(port, sent)
            assert answer.status == 408
            assert openai_error(answer.json())["code"] == "request_body_timeout"
            assert after >= 0.5
        assert await running_requests(engine) == 0
        assert "Paris" in await capital_of_france(gateway.url)
    finally:
        gateway.stop()
