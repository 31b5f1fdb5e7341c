"""Thinking aliases on the OpenAI API, for UIs that offer only a model list."""

from __future__ import annotations

import aiohttp
import openai
from structlog.testing import capture_logs

from tests.fakes import FakeModel, FakeUpstream, ScriptedEngine


async def test_v1_models_lists_the_aliases_of_a_model_whose_template_can_think(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    fake.handler = ScriptedEngine(models=[FakeModel("qwen3", thinking=True), FakeModel("plain")])
    async with http.get(gateway_url + "/v1/models") as resp:
        assert resp.status == 200
        ids = [card["id"] for card in (await resp.json())["data"]]
    assert ids == ["qwen3", "plain", "qwen3:think", "qwen3:nothink"]


async def test_an_alias_sets_enable_thinking_and_the_real_model_name(fake: FakeUpstream, gateway_url: str) -> None:
    engine = ScriptedEngine(models=[FakeModel("qwen3", thinking=True)])
    fake.handler = engine
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0)
    try:
        for name in ("qwen3:nothink", "qwen3:think", "qwen3"):
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_body={"chat_template_kwargs": {"other": 1}},
            )  # fmt: skip
            assert [c async for c in stream]
    finally:
        await client.close()
    sent = [g.body for g in engine.generations]
    assert [b["model"] for b in sent] == ["qwen3", "qwen3", "qwen3"]
    assert [b["chat_template_kwargs"] for b in sent] == [
        {"other": 1, "enable_thinking": False},
        {"other": 1, "enable_thinking": True},
        {"other": 1},  # a plain name is forwarded untouched
    ]


async def test_a_tag_on_a_model_that_cannot_think_is_forwarded_untouched(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine = ScriptedEngine(models=[FakeModel("plain")])
    fake.handler = engine
    body = {"model": "plain:think", "messages": [{"role": "user", "content": "hi"}]}
    with capture_logs() as logs:
        async with http.post(gateway_url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
    (sent,) = engine.generations
    assert sent.body == body  # the engine, not the gateway, says whether it knows that name
    (record,) = [entry for entry in logs if entry["event"] == "request"]
    assert record["model"] == "plain:think"  # the record names it, read once by the alias check
