"""The Ollama and OpenAI APIs through flushgate managing real vLLMs on the CPU, with the official client packages.

Two engines: the shared SmolLM2-135M-Instruct (a real chat model whose template has no thinking switch), and the
tiny Qwen3 test model (engine/tiny_qwen3.py) with vLLM's qwen3 reasoning parser. The tiny Qwen3's weights are
random except for one planted reply: ``<think>Thinking</think>\\n\\nHello!`` when the prompt asks for thinking,
``Hello!`` when it does not, so every test knows which words must reach which field.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from flushgate.engine.tiny_qwen3 import ensure_tiny_qwen3
from tests.real.conftest import ROOT, GatewayProcess, start_managed

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(400)]  # the first test also waits for two engines

MODEL = "tiny-qwen3"
SMOL = "smollm2-135m-instruct"
QWEN3_DIR = Path(os.environ.get("FLUSHGATE_TEST_QWEN3_MODEL", ROOT / ".cache" / "models" / "tiny-qwen3"))
# As the qwen3-14b-fp8 preset: Qwen3's reasoning parser splits <think> text off; tools use the hermes parser.
QWEN3_ENGINE_ARGS = "--reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes"
USER = [{"role": "user", "content": "What is the weather in the city?"}]
OPENAI_USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": USER[0]["content"]}]


@pytest.fixture(scope="session")
def qwen3_gateway() -> Iterator[GatewayProcess]:
    """flushgate managing a second real vLLM, serving the tiny Qwen3 with Qwen3's reasoning parser."""
    model_dir = ensure_tiny_qwen3(QWEN3_DIR)
    gateway = start_managed(model_dir, "--served-model-name", MODEL, f"--engine-arg={QWEN3_ENGINE_ARGS}")
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway_url(qwen3_gateway: GatewayProcess) -> str:
    return qwen3_gateway.url


@pytest.fixture
def client(gateway_url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=gateway_url, timeout=120)


# --- the official ollama package -------------------------------------------------------------------------------


