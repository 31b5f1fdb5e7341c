"""The chat page in real headless Chromium, in front of a scriptable engine: what it shows, what it sends, and
that model output can never become markup or script."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from playwright.async_api import Response, expect

from flushgate.config import Access, Config
from flushgate.proxy.chat_page import PAGE_DIR
from flushgate.server import Server
from tests.chat_browser import chat_page
from tests.fakes import FakeUpstream, sse_chunk, start_stream

GUARD_S = 30  # deadlock guard only
DONE = b"data: [DONE]\n\n"
MODELS = {"object": "list", "data": [{"id": "fake-model", "object": "model"}, {"id": "other-model", "object": "model"}]}
Chat = Callable[[web.Request], Awaitable[web.StreamResponse]]


def delta_event(**delta: str) -> bytes:
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def engine(chat: Chat, bodies: list[dict[str, Any]] | None = None) -> Chat:
    """An engine with two models whose chat endpoint is ``chat``; request bodies are kept in ``bodies``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response(MODELS)
        if request.path != "/v1/chat/completions":  # e.g. /tokenize, which this engine does not serve
            return web.json_response({"error": {"message": "not found"}}, status=404)
        if bodies is not None:
            bodies.append(orjson.loads(await request.read()))
        return await chat(request)

    return handle


def streams(*chunks: bytes) -> Chat:
    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for chunk in chunks:
            await response.write(chunk)
        return response

    return chat


# --- the route, without a browser ---------------------------------------------------------------------------------


