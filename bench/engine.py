"""A fake OpenAI engine on a raw asyncio protocol: token cadence under control, every chunk stamped with its send time.

It answers ``POST /v1/chat/completions`` with a chat-completion event stream shaped like vLLM's. The model name
chooses the cadence (``cadence-8000us``: one token every 8 ms; ``cadence-0us``: back to back) and ``max_tokens``
the number of tokens. Every token's ``content`` is ``t<seq>:<ns>``, where ``ns`` is ``time.monotonic_ns()`` just
before the write, a clock every process on the machine shares, so a client can tell how long each chunk took.

Like a batching engine, all streams of one cadence advance on one shared tick, so 256 streams cost one timer,
not 256. The first token goes out at once, so time to first token measures only what lies between.
Tokens are written when made, even to a client that reads slowly: the stamp is when the engine produced the
token, and waiting in buffers counts as delay. Back-to-back streams instead honour flow control, or they would
only measure a buffer filling, and give up the core every 16 tokens: the load generator shares it, and an engine
that never blocks would otherwise keep it until the scheduler's next tick (4 ms at 250 Hz), a wait every proxy's
chunks would show as delay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import orjson

from flushgate.bench.framing import FramingError, MessageParser

CHAT_PATH = "/v1/chat/completions"
_MODEL = re.compile(r"cadence-(\d+)us")
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def cadence_model(interval_us: int) -> str:
    """The model name that asks this engine for one token every ``interval_us`` microseconds."""
    return f"cadence-{interval_us}us"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(model: bytes, delta: bytes, finish: bytes) -> tuple[bytes, bytes]:
    """Prefix and suffix of one chat.completion.chunk event around its delta's content."""
    prefix = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"'
        + model
        + b'","choices":[{"index":0,"delta":{'
        + delta
    )
    suffix = b'},"logprobs":null,"finish_reason":' + finish + b"}]}\n\n"
    return prefix, suffix


def _simple(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(),
        content_type,
        len(body),
        body,
    )


def _error(status: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return _simple(status, body)


@dataclass(slots=True)
class TokenStream:
    """One streamed answer: writes token ``seq`` on each :meth:`emit` until ``total`` are out, then the end."""

    protocol: EngineProtocol
    model: bytes
    total: int
    seq: int = 0
    _prefix: bytes = b""
    _suffix: bytes = b""

    def __post_init__(self) -> None:
        self._prefix, suffix = _event(self.model, b'"content":"', b"null")
        self._suffix = b'"' + suffix

    def start(self) -> None:
        role_prefix, role_suffix = _event(self.model, b'"role":"assistant","content":""', b"null")
        self.protocol.write(_HEAD + _chunk(role_prefix + role_suffix))

    def emit(self) -> bool:
        """Write the next token (and the end after the last); False once the stream is over."""
        if self.seq >= self.total or self.protocol.closed:
            return False
        content = b"t%d:%d" % (self.seq, time.monotonic_ns())
        self.seq += 1
        payload = _chunk(self._prefix + content + self._suffix)
        if self.seq == self.total:
            done, done_suffix = _event(self.model, b"", b'"length"')
            payload += _chunk(done + done_suffix) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            self.protocol.write(payload)
            self.protocol.stream_finished()
            return False
        self.protocol.write(payload)
        return True


@dataclass(slots=True)
class Ticker:
    """The shared clock of all streams with one cadence: one token to each of them per tick."""

    interval_ns: int
    streams: list[TokenStream] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def add(self, stream: TokenStream) -> None:
        self.streams.append(stream)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        next_tick = time.monotonic_ns()
        while self.streams:
            next_tick += self.interval_ns
            wait = next_tick - time.monotonic_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
            else:
                next_tick -= wait  # late: carry on from now rather than bursting to catch up
                await asyncio.sleep(0)
            self.streams = [s for s in self.streams if s.emit()]


async def _back_to_back(stream: TokenStream) -> None:
    """Tokens as fast as the reader takes them; every 16, the loop's other work and then other processes get a turn."""
    protocol = stream.protocol
    while True:
        if protocol.paused is not None:
            await protocol.paused
        if not stream.emit():
            return
        if stream.seq % 16 == 0:
            os.sched_yield()
            await asyncio.sleep(0)


@dataclass(slots=True)
class EngineState:
    tickers: dict[int, Ticker] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    streams_started: int = 0


class EngineProtocol(asyncio.Protocol):
    """One client connection; keep-alive, so a pooling proxy can send many requests over it."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = MessageParser(is_response=False)
        self.body = bytearray()
        self.streaming = False
        self.closed = False
        self.paused: asyncio.Future[None] | None = None
        self.close_after = False
        self._held = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.streaming:
            self._held += data  # a pipelined next request waits for this answer to end
            return
        try:
            self.body += b"".join(self.parser.feed(data))
        except FramingError as exc:
            self.write(_error("400 Bad Request", str(exc)))
            self._close()
            return
        if self.parser.complete:
            self._dispatch()

    def stream_finished(self) -> None:
        self.streaming = False
        if self.close_after:
            self._close()
            return
        held = self.parser.excess + self._held
        self._held = b""
        self.parser = MessageParser(is_response=False)
        self.body = bytearray()
        if held:
            self.data_received(held)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _dispatch(self) -> None:
        head = self.parser.head
        assert head is not None
        method, target = head.method_and_target
        self.close_after = (head.get("connection") or "").lower() == "close"
        path = target.split("?", 1)[0]
        if method == "POST" and path == CHAT_PATH:
            self._start_stream(bytes(self.body))
            return
        if method == "GET" and path == "/health":
            self._answer(_simple("200 OK", b""))
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": "cadence-<us>us", "object": "model", "owned_by": "bench"}]}
            self._answer(_simple("200 OK", orjson.dumps(models)))
        else:
            self._answer(_error("404 Not Found", f"no route for {method} {path}"))

    def _answer(self, response: bytes) -> None:
        self.streaming = True
        self.write(response)
        self.stream_finished()

    def _start_stream(self, body: bytes) -> None:
        try:
            request = orjson.loads(body)
            model = str(request["model"])
            total = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self._answer(_error("400 Bad Request", f"bad chat request: {exc!r}"))
            return
        match = _MODEL.fullmatch(model)
        if match is None or total < 1:
            self._answer(_error("400 Bad Request", f"model must be cadence-<microseconds>us, got {model!r}"))
            return
        self.streaming = True
        self.state.streams_started += 1
        stream = TokenStream(self, model.encode(), total)
        stream.start()
        interval_ns = int(match.group(1)) * 1000
        if interval_ns == 0:
            task = asyncio.get_running_loop().create_task(_back_to_back(stream))
            self.state.tasks.add(task)
            task.add_done_callback(self.state.tasks.discard)
            return
        if stream.emit():
            ticker = self.state.tickers.get(interval_ns)
            if ticker is None:
                ticker = self.state.tickers[interval_ns] = Ticker(interval_ns)
            ticker.add(stream)


async def start_engine(host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.Server, int]:
    """Serve the fake engine in the running loop; returns the server and the port it listens on."""
    state = EngineState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EngineProtocol(state), host, port, backlog=4096)
    bound: int = server.sockets[0].getsockname()[1]
    return server, bound


async def _serve(host: str, port: int) -> None:
    server, bound = await start_engine(host, port)
    gc.collect()
    gc.freeze()  # as the gateway does: no full collection walks the start-up objects while streams wait
    print(f"listening {bound}", flush=True)  # the runner reads the port from this line
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.engine", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port, printed as 'listening PORT'")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