async def test_list_shows_the_model_and_its_thinking_aliases(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == [f"{MODEL}:latest", f"{MODEL}:think", f"{MODEL}:nothink"]
    first = listed.models[0]
    assert first.details is not None
    assert (first.details.family, first.details.format) == ("qwen3", "safetensors")
    assert first.size is not None
    assert first.size > 0


async def test_chat_stream_with_thinking_puts_thinking_and_answer_in_their_fields(client: ollama.AsyncClient) -> None:
    parts = [part async for part in await client.chat(model=MODEL, messages=USER, think=True, stream=True)]
    thinking = "".join(p.message.thinking or "" for p in parts)
    content = "".join(p.message.content or "" for p in parts)
    assert (thinking, content.strip()) == ("Thinking", "Hello!")
    assert [p.done for p in parts].count(True) == 1
    assert parts[-1].done
    assert parts[-1].done_reason == "stop"


async def test_chat_stream_without_thinking_has_only_the_answer(client: ollama.AsyncClient) -> None:
    parts = [part async for part in await client.chat(model=MODEL, messages=USER, think=False, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "Hello!"
    assert all(not p.message.thinking for p in parts)


@pytest.mark.parametrize(("alias", "thinks"), [("think", True), ("nothink", False)])
async def test_a_thinking_alias_picks_the_mode(client: ollama.AsyncClient, alias: str, thinks: bool) -> None:
    reply = await client.chat(model=f"{MODEL}:{alias}", messages=USER)
    assert reply.model == f"{MODEL}:{alias}"
    assert reply.message.content is not None
    assert reply.message.content.strip() == "Hello!"
    assert (reply.message.thinking == "Thinking") is thinks


async def test_chat_not_streamed_has_the_whole_message_and_real_timings(client: ollama.AsyncClient) -> None:
    started = time.perf_counter_ns()
    reply = await client.chat(model=MODEL, messages=USER, think=True)
    wall = time.perf_counter_ns() - started
    assert reply.message.thinking == "Thinking"
    assert reply.done
    assert reply.eval_count == 7  # <think> Thinking </think> \n\n Hello ! <|im_end|>
    assert reply.prompt_eval_count is not None
    assert reply.prompt_eval_count > 10
    durations = [reply.load_duration, reply.prompt_eval_duration, reply.eval_duration]
    assert all(d is not None and d > 0 for d in durations)
    assert reply.total_duration is not None
    assert sum(d for d in durations if d is not None) <= reply.total_duration <= wall


async def test_generate_streamed_and_not(client: ollama.AsyncClient) -> None:
    parts = [p async for p in await client.generate(model=MODEL, prompt="Hi", think=False, stream=True)]
    assert "".join(p.response or "" for p in parts) == "Hello!"
    assert parts[-1].done
    assert parts[-1].eval_count == 3
    reply = await client.generate(model=MODEL, prompt="Hi", think=True)
    assert (reply.thinking, (reply.response or "").strip()) == ("Thinking", "Hello!")


async def test_show_and_ps_describe_the_served_model(client: ollama.AsyncClient) -> None:
    shown = await client.show(MODEL)
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["qwen3.context_length"] == 4096
    running = await client.ps()
    assert running.models[0].model == f"{MODEL}:latest"
    assert running.models[0].context_length == 4096


async def test_version_parses_as_integers(gateway_url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway_url + "/api/version") as resp:
        version = (await resp.json())["version"]
    assert all(part.isdigit() for part in version.split("."))


async def test_each_engine_event_becomes_one_line(qwen3_gateway: GatewayProcess, gateway_url: str) -> None:
    """Same request to the engine and through the gateway: the same text, each line carrying text, then the final.

    (How many events vLLM emits for the same tokens can differ between two runs, as it may put several tokens in
    one event; the one-line-per-event mapping itself is proven in lock-step against the fake engine.)"""
    engine_body = {
        "model": MODEL,
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": True},
    }
    async with aiohttp.ClientSession() as http:
        engine_url = qwen3_gateway.engine["url"]
        async with http.post(engine_url + "/v1/chat/completions", json=engine_body) as resp:
            events = [json.loads(line[6:]) for line in (await resp.text()).split("\n\n") if line.startswith("data: {")]
        text_events = [e for e in events if e["choices"] and _has_text(e["choices"][0]["delta"])]
        body = {"model": MODEL, "messages": USER, "think": True}
        async with http.post(gateway_url + "/api/chat", json=body) as resp:
            lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert all(line["message"].get("content") or line["message"].get("thinking") for line in lines[:-1])
    engine_text = "".join(
        (e["choices"][0]["delta"].get("reasoning") or "") + (e["choices"][0]["delta"].get("content") or "")
        for e in text_events
    )
    gateway_text = "".join((m["message"].get("thinking") or "") + (m["message"].get("content") or "") for m in lines)
    assert gateway_text == engine_text
    assert 1 <= len(lines) - 1 <= len(text_events) + 2


def _has_text(delta: dict[str, Any]) -> bool:
    return bool(delta.get("content") or delta.get("reasoning"))


async def test_structured_output_with_a_json_schema(client: ollama.AsyncClient) -> None:
    reply = await client.chat(model=MODEL, messages=USER, think=False, format={"type": "boolean"})
    assert json.loads(reply.message.content or "") in (True, False)


OSLO = {"city": "Oslo"}


async def test_tools_and_tool_history_reach_the_template(client: ollama.AsyncClient) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    history: list[dict[str, Any]] = [  # a tool call the model made earlier, and its result
        *USER,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": OSLO}}]},
        {"role": "tool", "content": "4 degrees", "tool_name": "get_weather"},
    ]
    with_tools = await client.chat(model=MODEL, messages=history, tools=[tool], think=False)
    without = await client.chat(model=MODEL, messages=USER, think=False)
    assert with_tools.message.content == "Hello!"
    assert with_tools.prompt_eval_count is not None
    assert without.prompt_eval_count is not None
    assert with_tools.prompt_eval_count > without.prompt_eval_count + 50  # the tools block and the history


async def test_bad_requests_get_ollamas_errors(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model=MODEL, messages=USER, options={"num_ctx": 100_000})
    assert caught.value.status_code == 400
    assert "4096" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="llama3", messages=USER)
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        await client.embed(model=MODEL, input="hi")
    assert caught.value.status_code == 400
    assert "does not support embeddings" in caught.value.error


async def test_an_ollama_answer_is_recorded_with_the_engines_own_timing(qwen3_gateway: GatewayProcess) -> None:
    mark = qwen3_gateway.mark()
    client = ollama.AsyncClient(host=qwen3_gateway.url, timeout=120, headers={"X-Request-ID": "ollama-record-1"})
    await client.chat(model=f"{MODEL}:nothink", messages=USER)
    record = await asyncio.to_thread(
        qwen3_gateway.wait_event,
        "request",
        after=mark,
        timeout_s=30,
        where=lambda e: e.get("request_id") == "ollama-record-1",
    )
    assert (record["api"], record["path"], record["model"], record["status"]) == (
        "ollama",
        "/api/chat",
        f"{MODEL}:nothink",
        200,
    )
    assert record["tokens"] == 3  # Hello ! <|im_end|>, as vLLM counted them
    assert {"engine_queue_ms", "engine_prefill_ms", "engine_decode_ms"} <= set(record["split"])


# --- the official openai package through the same gateway ------------------------------------------------------


@pytest.fixture
async def openai_client(gateway_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0)
    yield client
    await client.close()


async def reasoning_and_answer(stream: AsyncIterator[Any]) -> tuple[str, str]:
    """The reasoning field's text and the answer's, from an OpenAI chat stream."""
    reasoning, content = "", ""
    async for chunk in stream:
        if chunk.choices:
            delta: Any = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning", None) or ""
            content += delta.content or ""
    return reasoning, content.strip()


async def test_openai_chat_stream_with_enable_thinking_gives_the_reasoning_field(
    openai_client: openai.AsyncOpenAI,
) -> None:
    results: dict[bool, tuple[str, str]] = {}
    for thinking in (True, False):
        stream = await openai_client.chat.completions.create(
            model=MODEL,
            messages=OPENAI_USER,
            stream=True,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )
        results[thinking] = await reasoning_and_answer(stream)
    assert results == {True: ("Thinking", "Hello!"), False: ("", "Hello!")}


async def test_openai_model_aliases_pick_the_thinking_mode(openai_client: openai.AsyncOpenAI) -> None:
    results: dict[str, tuple[str, str]] = {}
    for name in (f"{MODEL}:think", f"{MODEL}:nothink"):
        stream = await openai_client.chat.completions.create(model=name, messages=OPENAI_USER, stream=True)
        results[name] = await reasoning_and_answer(stream)
    assert results == {f"{MODEL}:think": ("Thinking", "Hello!"), f"{MODEL}:nothink": ("", "Hello!")}


async def test_openai_completions_and_models(openai_client: openai.AsyncOpenAI) -> None:
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL, f"{MODEL}:think", f"{MODEL}:nothink"]
    completion = await openai_client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, seed=1)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


