"""Streams the same chat requests through several paths to one engine and reports what each path costs.

Run on the GPU machine by scripts/gpu/run.sh; plain aiohttp, so it runs wherever flushgate does. Each request has
its own prompt of about 100 tokens, asks for 512 tokens with ignore_eos, and carries an X-Request-ID so the
gateway's per-request records can be matched to what the client saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]


def prompt(i: int) -> str:
    """About 100 tokens, different for every request so no prefix cache hit hides the prefill."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(80)]
    return f"Request {i}. Continue this list for a long time: " + " ".join(words)


@dataclass
class StreamResult:
    request_id: str
    ttft_s: float = 0.0
    last_s: float = 0.0
    completion_tokens: int = 0
    content_events: int = 0
    error: str | None = None
    arrivals: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        span = self.last_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0


async def one_stream(
    session: aiohttp.ClientSession, url: str, model: str, i: int, thinking: bool, max_tokens: int, tag: str
) -> StreamResult:
    rid = f"{tag}-{i}-{uuid.uuid4().hex[:8]}"
    result = StreamResult(rid)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "chat_template_kwargs": {"enable_thinking": thinking},
    }
    start = time.perf_counter()
    buffer = b""
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers={"X-Request-ID": rid}) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for chunk in resp.content.iter_any():
                now = time.perf_counter() - start
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    data = json.loads(event[6:])
                    if data.get("usage"):
                        result.completion_tokens = data["usage"]["completion_tokens"]
                    for choice in data.get("choices", []):
                        delta = choice.get("delta", {})
                        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                            result.content_events += 1
                            result.arrivals.append(now)
                            if not result.ttft_s:
                                result.ttft_s = now
                            result.last_s = now
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = repr(exc)
    return result


async def round_(url: str, model: str, streams: int, thinking: bool, max_tokens: int, tag: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(session, url, model, i, thinking, max_tokens, tag) for i in range(streams))
        )
        wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None and r.completion_tokens]
    ttfts = sorted(r.ttft_s for r in ok)
    return {
        "streams": streams,
        "thinking": thinking,
        "ok": len(ok),
        "errors": [r.error for r in results if r.error],
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2) if ttfts else None,
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 2) if ttfts else None,
        "tok_s_per_stream": round(statistics.median(r.tok_s for r in ok), 1) if ok else None,
        "tok_s_total": round(sum(r.completion_tokens for r in ok) / wall, 1) if ok else None,
        "content_events_median": statistics.median(r.content_events for r in ok) if ok else None,
        "request_ids": [r.request_id for r in results],
        "client_first_token_ms": {r.request_id: round(r.ttft_s * 1000, 2) for r in ok},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", action="append", required=True, metavar="NAME=URL", help="a path to measure")
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--thinking", default="off,on")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="each round's streams are spread over all paths at once (same engine load, same moment), so the "
        "paths' TTFTs compare request for request; a 1-stream round alternates the path instead",
    )
    parser.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead of rounds: at each --streams level, keep that many streams minus one running straight to "
        "the engine and send PAIRS pairs of short probe requests, one at a time, alternating the first two "
        "paths, so each probe's TTFT is measured under the same engine load",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds per point; the path order rotates each time")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    paths = dict(item.split("=", 1) for item in args.path)
    rows = asyncio.run(measure(args, paths))
    Path(args.out).write_text(json.dumps({"paths": paths, "rows": rows, "args": vars(args)}, indent=1))


