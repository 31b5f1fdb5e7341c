"""``doctor probe``: the same streamed chat request through every path, a few times, then verdicts per path.

Paths take turns request by request, so a change in the engine's load over the run touches them all alike. The
first path is the reference: the engine's own cadence is measured there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from flushgate.doctor.capture import Capture, capture_stream
from flushgate.doctor.events import StreamFormat
from flushgate.doctor.measures import EngineCadence, RunMeasures, engine_cadence, measure
from flushgate.doctor.stats import median
from flushgate.doctor.verdicts import Finding, path_findings, run_findings

Api = Literal["openai", "ollama"]

ENDPOINTS: dict[Api, str] = {"openai": "/v1/chat/completions", "ollama": "/api/chat"}
MODEL_LISTS: dict[Api, str] = {"openai": "/v1/models", "ollama": "/api/tags"}
FORMATS: dict[Api, StreamFormat] = {"openai": "sse", "ollama": "ndjson"}
DEFAULT_PROMPT = "Count from 1 to 100, separated by commas."


class ProbeError(Exception):
    """The probe cannot start (bad URL, no model to ask for); the message says what to do."""


@dataclass(frozen=True, slots=True)
class Path:
    name: str
    url: str  # the chat endpoint itself

    @classmethod
    def parse(cls, spec: str, api: Api) -> Path:
        """``URL`` or ``NAME=URL``; a URL without the chat endpoint's path gets it appended."""
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = "", spec
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ProbeError(f"{spec!r} is not an http(s)://HOST[:PORT][/PREFIX] URL")
        endpoint = ENDPOINTS[api]
        path = parts.path.rstrip("/")
        if not path.endswith(endpoint):
            path += endpoint
        return cls(name or parts.netloc + parts.path.rstrip("/"), urlunsplit(parts._replace(path=path)))

    def base(self, api: Api) -> str:
        return self.url[: -len(ENDPOINTS[api])]


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    api: Api = "openai"
    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 128
    requests: int = 3
    warmup: int = 1
    timeout_s: float = 120.0
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request, e.g. an API key


@dataclass(slots=True)
class PathResult:
    name: str
    url: str
    reference: bool
    verdict: str  # short labels, or "clean"
    findings: list[Finding]
    measures: RunMeasures  # medians over the path's requests
    runs: list[Capture] = field(repr=False)


@dataclass(slots=True)
class ProbeReport:
    api: Api
    model: str
    max_tokens: int
    requests: int
    engine: EngineCadence
    paths: list[PathResult]


def request_body(settings: ProbeSettings, model: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": settings.prompt}]
    if settings.api == "ollama":
        options = {"num_predict": max_tokens, "temperature": 0}
        return {"model": model, "messages": messages, "stream": True, "options": options}
    return {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}


async def discover_model(session: aiohttp.ClientSession, path: Path, api: Api) -> str:
    url = path.base(api) + MODEL_LISTS[api]
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            listing = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ProbeError(f"could not list models at {url} ({exc!r}); name one with --model") from None
    names = []
    if isinstance(listing, dict):
        entries = listing.get("data") if api == "openai" else listing.get("models")
        names = [e.get("id") or e.get("name") or e.get("model") for e in entries or () if isinstance(e, dict)]
    if not names or not names[0]:
        raise ProbeError(f"{url} lists no model; name one with --model")
    return str(names[0])


def summarise(runs: Sequence[Capture]) -> RunMeasures:
    measures = [measure(run) for run in runs if run.answered and run.tokens]

    def mid(values: list[float | None]) -> float | None:
        return median([v for v in values if v is not None])

    return RunMeasures(
        tokens=int(mid([m.tokens for m in measures]) or 0),
        ttft_ms=mid([m.ttft_ms for m in measures]),
        last_token_ms=mid([m.last_token_ms for m in measures]),
        tok_s=mid([m.tok_s for m in measures]),
        read_gap_p50_ms=mid([m.read_gap_p50_ms for m in measures]),
        read_gap_max_ms=mid([m.read_gap_max_ms for m in measures]),
        tokens_per_read=mid([m.tokens_per_read for m in measures]),
        bytes_per_event=mid([m.bytes_per_event for m in measures]),
    )


def judge(paths: Sequence[Path], runs: Sequence[Sequence[Capture]], settings: ProbeSettings, model: str) -> ProbeReport:
    """Verdicts for captures already taken; the first path is the reference."""
    reference = runs[0]
    engine = engine_cadence(reference)
    results = []
    for index, (path, captures) in enumerate(zip(paths, runs, strict=True)):
        findings = path_findings(
            [run_findings(c, engine, reference[i] if i < len(reference) else None) for i, c in enumerate(captures)]
        )
        verdict = ", ".join(f.label for f in findings) or "clean"
        results.append(
            PathResult(path.name, path.url, index == 0, verdict, findings, summarise(captures), list(captures))
        )
    return ProbeReport(settings.api, model, settings.max_tokens, settings.requests, engine, results)


async def probe(paths: Sequence[Path], settings: ProbeSettings) -> ProbeReport:
    if not paths:
        raise ProbeError("give at least one URL")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        auto_decompress=False,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        headers=list(settings.headers),
    ) as session:
        model = settings.model or await discover_model(session, paths[0], settings.api)
        expected = FORMATS[settings.api]
        warm = request_body(settings, model, max_tokens=8)
        for _ in range(settings.warmup):
            for path in paths:
                await capture_stream(session, path.url, warm, expected=expected, timeout_s=settings.timeout_s)
        body = request_body(settings, model, settings.max_tokens)
        runs: list[list[Capture]] = [[] for _ in paths]
        for _ in range(settings.requests):
            for path, captures in zip(paths, runs, strict=True):
                captures.append(
                    await capture_stream(session, path.url, body, expected=expected, timeout_s=settings.timeout_s)
                )
    return judge(paths, runs, settings, model)