# --- SmolLM2 on the shared managed engine --------------------------------------------------------------------

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 32}


async def test_smollm2_streams_a_real_answer_in_pieces_through_the_ollama_api(smol_gateway: GatewayProcess) -> None:
    client = ollama.AsyncClient(host=smol_gateway.url, timeout=120)
    listed = await client.list()
    assert [m.model for m in listed.models] == [f"{SMOL}:latest"]  # no thinking switch, so no aliases
    parts = [p async for p in await client.chat(model=SMOL, messages=CAPITAL, options=GREEDY, stream=True)]
    pieces = [p.message.content for p in parts if p.message.content]
    assert "Paris" in "".join(pieces)
    assert len(pieces) > 3, "the answer arrived in one piece, not streamed"
    final = parts[-1]
    assert final.done
    assert final.eval_count is not None
    assert 0 < final.eval_count <= 32
    assert all(d is not None and d > 0 for d in (final.total_duration, final.prompt_eval_duration, final.eval_duration))


async def test_smollm2_generate_and_its_refusal_to_think(smol_gateway: GatewayProcess) -> None:
    client = ollama.AsyncClient(host=smol_gateway.url, timeout=120)
    reply = await client.generate(model=SMOL, prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in (reply.response or "")
    assert reply.thinking is None
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model=SMOL, messages=CAPITAL, think=True)
    assert (caught.value.status_code, caught.value.error) == (400, f'"{SMOL}" does not support thinking')


