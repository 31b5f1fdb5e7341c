"""HTTP/1.1 over a bare socket, for requests an HTTP client library would refuse to send or would tidy up."""

from __future__ import annotations

import asyncio
import http.client
import io
from dataclasses import dataclass

import orjson

GUARD_S = 15


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


class _Replay:
    """Lets ``http.client`` parse a response already read into memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes, method: str = "GET") -> RawResponse:
    response = http.client.HTTPResponse(_Replay(data), method=method)  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    headers = {name.lower(): value for name, value in response.getheaders()}
    return RawResponse(response.status, headers, body)


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def exchange(port: int, raw: bytes, guard_s: float = GUARD_S) -> RawResponse:
    """Send ``raw`` as it is and read the answer until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), guard_s)
    finally:
        writer.close()
    return parse_response(data, raw.split(b" ", 1)[0].decode("ascii", "replace"))
