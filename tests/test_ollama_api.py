"""Ollama's model, version and management routes, and its error shape, answered from the engine."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flushgate.config import Config
from flushgate.proxy.ollama.settings import OllamaSettings
from flushgate.server import Server
from tests.fakes import FakeModel, FakeUpstream, ScriptedEngine


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder as vLLM reads it: a config and one safetensors file of 3 x 1000 float32 values."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "torch_dtype": "float32"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [3, 1000], "data_offsets": [0, 12000]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12000))
    return folder


@pytest.fixture
def engine(fake: FakeUpstream, model_dir: Path) -> ScriptedEngine:
    scripted = ScriptedEngine(
        models=[
            FakeModel("qwen3", max_model_len=8192, root=str(model_dir), thinking=True, tools=True),
            FakeModel("plain"),
        ]
    )
    fake.handler = scripted
    return scripted


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_root_answers_like_ollama_to_get_and_head(gateway_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway_url + "/") as resp:
        assert (resp.status, await resp.text()) == (200, "Ollama is running")
    async with http.head(gateway_url + "/") as resp:
        assert resp.status == 200


async def test_version_is_a_dotted_triple_of_integers(gateway_url: str, http: aiohttp.ClientSession) -> None:
    status, got = await get_json(http, gateway_url + "/api/version")
    assert status == 200
    assert [int(part) for part in got["version"].split(".")] == [0, 12, 0]


async def test_tags_list_each_model_and_the_thinking_aliases_of_a_thinking_model(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    status, got = await get_json(http, gateway_url + "/api/tags")
    assert status == 200
    names = [m["name"] for m in got["models"]]
    assert names == ["qwen3:latest", "qwen3:think", "qwen3:nothink", "plain:latest"]
    assert all(m["model"] == m["name"] for m in got["models"])
    qwen3, plain = got["models"][0], got["models"][3]
    assert qwen3["details"] == {
        "parent_model": "",
        "format": "safetensors",
        "family": "qwen3",
        "families": ["qwen3"],
        "parameter_size": "3.0K",
        "quantization_level": "F32",
    }
    assert (
        qwen3["size"]
        == 8 + len(json.dumps({"w": {"dtype": "F32", "shape": [3, 1000], "data_offsets": [0, 12000]}})) + 12000
    )
    assert qwen3["capabilities"] == ["completion", "tools", "thinking"]
    assert plain["capabilities"] == ["completion"]
    assert len(qwen3["digest"]) == 64
    assert qwen3["modified_at"].endswith("Z")


async def test_thinking_aliases_follow_the_settings(
    engine: ScriptedEngine, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    assert gateway.gateway is not None
    gateway.gateway.ollama = OllamaSettings(thinking_aliases={"reason": True})
    _, got = await get_json(http, gateway_url + "/api/tags")
    assert [m["name"] for m in got["models"]] == ["qwen3:latest", "qwen3:reason", "plain:latest"]


async def test_model_list_is_cached_and_refreshed_for_a_name_it_lacks(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    await get_json(http, gateway_url + "/api/tags")
    await get_json(http, gateway_url + "/api/tags")
    assert engine.model_list_requests == 1
    engine.models.append(FakeModel("newcomer"))
    body = {"model": "newcomer", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 200
    assert engine.model_list_requests == 2


async def test_ps_lists_the_resident_models_with_an_expiry_and_context(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    status, got = await get_json(http, gateway_url + "/api/ps")
    assert status == 200
    first = got["models"][0]
    assert (first["name"], first["model"], first["context_length"]) == ("qwen3:latest", "qwen3:latest", 8192)
    assert first["expires_at"] == "9999-12-31T23:59:59Z"


async def test_show_describes_the_model_with_info_and_capabilities(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, model_dir: Path
) -> None:
    async with http.post(gateway_url + "/api/show", json={"model": "qwen3:nothink"}) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["model_info"] == {
        "general.architecture": "qwen3",
        "general.parameter_count": 3000,
        "qwen3.context_length": 8192,
    }
    assert got["capabilities"] == ["completion", "tools", "thinking"]
    assert got["details"]["family"] == "qwen3"
    assert f"FROM {model_dir}" in got["modelfile"]
    assert "thinking off" in got["modelfile"]


async def test_show_of_an_unknown_model_is_a_404(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway_url + "/api/show", json={"model": "llama3"}) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "model 'llama3' not found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:abc"),
    ],
)
async def test_model_management_is_refused_because_flushgate_manages_the_model(
    gateway_url: str, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, gateway_url + path, json={"model": "qwen3"}) as resp:
        assert resp.status == 403
        got = await resp.json()
    assert list(got) == ["error"]
    assert "managed by flushgate" in got["error"]


async def test_unknown_api_route_is_a_404_and_a_wrong_method_a_405_in_ollamas_shape(
    gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway_url + "/api/nothing") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "no route for POST /api/nothing"}
    async with http.get(gateway_url + "/api/chat") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert list(await resp.json()) == ["error"]


async def test_engine_refusing_a_request_passes_its_status_and_message_on(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        error = {"error": {"message": "This model's maximum context length is 8192 tokens", "type": "BadRequestError"}}
        return web.json_response(error, status=400)

    engine.generation = refuse
    body = {"model": "qwen3", "messages": [{"role": "user", "content": "long"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "This model's maximum context length is 8192 tokens"}


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_engine_is_a_502_in_ollamas_shape(closed_port: int, http: aiohttp.ClientSession) -> None:
    server = Server(Config(upstream=f"http://127.0.0.1:{closed_port}", port=0))
    await server.start()
    try:
        for method, path, body in (("GET", "/api/tags", None), ("POST", "/api/chat", {"model": "m", "messages": []})):
            async with http.request(method, f"http://127.0.0.1:{server.port}{path}", json=body) as resp:
                assert resp.status == 502
                got = await resp.json()
            assert list(got) == ["error"]
            assert f"127.0.0.1:{closed_port}" in got["error"]
    finally:
        await server.stop()


async def test_a_draining_gateway_refuses_ollama_requests_with_503(
    engine: ScriptedEngine, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    gateway.begin_drain()
    body = {"model": "qwen3", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert list(await resp.json()) == ["error"]


async def test_embed_maps_the_engines_embeddings(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        assert body == {"model": "qwen3", "input": ["a", "b"]}
        data = [{"index": 1, "embedding": [0.3, 0.4]}, {"index": 0, "embedding": [0.1, 0.2]}]
        return web.json_response({"data": data, "usage": {"prompt_tokens": 2}})

    engine.embeddings = embeddings
    async with http.post(gateway_url + "/api/embed", json={"model": "qwen3:latest", "input": ["a", "b"]}) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["model"] == "qwen3:latest"
    assert got["embeddings"] == [[0.1, 0.2], [0.3, 0.4]]
    assert got["prompt_eval_count"] == 2
    assert got["total_duration"] > 0


async def test_embed_on_an_engine_without_embeddings_is_a_clear_error(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway_url + "/api/embed", json={"model": "qwen3", "input": "a"}) as resp:
        assert resp.status == 400
        got = await resp.json()
    assert got["error"] == "model 'qwen3' does not support embeddings: the engine serves it for generation"
    async with http.post(gateway_url + "/api/embed", json={"model": "qwen3", "input": 5}) as resp:
        assert resp.status == 400


async def test_legacy_embeddings_answers_one_vector(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        assert await request.json() == {"model": "qwen3", "input": "a"}
        return web.json_response({"data": [{"index": 0, "embedding": [0.5, 0.25]}], "usage": {"prompt_tokens": 1}})

    engine.embeddings = embeddings
    async with http.post(gateway_url + "/api/embeddings", json={"model": "qwen3", "prompt": "a"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"embedding": [0.5, 0.25]}
