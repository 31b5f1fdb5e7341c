"""The one structured record written at the end of every request, and where its time went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flushgate.engine_timing import EngineSplit
from flushgate.logs import RecordWriter
from flushgate.timings import RequestTimings, to_ms

Outcome = Literal["completed", "client_abort", "upstream_error", "idle_timeout", "rejected"]
Api = Literal["openai", "ollama", "gateway"]


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    timings: RequestTimings
    api: Api = "openai"
    model: str | None = None
    stream: bool = False
    status: int = 0
    outcome: Outcome = "completed"
    error: str | None = None
    engine: EngineSplit | None = None
    content: dict[str, str] | None = None  # prompt and completion, only with --log-content
    served_by: str | None = None  # the engine (base URL) that answered, or the last one tried
    failover: list[dict[str, str]] = field(default_factory=list)  # engines tried first, failed before any byte
    stale_resent: str | None = None  # the engine that closed a kept-alive connection under it: sent again

    def wants_engine_split(self) -> bool:
        """Only generation requests that reached the engine have a vLLM span to wait for."""
        return self.timings.upstream_headers > 0 and self.path.endswith(("/completions", "/api/chat", "/api/generate"))

    def split(self) -> dict[str, float] | None:
        """Where the total went, in ms; the parts add up to ``total_ms``.

        - client_link: reading the request from the client, plus waiting on a client that reads slowly;
        - gateway: this hop's own work: before calling upstream, and per chunk what it does outside the write
          (translating an Ollama line; a pass-through does nothing there that it times);
        - engine_queue / engine_prefill / engine_decode: vLLM's own measurement of this request;
        - engine_frontend: the rest, i.e. vLLM's HTTP server (parsing, chat template, tokenising, detokenising)
          and the link to it. Without vLLM's measurement, engine: everything the upstream took.
        """
        t = self.timings
        if not t.end:
            return None
        total = t.end - t.start
        client = (t.body_done - t.start if t.body_done else 0.0) + t.write_blocked
        # A body read ahead (several engines) ends before the engine is called: that wait is the client's.
        called_after = t.body_done if 0 < t.body_done <= t.upstream_call else t.start
        gateway = (t.upstream_call - called_after if t.upstream_call else total - client) + t.chunk_work
        parts = {"client_link_ms": client, "gateway_ms": gateway}
        rest = total - client - gateway
        if self.engine is not None:
            e = self.engine
            parts |= {"engine_queue_ms": e.queue_s, "engine_prefill_ms": e.prefill_s, "engine_decode_ms": e.decode_s}
            parts["engine_frontend_ms"] = rest - e.queue_s - e.prefill_s - e.decode_s
        elif t.upstream_call:
            parts["engine_ms"] = rest
        return {name: to_ms(value) for name, value in parts.items()}

    def tokens(self) -> int | None:
        if self.engine is not None:
            return self.engine.completion_tokens
        return None

    def fields(self) -> dict[str, Any]:
        t = self.timings
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "api": self.api,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "engine": self.served_by,
            **t.summary(),
        }
        if self.failover:
            out["failover"] = self.failover
        if self.stale_resent is not None:
            out["stale_connection_resent"] = self.stale_resent
        tokens = self.tokens()
        out["tokens"] = tokens
        if self.engine is not None and self.engine.decode_s > 0 and tokens and tokens > 1:
            out["decode_tok_s"] = round((tokens - 1) / self.engine.decode_s, 1)
        elif t.first_token and t.last_chunk > t.first_token:
            # Without the engine's count, the rate of chunks after the first token (vLLM sends one per token).
            out["chunk_rate_s"] = round(t.chunks_after(t.first_token) / (t.last_chunk - t.first_token), 1)
        out["split"] = self.split()
        if self.content is not None:
            out["content"] = self.content
        return out

    def emit(self, write: RecordWriter) -> None:
        write(self.fields())