async def test_root_serves_the_page_to_browsers_and_ollamas_answer_to_other_clients(
    gateway_url: str, http: aiohttp.ClientSession
) -> None:
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    async with http.get(gateway_url + "/", headers={"Accept": browser_accept}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert b'<script type="module" src="/ui/chat.js">' in await resp.read()
    async with http.head(gateway_url + "/", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
    for accept in ("*/*", "application/json", "text/html;q=0", ""):
        async with http.get(gateway_url + "/", headers={"Accept": accept}) as resp:
            assert (resp.status, await resp.text()) == (200, "Ollama is running"), accept
    async with http.head(gateway_url + "/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"


async def test_page_assets_are_served_with_their_types_and_nothing_else_is(
    gateway_url: str, http: aiohttp.ClientSession
) -> None:
    for name, content_type in [("chat.js", "text/javascript"), ("chat.css", "text/css"), ("icon.svg", "image/svg+xml")]:
        async with http.get(f"{gateway_url}/ui/{name}") as resp:
            assert resp.status == 200, name
            assert resp.content_type == content_type, name
            assert await resp.read() == (PAGE_DIR / name).read_bytes()
    for name in ("missing.js", "index.html", "..%2Fchat_page.py", "%2E%2E%2Fapp.py"):
        async with http.get(f"{gateway_url}/ui/{name}") as resp:
            assert resp.status == 404, name
            assert (await resp.json())["error"]["code"] == "not_found", name


def test_page_scripts_never_turn_strings_into_markup_or_code() -> None:
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc")
    for script in PAGE_DIR.glob("*.js"):
        found = [line for line in script.read_text().splitlines() if sinks.search(line)]
        assert found == [], f"{script.name} uses an HTML or code sink: {found}"


# --- in the browser -----------------------------------------------------------------------------------------------


async def test_each_chunk_is_painted_while_the_stream_is_still_open(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    more = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("Hello"))
        await asyncio.wait_for(more.wait(), GUARD_S)  # the rest only once the page has shown the first piece
        await response.write(sse_chunk(", world"))
        await response.write(DONE)
        return response

    fake.handler = engine(held)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        answer = await chat.ask("Hi")
        await expect(answer.locator(".body")).to_have_text("Hello")
        assert await answer.get_attribute("data-state") == "streaming"
        await expect(answer.locator(".strip .ttft")).to_have_text(re.compile(r"TTFT [\d.]+ m?s"))
        more.set()
        await chat.wait_finished(answer)
        await expect(answer.locator(".body")).to_have_text("Hello, world")
        assert chat.errors == []


async def test_hostile_model_output_is_shown_as_text_and_runs_no_script(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    hostile = [
        '<img src=x onerror="window.__pwned=1">',
        "<script>window.__pwned=2</script>",
        '<iframe srcdoc="<script>parent.__pwned=3</script>"></iframe>',
        "[click me](javascript:window.__pwned=4)",
        '**<svg onload="window.__pwned=5">**',
        '```html\n<b onmouseover="window.__pwned=6">code</b>\n```',
    ]
    text = "\n\n".join(hostile)
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]  # markup split across chunks, as a model emits it
    fake.handler = engine(
        streams(
            delta_event(reasoning_content="<img src=y onerror=\"window.__pwned='reasoning'\">"),
            *(sse_chunk(piece) for piece in pieces),
            DONE,
        )
    )
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        answer = await chat.ask("Say something nasty")
        await chat.wait_finished(answer)
        shown = await answer.locator(".body").inner_text()
        for needle in ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=2</script>"]:
            assert needle in shown
        assert '<svg onload="window.__pwned=5">' in shown
        assert "<iframe srcdoc=" in shown
        assert "[click me](javascript:window.__pwned=4)" in shown
        assert '<b onmouseover="window.__pwned=6">code</b>' in await answer.locator(".body pre code").inner_text()
        assert "onerror" in (await answer.locator(".reasoning-body").text_content() or "")
        assert await answer.locator("img, script, iframe, svg, b, a").count() == 0
        assert await answer.locator("strong").count() == 1  # Markdown still applies around the text
        for element in await answer.locator("*").all():
            attributes = await element.evaluate("node => [...node.attributes].map(a => a.name)")
            assert not [name for name in attributes if name.startswith("on")]
        await answer.locator(".body pre code").hover()
        assert await chat.page.evaluate("window.__pwned") is None
        assert chat.errors == []
        await chat.screenshot("chat-page-hostile.png")


async def test_event_stream_parsing_survives_any_split_of_the_bytes(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    fake.handler = engine(streams(DONE))
    stream = (
        b": keep-alive\n\n"
        + 'data: {"text":"café 🚀"}\r\n\r\n'.encode()
        + b"event: delta\ndata: line one\ndata:line two\n\n"
        + b'data: {"half": 1}\r\rdata:\n\n'
        + b': flushgate-timing {"total_ms": 1.5}\n\n'
        + b"data: [DONE]\n\n"
    )
    expected = [
        {"kind": "comment", "text": "keep-alive"},
        {"kind": "event", "event": "message", "data": '{"text":"café 🚀"}'},
        {"kind": "event", "event": "delta", "data": "line one\nline two"},
        {"kind": "event", "event": "message", "data": '{"half": 1}'},
        {"kind": "event", "event": "message", "data": ""},
        {"kind": "comment", "text": 'flushgate-timing {"total_ms": 1.5}'},
        {"kind": "event", "event": "message", "data": "[DONE]"},
    ]
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        results = await chat.page.evaluate(
            """async (bytes) => {
                const { SseDecoder } = await import("/ui/sse.js");
                const all = new Uint8Array(bytes);
                const parse = (pieces) => {
                    const decoder = new SseDecoder();
                    return [...pieces.flatMap((piece) => decoder.push(piece)), ...decoder.end()];
                };
                const results = [parse([all])];
                for (let cut = 1; cut < all.length; cut++) results.push(parse([all.slice(0, cut), all.slice(cut)]));
                results.push(parse([...all].map((byte) => new Uint8Array([byte]))));
                return results;
            }""",
            list(stream),
        )
    assert len(results) == len(stream) + 1
    for at, result in enumerate(results):
        assert result == expected, f"split {at}"


async def test_markdown_becomes_elements_and_unsafe_links_stay_text(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    fake.handler = engine(streams(DONE))
    markdown = "\n".join(
        [
            "## Plan",
            "Use **bold**, *em*, `x < y` and [docs](https://example.com/a?b=1).",
            "",
            "- one",
            "- two",
            "  1. nested",
            "",
            "```python",
            'print("<b>hi</b>")',
            "```",
            "> quoted",
            "",
            "| a | b |",
            "|---|--:|",
            "| 1 | 2 |",
            "",
            "[bad](javascript:alert(1)) snake_case_name",
            "```",
            "still streaming",
        ]
    )
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        tree = await chat.page.evaluate(
            """async (text) => {
                const { renderMarkdown } = await import("/ui/markdown.js");
                const box = document.createElement("div");
                box.append(renderMarkdown(text));
                const tree = (n) => n.nodeType === Node.TEXT_NODE ? n.data : [n.nodeName.toLowerCase(),
                    ...[...n.attributes].filter((a) => a.name !== "class").map((a) => `@${a.name}=${a.value}`),
                    ...[...n.childNodes].map(tree)];
                return [...box.childNodes].map(tree);
            }""",
            markdown,
        )
    link = ["a", "@href=https://example.com/a?b=1", "@rel=noopener noreferrer nofollow", "@target=_blank", "docs"]
    assert tree == [
        ["h2", "Plan"],
        ["p", "Use ", ["strong", "bold"], ", ", ["em", "em"], ", ", ["code", "x < y"], " and ", link, "."],
        ["ul", ["li", "one"], ["li", "two", ["ol", ["li", "nested"]]]],
        ["div", ["div", "python"], ["pre", ["code", 'print("<b>hi</b>")']]],
        ["blockquote", ["p", "quoted"]],
        [
            "div",
            [
                "table",
                ["thead", ["tr", ["th", "a"], ["th", "@style=text-align: right;", "b"]]],
                ["tbody", ["tr", ["td", "1"], ["td", "@style=text-align: right;", "2"]]],
            ],
        ],
        ["p", "[bad](javascript:alert(1)) snake_case_name"],
        ["div", ["pre", ["code", "still streaming"]]],
    ]


async def test_each_turn_sends_the_history_to_the_model_picked(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    bodies: list[dict[str, Any]] = []
    fake.handler = engine(streams(sse_chunk("Paris", model="other-model"), DONE), bodies)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        assert await chat.page.locator("#model option").all_inner_texts() == ["fake-model", "other-model"]
        await chat.page.select_option("#model", "other-model")
        await chat.wait_finished(await chat.ask("Capital of France?"))
        await chat.wait_finished(await chat.ask("And of Italy?"))
        await expect(chat.page.locator(".message.user .body")).to_have_text(["Capital of France?", "And of Italy?"])
        assert chat.errors == []
    assert [body["model"] for body in bodies] == ["other-model", "other-model"]
    assert all(body["stream"] is True for body in bodies)
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
    ]


async def test_reasoning_is_shown_apart_and_folds_once_the_answer_starts(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    answer_may_start = asyncio.Event()

    async def thinks(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(delta_event(reasoning_content="The user asks "))
        await response.write(delta_event(reasoning="about France."))  # newer vLLM names the field "reasoning"
        await asyncio.wait_for(answer_may_start.wait(), GUARD_S)
        await response.write(delta_event(content="Paris."))
        await response.write(DONE)
        return response

    bodies: list[dict[str, Any]] = []
    fake.handler = engine(thinks, bodies)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        answer = await chat.ask("Capital of France?")
        reasoning = answer.locator("details.reasoning")
        await expect(reasoning.locator(".reasoning-body")).to_have_text("The user asks about France.")
        await expect(reasoning).to_have_attribute("open", "")
        answer_may_start.set()
        await chat.wait_finished(answer)
        await expect(answer.locator(".body")).to_have_text("Paris.")
        await expect(reasoning).not_to_have_attribute("open", "")
        await reasoning.locator("summary").click()
        await expect(reasoning).to_have_attribute("open", "")
        await chat.wait_finished(await chat.ask("And Italy?"))
    assert bodies[1]["messages"][1] == {"role": "assistant", "content": "Paris."}  # reasoning is not sent back


async def test_stop_aborts_the_request_and_the_gateway_closes_the_engines(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("Once upon a time"))
        await asyncio.Event().wait()
        return response

    fake.handler = engine(endless)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        answer = await chat.ask("Tell me a story")
        await expect(answer.locator(".body")).to_have_text("Once upon a time")
        await expect(chat.page.locator("#send")).to_be_disabled()
        await chat.page.click("#stop")
        await chat.wait_finished(answer, "stopped")
        await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)
        await expect(chat.page.locator("#stop")).to_be_disabled()
        await expect(chat.page.locator("#send")).to_be_enabled()
        assert chat.errors == []


async def test_engine_errors_and_broken_streams_are_shown_never_passed_off_as_answers(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    async def refuses(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": "<b>max_tokens</b> is too large", "type": "BadRequestError", "code": 400}}
        return web.json_response(error, status=400)

    async def dies(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("Half an ans"))
        assert request.transport is not None
        request.transport.abort()
        return response

    async def ends_early(request: web.Request) -> web.StreamResponse:
        return await streams(sse_chunk("No end marker"))(request)

    handlers = iter([refuses, dies, ends_early])

    async def next_behaviour(request: web.Request) -> web.StreamResponse:
        return await next(handlers)(request)

    fake.handler = engine(next_behaviour)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        refused = await chat.ask("one")
        await chat.wait_finished(refused, "error")
        await expect(refused.locator(".notice")).to_have_text("400 Bad Request: <b>max_tokens</b> is too large")
        broken = await chat.ask("two")
        await chat.wait_finished(broken, "error")
        await expect(broken.locator(".body")).to_have_text("Half an ans")
        await expect(broken.locator(".notice")).to_contain_text("ended the stream before it was complete")
        truncated = await chat.ask("three")
        await chat.wait_finished(truncated, "truncated")
        await expect(truncated.locator(".notice")).to_have_text("the stream ended before the answer was complete")
        await expect(chat.page.locator(".message.user.unanswered")).to_have_count(1)


async def test_the_strip_shows_server_timing_and_the_gateways_split(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    words = [f"w{i} " for i in range(5)]
    shown: asyncio.Queue[int] = asyncio.Queue()

    async def lockstep(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for i, word in enumerate(words):
            await response.write(sse_chunk(word))
            assert await asyncio.wait_for(shown.get(), GUARD_S) == i  # one chunk per read, so the gateway rates them
        await response.write(DONE)
        return response

    fake.handler = engine(lockstep)
    async with chat_page(tmp_path) as chat:
        await chat.open(gateway_url)
        async with chat.page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as caught:
            answer = await chat.ask("Count")
        for i in range(len(words)):
            await expect(answer.locator(".body")).to_have_text("".join(words[: i + 1]).strip())
            shown.put_nowait(i)
        response: Response = await caught.value
        await chat.wait_finished(answer)
        raw = await response.body()
        request_headers = await response.request.all_headers()
        server_timing = await response.header_value("server-timing")
        parts = await answer.locator(".split-legend .part").evaluate_all(
            "nodes => nodes.map(n => [n.dataset.part, Number(n.dataset.ms)])"
        )
        strip = await answer.locator(".strip").inner_text()
    assert request_headers["x-flushgate-timing"] == "summary"
    assert server_timing is not None
    assert "engine-ttfb;dur=" in server_timing
    summary = raw.rsplit(b"\n\n", 2)[-2]
    assert summary.startswith(b": flushgate-timing ")
    record = orjson.loads(summary[len(b": flushgate-timing ") :])
    # client link, gateway, engine: the fake engine sends no spans, so the engine's part is not split further
    assert parts == [[part, ms] for part, ms in record["split"].items()]
    assert re.search(r"TTFT [\d.]+ m?s", strip)
    rate = str(record["chunk_rate_s"]).removesuffix(".0")  # as JavaScript prints the number
    assert f"{rate} chunks/s" in strip
    assert "engine headers" in strip
    assert f"id {response.headers['x-request-id']}" in strip


async def test_while_the_engine_loads_the_page_says_so_and_fills_the_picker_once_ready(
    fake: FakeUpstream, gateway_url: str, tmp_path: Path
) -> None:
    ready = asyncio.Event()
    models = engine(streams(DONE))

    async def loading_then_ready(request: web.Request) -> web.StreamResponse:
        if not ready.is_set():
            error = {"error": {"message": "the engine is loading (loading weights)", "code": "engine_loading"}}
            return web.json_response(error, status=503, headers={"Retry-After": "1"})
        return await models(request)

    fake.handler = loading_then_ready
    async with chat_page(tmp_path) as chat:
        await chat.page.goto(gateway_url + "/")
        status = chat.page.locator("#status")
        await expect(status).to_contain_text("503 Service Unavailable: the engine is loading (loading weights)")
        await expect(status).to_contain_text("retrying in 1 s")
        await expect(chat.page.locator("#send")).to_be_disabled()
        ready.set()
        await expect(chat.page.locator("#model option")).to_have_count(2)
        await expect(status).to_have_text("")
        await expect(chat.page.locator("#send")).to_be_enabled()


async def test_with_api_keys_the_page_loads_asks_for_the_key_and_sends_it(fake: FakeUpstream, tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    chat_engine = engine(streams(sse_chunk("Paris"), DONE))

    async def remember_auth(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Authorization")))
        return await chat_engine(request)

    fake.handler = remember_auth
    server = Server(Config(upstream=fake.url, port=0, access=Access(api_keys=("page-key",))))
    await server.start()
    try:
        async with chat_page(tmp_path) as chat:
            await chat.page.goto(f"http://127.0.0.1:{server.port}/")
            await expect(chat.page.locator("#status")).to_contain_text("401 Unauthorized: no API key given")
            await expect(chat.page.locator("#api-key")).to_be_visible()
            await expect(chat.page.locator("#send")).to_be_disabled()
            await chat.page.fill("#api-key", "wrong-key")
            await chat.page.press("#api-key", "Enter")
            await expect(chat.page.locator("#status")).to_contain_text("the API key given is not valid")
            await chat.page.fill("#api-key", "page-key")
            await chat.page.press("#api-key", "Enter")
            await expect(chat.page.locator("#model option")).to_have_count(2)
            answer = await chat.ask("Capital of France?")
            await chat.wait_finished(answer)
            await expect(answer.locator(".body")).to_have_text("Paris")
            assert chat.errors == [e for e in chat.errors if "401" in e]  # the refused loads, and nothing else
    finally:
        await server.stop()
    assert ("/v1/chat/completions", None) in seen
    assert all(header is None for _, header in seen)  # the key is the gateway's, never the engine's
