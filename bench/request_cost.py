"""``python -m flushgate.bench.request_cost``: the proxy's CPU for one whole short request, by target.

When many streams start at once, what each request costs the proxy before its first byte is paid one request
after another on the proxy's core. This isolates that cost: requests of one token each (so the per-chunk work is
negligible), each on a new connection, a few clients at a time; the proxy pinned to its own core as in the
benchmark; its process tree's CPU time read from /proc before and after. Prints and writes (``--out``) CPU
microseconds per request for flushgate with its own HTTP server, flushgate with aiohttp's only
(``--no-own-server``), and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from flushgate.bench.loadgen import Scenario, fetch_stream
from flushgate.bench.procstat import tree_cpu_seconds
from flushgate.bench.runner import _run, machine
from flushgate.bench.targets import HOST, Target, pin_load_side, start_engine, start_flushgate, start_nginx

ONE_TOKEN = Scenario("one-token", streams=1, requests=1, tokens=1, interval_us=1000, deadline_s=30)


async def _requests(port: int, total: int, clients: int) -> int:
    """``total`` one-token requests, ``clients`` at a time, each on a new connection; returns how many failed."""
    request = ONE_TOKEN.request_bytes(HOST, port, "bench")
    todo = iter(range(total))
    failed = 0

    async def client() -> None:
        nonlocal failed
        for _ in todo:
            loop = asyncio.get_running_loop()
            recording = await fetch_stream(HOST, port, request, int((loop.time() + 30) * 1e9))
            if recording.error or recording.timed_out or not recording.pieces:
                failed += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return failed


def measure(target: Target, total: int, clients: int, warm_up: int) -> dict[str, float | int]:
    assert target.process is not None
    _run(_requests(target.port, warm_up, clients))
    before = tree_cpu_seconds(target.process.pid)
    failed = _run(_requests(target.port, total, clients))
    spent = tree_cpu_seconds(target.process.pid) - before
    return {
        "requests": total,
        "failed": failed,
        "cpu_s": round(spent, 3),
        "cpu_us_per_request": round(spent / total * 1e6),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.request_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument(
        "--flushgate-args", default="", help="extra flags for flushgate serve, e.g. '--accept-handles 1'"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    extra = shlex.split(args.flushgate_args)
    load_cpu, proxy_cpu = pin_load_side()
    results: dict[str, list[dict[str, float | int]]] = {}
    with tempfile.TemporaryDirectory(prefix="flushgate-request-cost-") as tmp:
        workdir = Path(tmp)
        engine = start_engine(workdir, load_cpu)
        starters: dict[str, Callable[[], Target]] = {
            "flushgate": lambda: start_flushgate(workdir, engine.port, proxy_cpu, None, extra),
            "flushgate --no-own-server": lambda: start_flushgate(
                workdir, engine.port, proxy_cpu, None, [*extra, "--no-own-server"], name="flushgate-aiohttp"
            ),
        }
        if Path(args.nginx).exists():
            starters["nginx"] = lambda: start_nginx(workdir, engine.port, proxy_cpu, args.nginx)
        try:
            for _ in range(args.rounds):
                for name, start in starters.items():
                    target = start()
                    try:
                        results.setdefault(name, []).append(
                            measure(target, args.requests, args.clients, warm_up=args.requests // 10)
                        )
                    finally:
                        target.stop()
        finally:
            engine.stop()
    data = {
        "machine": machine(),
        "flushgate_args": args.flushgate_args,
        "requests": args.requests,
        "clients": args.clients,
        "results": results,
    }
    for name, runs in results.items():
        shown = ", ".join(f"{run['cpu_us_per_request']} µs" for run in runs)
        print(f"{name:28s} CPU per one-token request: {shown} (failed: {sum(int(r['failed']) for r in runs)})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