# --- Open WebUI (PyPI open-webui) with flushgate as its Ollama server: make open-webui-check ------------------

OPEN_WEBUI = os.environ.get("FLUSHGATE_OPEN_WEBUI")  # path of the open-webui executable
OPEN_WEBUI_READY_S = 180


@pytest.fixture
async def open_webui(qwen3_gateway: GatewayProcess, tmp_path: Path) -> AsyncIterator[str]:
    """Open WebUI on a fresh database, with flushgate as its only (Ollama) backend."""
    if not OPEN_WEBUI:
        pytest.skip("set FLUSHGATE_OPEN_WEBUI to an open-webui executable (make open-webui-check does)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {
        "DATA_DIR": str(tmp_path),
        "WEBUI_SECRET_KEY": "flushgate-test-secret-key-of-32-bytes",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL": "",
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ANONYMIZED_TELEMETRY": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "ENABLE_OLLAMA_API": "true",
        "OLLAMA_BASE_URL": qwen3_gateway.url,
        "ENABLE_OPENAI_API": "false",
    }
    log = (tmp_path / "open-webui.log").open("w")
    process = await asyncio.create_subprocess_exec(
        OPEN_WEBUI, "serve", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


async def until_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    """Open WebUI logs no reliable start line, so its /health is polled until it answers."""
    deadline = time.monotonic() + OPEN_WEBUI_READY_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert process.returncode is None, f"open-webui exited with code {process.returncode}"
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    pytest.fail(f"open-webui did not answer /health within {OPEN_WEBUI_READY_S} s")


async def test_open_webui_lists_the_model_with_its_aliases_and_streams_both_modes(open_webui: str) -> None:
    async with aiohttp.ClientSession() as http:
        user = {"name": "test", "email": "test@example.com", "password": "flushgate-test-password"}
        async with http.post(open_webui + "/api/v1/auths/signup", json=user) as resp:
            assert resp.status == 200, await resp.text()
            auth = {"Authorization": "Bearer " + (await resp.json())["token"]}
        async with http.get(open_webui + "/api/models", headers=auth) as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
        assert listed == [f"{MODEL}:latest", f"{MODEL}:think", f"{MODEL}:nothink"]
        answers = {}
        for alias in ("think", "nothink"):
            body = {"model": f"{MODEL}:{alias}", "messages": USER, "stream": True}
            async with http.post(open_webui + "/api/chat/completions", json=body, headers=auth) as resp:
                assert resp.status == 200
                deltas = [
                    json.loads(line[6:])["choices"][0]["delta"]
                    async for line in _sse_lines(resp)
                    if line.startswith("data: {") and json.loads(line[6:]).get("choices")
                ]
            answers[alias] = (
                "".join(d.get("reasoning_content") or "" for d in deltas),
                "".join(d.get("content") or "" for d in deltas).strip(),
            )
    assert answers == {"think": ("Thinking", "Hello!"), "nothink": ("", "Hello!")}


async def _sse_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line:
            yield line