async def measure(args: argparse.Namespace, paths: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    names = list(paths)
    for name, url in paths.items():  # warm every path once: first-request costs are not what is measured
        await round_(url, args.model, 1, False, 16, f"warm-{name}")
        await round_(url, args.model, 8, False, 16, f"warm-{name}")
    if args.probe:
        return await measure_probes(args, paths)
    if args.mixed:
        return await measure_mixed(args, paths)
    for rep in range(args.repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for thinking in [mode == "on" for mode in args.thinking.split(",")]:
            for streams in [int(n) for n in args.streams.split(",")]:
                for name in order:
                    row = await round_(paths[name], args.model, streams, thinking, args.max_tokens, f"{name}-r{rep}")
                    row["path"] = name
                    row["rep"] = rep
                    rows.append(row)
                    brief = {k: v for k, v in row.items() if k not in ("request_ids", "client_first_token_ms")}
                    print(json.dumps(brief), flush=True)
    return rows


async def measure_mixed(args: argparse.Namespace, paths: dict[str, str]) -> list[dict[str, Any]]:
    """Rounds in which every path carries part of the same load, for paired comparisons."""
    names = list(paths)
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for thinking in [mode == "on" for mode in args.thinking.split(",")]:
            for streams in [int(n) for n in args.streams.split(",")]:
                for rep in range(args.repeat * (len(names) if streams == 1 else 1)):
                    start = time.perf_counter()
                    picks = [names[(i + rep) % len(names)] for i in range(max(streams, 1))]
                    results = await asyncio.gather(
                        *(
                            one_stream(session, paths[name], args.model, 1000 * rep + i, thinking,
                                       args.max_tokens, f"mixed-{name}")
                            for i, name in enumerate(picks)
                        )
                    )  # fmt: skip
                    wall = time.perf_counter() - start
                    for name in names:
                        ours = [r for r, n in zip(results, picks, strict=True) if n == name]
                        mine = [r for r in ours if r.error is None]
                        if not mine:
                            continue
                        rows.append(
                            {
                                "path": name, "streams": streams, "thinking": thinking, "rep": rep, "wall_s": wall,
                                "ttft_ms": [round(r.ttft_s * 1000, 2) for r in mine],
                                "tok_s": [round(r.tok_s, 1) for r in mine],
                                "completion_tokens": [r.completion_tokens for r in mine],
                                "request_ids": [r.request_id for r in mine],
                                "client_first_token_ms": {r.request_id: round(r.ttft_s * 1000, 2) for r in mine},
                                "errors": [r.error for r in ours if r.error],
                            }
                        )  # fmt: skip
                    print(json.dumps({"streams": streams, "thinking": thinking, "rep": rep, "wall_s": round(wall, 2)}),
                          flush=True)  # fmt: skip
    return rows


async def measure_probes(args: argparse.Namespace, paths: dict[str, str]) -> list[dict[str, Any]]:
    """Added TTFT, measured pair by pair: a probe direct, then one through the next path, under the same load.

    Background streams (long, straight to the engine) hold the engine's batch at the level under test; probes ask
    for 4 tokens, one at a time, so a probe never waits on another probe.
    """
    first, second = list(paths)[:2]
    direct = paths[first]
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for streams in [int(n) for n in args.streams.split(",")]:
            stop = asyncio.Event()

            async def background(slot: int, stop: asyncio.Event = stop, streams: int = streams) -> None:
                turn = 0
                while not stop.is_set():
                    await one_stream(
                        session, direct, args.model, 100_000 * streams + 1000 * slot + turn, False,
                        args.max_tokens, "background",
                    )  # fmt: skip
                    turn += 1

            load = [asyncio.create_task(background(slot)) for slot in range(streams - 1)]
            await asyncio.sleep(2.0 if load else 0)  # the background streams are past their prefill
            pairs: list[tuple[float, float]] = []
            errors: list[str] = []
            for k in range(args.probe):
                order = [first, second] if k % 2 == 0 else [second, first]
                got = {}
                for name in order:
                    result = await one_stream(
                        session, paths[name], args.model, 10_000_000 + 1000 * streams + 2 * k + (name == second), False,
                        4, f"probe-{name}-{streams}",
                    )  # fmt: skip
                    if result.error:
                        errors.append(result.error)
                    got[name] = result.ttft_s
                if got[first] and got[second]:
                    pairs.append((got[first], got[second]))
            stop.set()
            await asyncio.gather(*load)
            base = sorted(a for a, _ in pairs)
            ours = sorted(b for _, b in pairs)
            diffs = sorted(b - a for a, b in pairs)
            row = {
                "mode": "probe", "streams": streams, "pairs": len(pairs), "errors": errors,
                "paths": [first, second],
                f"{first}_ttft_p50_ms": round(statistics.median(base) * 1000, 3) if base else None,
                f"{second}_ttft_p50_ms": round(statistics.median(ours) * 1000, 3) if ours else None,
                "added_ttft_p50_ms": (
                    round((statistics.median(ours) - statistics.median(base)) * 1000, 3) if pairs else None
                ),
                "paired_diff_p50_ms": round(statistics.median(diffs) * 1000, 3) if diffs else None,
                "pairs_ms": [[round(a * 1000, 3), round(b * 1000, 3)] for a, b in pairs],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "pairs_ms"}), flush=True)
    return rows


if __name__ == "__main__":
    main()
