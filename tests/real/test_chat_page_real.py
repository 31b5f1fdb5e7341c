"""The chat page in headless Chromium against flushgate managing a real CPU vLLM (SmolLM2-135M-Instruct): the
answer streams in as the engine makes it, Stop stops the engine, the thinking switch reaches the request."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
from playwright.async_api import expect

from tests.chat_browser import chat_page
from tests.real.conftest import GatewayProcess, engine_gauge

MODEL = "smollm2-135m-instruct"
STORY = "Write a long story about a dragon who learns to bake bread."

# Records, on every change of the newest answer's text, when it happened and how long the text was.
SAMPLE_ANSWER_LENGTH = """() => {
    window.__samples = [];
    const transcript = document.getElementById("transcript");
    new MutationObserver(() => {
        const bodies = transcript.querySelectorAll(".message.assistant .body");
        const length = bodies.length ? bodies[bodies.length - 1].textContent.length : 0;
        const last = window.__samples[window.__samples.length - 1];
        if (length && (!last || last[1] !== length)) window.__samples.push([performance.now(), length]);
    }).observe(transcript, { childList: true, subtree: true, characterData: true });
}"""


# write_blocked_ms: time the gateway spent in writes to the page (a socket the page did not empty slows them).
RECORD_KEYS = (
    "chunks",
    "events_out",
    "first_token_ms",
    "last_token_ms",
    "gap_p50_ms",
    "gap_max_ms",
    "write_blocked_ms",
)
# Records every read of a response body in the page: when, and how many bytes it brought.
RECORD_READS = """() => {
    window.__reads = [];
    const read = ReadableStreamDefaultReader.prototype.read;
    ReadableStreamDefaultReader.prototype.read = async function () {
        const result = await read.call(this);
        if (result.value) window.__reads.push([performance.now(), result.value.length]);
        return result;
    };
}"""


async def running_requests(engine_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(engine_url + "/metrics") as resp:
        return engine_gauge(await resp.text(), "vllm:num_requests_running")


async def until_running(engine_url: str, count: float, within_s: float) -> None:
    """Polls vLLM's gauge (it publishes no event) until it shows ``count`` running requests."""
    deadline = time.monotonic() + within_s
    while (running := await running_requests(engine_url)) != count:
        assert time.monotonic() < deadline, f"vLLM had {running} running requests, not {count}, after {within_s} s"
        await asyncio.sleep(0.05)


async def test_the_page_loads_and_offers_the_engines_model(smol_gateway: GatewayProcess, tmp_path: Path) -> None:
    async with chat_page(tmp_path) as chat:
        await chat.open(smol_gateway.url)
        await expect(chat.page).to_have_title("flushgate chat")
        assert await chat.page.locator("#model option").all_inner_texts() == [MODEL]
        await expect(chat.page.locator("#send")).to_be_enabled()
        await expect(chat.page.locator("#status")).to_have_text("")
        assert chat.errors == []


async def test_an_answer_grows_in_the_page_while_vllm_generates_it(
    smol_gateway: GatewayProcess, tmp_path: Path
) -> None:
    async with chat_page(tmp_path) as chat:
        await chat.open(smol_gateway.url)
        await chat.page.fill("#max-tokens", "64")
        await chat.page.evaluate(SAMPLE_ANSWER_LENGTH)
        await chat.page.evaluate(RECORD_READS)
        mark = smol_gateway.mark()
        answer = await chat.ask(STORY)
        await chat.wait_finished(answer)
        samples: list[list[float]] = await chat.page.evaluate("window.__samples")
        reads: list[list[float]] = await chat.page.evaluate("window.__reads")
        final = len(await answer.locator(".body").text_content() or "")
        parts = await answer.locator(".split-legend .part").evaluate_all("nodes => nodes.map(n => n.dataset.part)")
        strip = await answer.locator(".strip").inner_text()
        await chat.screenshot("chat-page.png")
        assert chat.errors == []
    record = smol_gateway.wait_event("request", after=mark, where=lambda e: e["path"] == "/v1/chat/completions")
    # Where a lump formed, if one did: the page's reads (ms, bytes) and the gateway's reads of vLLM.
    seen = f"page reads {reads}; gateway: " + ", ".join(f"{key} {record.get(key)}" for key in RECORD_KEYS)
    times = [at for at, _ in samples]
    lengths = [length for _, length in samples]
    assert lengths[-1] == final
    assert len(samples) >= 10, f"the answer appeared in only {len(samples)} steps: {samples}; {seen}"
    assert lengths == sorted(lengths)
    assert lengths[0] < final / 4, f"most of the answer arrived at once: {samples}; {seen}"
    assert times[-1] - times[0] > 200, f"the whole answer was painted within 0.2 s: {samples}; {seen}"
    # vLLM's own timing reached the strip: the split has the engine's queue, prefill and decode
    assert parts == [
        "client_link_ms",
        "gateway_ms",
        "engine_queue_ms",
        "engine_prefill_ms",
        "engine_decode_ms",
        "engine_frontend_ms",
    ]
    assert re.search(r"TTFT [\d.]+ m?s", strip)
    assert re.search(r"(?<!≈ )[\d.]+ tok/s", strip)  # vLLM's decode rate, not the page's estimate
    tokens = re.search(r"(\d+) tokens", strip)
    assert tokens is not None
    assert 0 < int(tokens.group(1)) <= 64


async def test_stop_ends_the_stream_and_vllm_stops_generating(smol_gateway: GatewayProcess, tmp_path: Path) -> None:
    engine_url = smol_gateway.engine["url"]
    async with chat_page(tmp_path) as chat:
        await chat.open(smol_gateway.url)
        answer = await chat.ask(STORY)  # no token limit: only Stop ends it early
        await expect(answer.locator(".body")).not_to_be_empty(timeout=60_000)
        await until_running(engine_url, 1, within_s=10)
        await chat.page.click("#stop")
        await chat.wait_finished(answer, "stopped", timeout_s=10)
        await until_running(engine_url, 0, within_s=3)
        stopped_at = await answer.locator(".body").text_content()
        await expect(chat.page.locator("#send")).to_be_enabled()
        assert await answer.locator(".body").text_content() == stopped_at
        assert chat.errors == []


async def test_the_thinking_switch_is_sent_with_each_request(smol_gateway: GatewayProcess, tmp_path: Path) -> None:
    async with chat_page(tmp_path) as chat:
        await chat.open(smol_gateway.url)
        await chat.page.fill("#max-tokens", "4")
        await chat.page.uncheck("#thinking")
        await chat.wait_finished(await chat.ask("Hi"))
        await chat.page.check("#thinking")
        second = await chat.ask("What is the capital of France?")
        await chat.wait_finished(second)
        await expect(second.locator(".body")).not_to_be_empty()
        assert chat.errors == []
    first_request, second_request = chat.chat_requests
    assert first_request["chat_template_kwargs"] == {"enable_thinking": False}
    assert second_request["chat_template_kwargs"] == {"enable_thinking": True}
    assert [m["role"] for m in second_request["messages"]] == ["user", "assistant", "user"]
    assert second_request["max_tokens"] == 4
