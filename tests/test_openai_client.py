"""The official openai package works through the gateway unchanged."""

from __future__ import annotations

import openai
from aiohttp import web

from tests.fakes import FakeUpstream, sse_chunk, start_stream


async def test_openai_sdk_streams_through_the_gateway(fake: FakeUpstream, gateway_url: str) -> None:
    words = ["The", " capital", " of", " France", " is", " Paris", "."]

    async def stream(request: web.Request) -> web.StreamResponse:
        assert (await request.json())["stream"] is True
        response = await start_stream(request)
        for word in words:
            await response.write(sse_chunk(word))
        await response.write(b"data: [DONE]\n\n")
        return response

    fake.handler = stream
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0)
    try:
        stream_ = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "capital of France?"}], stream=True
        )
        got = [chunk.choices[0].delta.content async for chunk in stream_]
    finally:
        await client.close()
    assert got == words
