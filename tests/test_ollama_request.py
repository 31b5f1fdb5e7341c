"""Ollama request fields reach vLLM as the fields Ollama documents them to mean; bad input is a clear 400."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.fakes import FakeModel, FakeUpstream, ScriptedEngine


@pytest.fixture
def engine(fake: FakeUpstream) -> ScriptedEngine:
    scripted = ScriptedEngine(
        models=[FakeModel("qwen3", max_model_len=8192, thinking=True, tools=True), FakeModel("plain")]
    )
    fake.handler = scripted
    return scripted


async def sent_for(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], engine: ScriptedEngine
) -> dict[str, Any]:
    """The body the engine received for one Ollama request."""
    async with http.post(url, json=body | {"stream": False}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    return engine.generations[-1].body


async def refusal(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, str]:
    async with http.post(url, json=body) as resp:
        got = await resp.json()
        assert list(got) == ["error"], got  # Ollama's shape
        return resp.status, got["error"]


USER = [{"role": "user", "content": "hi"}]


async def test_sampling_options_become_vllm_sampling_parameters(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 42,
        "num_predict": 64,
        "stop": ["\n\n", "User:"],
        "repeat_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
    }
    sent = await sent_for(
        http, gateway_url + "/api/chat", {"model": "qwen3", "messages": USER, "options": options}, engine
    )
    assert {k: sent[k] for k in sent if k not in ("model", "messages", "stream", "stream_options")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 42,
        "max_tokens": 64,
        "stop": ["\n\n", "User:"],
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
    }
    assert sent["model"] == "qwen3"
    assert sent["stream_options"] == {"include_usage": True}


async def test_llama_cpp_only_options_are_accepted_without_effect(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    # What Open WebUI may send besides the sampling options.
    options = {
        "num_ctx": 8192,
        "num_batch": 512,
        "num_keep": 5,
        "num_gpu": 99,
        "num_thread": 8,
        "use_mmap": True,
        "use_mlock": False,
        "repeat_last_n": 64,
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "typical_p": 1.0,
        "num_predict": -1,
    }
    sent = await sent_for(
        http, gateway_url + "/api/chat", {"model": "qwen3", "messages": USER, "options": options}, engine
    )
    assert set(sent) == {"model", "messages", "stream", "stream_options"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type number'),
        ({"top_k": True}, 'option "top_k" must be of type integer'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
        ({"stop": [1, 2]}, 'option "stop" must be a string or an array of strings'),
        ({"warp_speed": 9}, "unsupported option 'warp_speed'"),
        ("fast", "options must be an object"),
    ],
)
async def test_bad_options_are_a_400_naming_the_option(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, options: object, message: str
) -> None:
    body = {"model": "qwen3", "messages": USER, "options": options}
    assert await refusal(http, gateway_url + "/api/chat", body) == (400, message)
    assert engine.generations == []


async def test_num_ctx_above_the_engine_context_is_a_400(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    body = {"model": "qwen3", "messages": USER, "options": {"num_ctx": 8193}}
    status, message = await refusal(http, gateway_url + "/api/chat", body)
    assert status == 400
    assert "num_ctx 8193" in message
    assert "8192" in message


async def test_format_json_and_json_schema_become_structured_output(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    url = gateway_url + "/api/chat"
    sent = await sent_for(http, url, {"model": "qwen3", "messages": USER, "format": "json"}, engine)
    assert sent["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    sent = await sent_for(http, url, {"model": "qwen3", "messages": USER, "format": schema}, engine)
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    status, message = await refusal(http, url, {"model": "qwen3", "messages": USER, "format": "yaml"})
    assert status == 400
    assert "format" in message


async def test_tools_and_a_tool_call_history_are_sent_in_openai_form(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    messages = [
        {"role": "user", "content": "Weather in Toronto and Paris?"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "Two cities.",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Toronto"}}},
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            ],
        },
        {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
        {"role": "tool", "content": "17 degrees", "tool_name": "get_weather"},
    ]
    sent = await sent_for(
        http, gateway_url + "/api/chat", {"model": "qwen3", "messages": messages, "tools": [tool]}, engine
    )
    assert sent["tools"] == [tool]
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": "",
        "reasoning": "Two cities.",
        "tool_calls": [
            {
                "id": "call_1_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Toronto"}'},
            },
            {
                "id": "call_1_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
        ],
    }
    assert sent["messages"][2:] == [
        {"role": "tool", "content": "11 degrees", "tool_call_id": "call_1_0", "name": "get_weather"},
        {"role": "tool", "content": "17 degrees", "tool_call_id": "call_1_1", "name": "get_weather"},
    ]


@pytest.mark.parametrize(
    ("model", "think", "expected"),
    [
        ("qwen3", True, {"enable_thinking": True}),
        ("qwen3", False, {"enable_thinking": False}),
        ("qwen3", "high", {"enable_thinking": True}),
        ("qwen3", None, None),
        ("qwen3:think", None, {"enable_thinking": True}),
        ("qwen3:nothink", None, {"enable_thinking": False}),
        ("qwen3:nothink", True, {"enable_thinking": True}),  # the request's own choice wins over the alias
        ("plain", False, {"enable_thinking": False}),
    ],
)
async def test_think_and_thinking_aliases_reach_the_chat_template(
    engine: ScriptedEngine,
    gateway_url: str,
    http: aiohttp.ClientSession,
    model: str,
    think: object,
    expected: dict[str, bool] | None,
) -> None:
    body: dict[str, Any] = {"model": model, "messages": USER}
    if think is not None:
        body["think"] = think
    sent = await sent_for(http, gateway_url + "/api/chat", body, engine)
    assert sent.get("chat_template_kwargs") == expected
    assert sent["model"] == model.split(":")[0]


async def test_thinking_on_a_model_whose_template_ignores_it_is_a_400(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    body = {"model": "plain", "messages": USER, "think": True}
    assert await refusal(http, gateway_url + "/api/chat", body) == (400, '"plain" does not support thinking')


async def test_the_model_name_is_echoed_as_the_client_wrote_it(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    for name in ("qwen3", "qwen3:latest", "qwen3:nothink"):
        async with http.post(
            gateway_url + "/api/chat", json={"model": name, "messages": USER, "stream": False}
        ) as resp:
            assert (await resp.json())["model"] == name


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"messages": USER}, 400, "model is required"),
        ({"model": 7, "messages": USER}, 400, "model must be a string"),
        ({"model": "llama3", "messages": USER}, 404, "model 'llama3' not found"),
        ({"model": "plain:think", "messages": USER}, 404, "model 'plain:think' not found"),
        ({"model": "qwen3", "messages": "hi"}, 400, "messages must be an array of message objects"),
        ({"model": "qwen3", "messages": ["hi"]}, 400, "messages[0] must be an object"),
        ({"model": "qwen3", "messages": [{"content": "hi"}]}, 400, "messages[0].role must be a non-empty string"),
        ({"model": "qwen3", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content must be a string"),
        ({"model": "qwen3", "messages": USER, "stream": "yes"}, 400, "stream must be true or false"),
        ({"model": "qwen3", "messages": USER, "think": "maybe"}, 400, None),
        ({"model": "qwen3", "messages": USER, "keep_alive": [5]}, 400, None),
        ({"model": "qwen3", "messages": USER, "tools": [{"type": "function"}]}, 400, None),
        ({"model": "qwen3", "messages": USER, "logprobs": True}, 400, "logprobs are not supported by this server"),
        (
            {"model": "qwen3", "messages": [{"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}]},
            400,
            "model 'qwen3' does not support images: it is served as a text-only model",
        ),
    ],
)
async def test_bad_chat_requests_are_answered_in_ollamas_error_shape(
    engine: ScriptedEngine,
    gateway_url: str,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    status: int,
    message: str | None,
) -> None:
    got_status, got_message = await refusal(http, gateway_url + "/api/chat", body)
    assert got_status == status
    if message is not None:
        assert got_message == message
    assert engine.generations == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model": "qwen3", "prompt": "x", "suffix": "y"},
            "suffix (fill-in-the-middle) is not supported by this server",
        ),
        ({"model": "qwen3", "prompt": "x", "context": [1, 2]}, None),
        ({"model": "qwen3", "prompt": "x", "template": "{{ .Prompt }}"}, None),
        (
            {"model": "qwen3", "prompt": "x", "raw": True, "system": "s"},
            "raw mode does not support template, system, or context",
        ),
        ({"model": "qwen3", "prompt": 5}, "prompt must be a string"),
        ({"model": "qwen3", "prompt": "x", "images": ["AAAA"]}, None),
    ],
)
async def test_bad_generate_requests_are_a_400(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, body: dict[str, Any], message: str | None
) -> None:
    got_status, got_message = await refusal(http, gateway_url + "/api/generate", body)
    assert got_status == 400
    if message is not None:
        assert got_message == message


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_a_body_that_is_not_a_json_object_is_a_400(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, raw: bytes
) -> None:
    for path in ("/api/chat", "/api/generate", "/api/show"):
        async with http.post(gateway_url + path, data=raw) as resp:
            assert resp.status == 400
            got = await resp.json()
        assert list(got) == ["error"]


@pytest.mark.parametrize(("path", "body"), [("/api/chat", {"messages": []}), ("/api/generate", {"prompt": ""})])
async def test_a_request_without_a_prompt_answers_that_the_model_is_loaded(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    # Open WebUI's "unload" is this with keep_alive 0; the engine keeps its model either way.
    async with http.post(gateway_url + path, json={"model": "qwen3", "keep_alive": 0} | body) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["done"] is True
    assert got["done_reason"] == "load"
    assert engine.generations == []


async def test_keep_alive_in_any_of_ollamas_forms_is_accepted(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    for keep_alive in ("5m", 300, -1, "0"):
        body = {"model": "qwen3", "messages": USER, "keep_alive": keep_alive}
        sent = await sent_for(http, gateway_url + "/api/chat", body, engine)
        assert "keep_alive" not in sent
