"""Ollama's embeddings routes over a real CPU vLLM that serves SmolLM2 as an embedding model (vLLM's pooling
runner), behind a gateway whose other engine refuses connections."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import ollama
import pytest

from tests.real.conftest import MODEL_DIR, GatewayProcess
from tests.real.vllm_engines import VllmServer, start_engines
from tests.test_several_engines import closed_url

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(600)]  # the first test also waits for the engine
MODEL = "smollm2-135m-instruct"
EMBEDDING_ENGINE = ("--runner", "pooling", "--convert", "embed")
TEXTS = ["The capital of France is Paris.", "Bonjour"]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    from flushgate.engine.embedded_model import ensure_smollm2

    if not MODEL_DIR.exists():
        ensure_smollm2(MODEL_DIR)
    (server,) = start_engines(MODEL_DIR, 1, tmp_path_factory.mktemp("vllm-embed"), EMBEDDING_ENGINE)
    yield server
    server.stop()


async def engine_vectors(engine: VllmServer) -> list[list[float]]:
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "input": TEXTS}
        async with http.post(engine.url + "/v1/embeddings", json=body) as resp:
            assert resp.status == 200
            data = (await resp.json())["data"]
    return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]


async def test_embeddings_through_the_ollama_client_are_the_engines_own_even_when_an_engine_refuses(
    embedder: VllmServer,
) -> None:
    """The official ``ollama`` client gets vLLM's vectors unchanged from /api/embed and /api/embeddings. The
    gateway's first engine refuses connections (active checks off, so only requests find out): the embedding
    that meets it goes on to the real engine, and the refusing engine leaves the rotation."""
    gone = closed_url()
    gateway = GatewayProcess("--upstream", gone, "--upstream", embedder.url, "--health-interval", "0")
    try:
        client = ollama.AsyncClient(host=gateway.url)
        answers = [await client.embed(model=MODEL, input=TEXTS) for _ in range(3)]
        single = await client.embeddings(model=MODEL, prompt=TEXTS[0])
        event = gateway.wait_event("embeddings_failover", timeout_s=5)
    finally:
        gateway.stop()
    expected = await engine_vectors(embedder)
    assert len(expected[0]) > 100
    for answer in answers:
        assert [list(vector) for vector in answer.embeddings] == expected
        assert answer.prompt_eval_count is not None
    assert list(single.embedding) == expected[0]
    assert event["engine"] == embedder.url
    assert [attempt["engine"] for attempt in event["failover"]] == [gone]
