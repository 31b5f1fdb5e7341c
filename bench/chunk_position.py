"""``python -m flushgate.bench.chunk_position``: where in a stream the slowest chunks are.

A chunk delay p99 pools every chunk of a scenario. This splits it by the token's place in its stream (the first
token comes with the answer's head, the next one tick later, and so on), so a tail that belongs to the start of
requests shows apart from one that belongs to streaming itself. For each target, started fresh: the warm-up,
then the scenario ``--repeat`` times; delays are absolute (the engine's stamp to the load generator's read), the
engine direct included as the reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from flushgate.bench.loadgen import RequestResult, run_scenario
from flushgate.bench.runner import SCENARIOS, WARM_UP, _run, machine
from flushgate.bench.stats import percentile
from flushgate.bench.targets import HOST, Target, pin_load_side, start_engine, start_flushgate, start_nginx

# (name, first index, end index or None): the token's place in its stream.
POSITIONS: tuple[tuple[str, int, int | None], ...] = (
    ("token 0", 0, 1),
    ("token 1", 1, 2),
    ("token 2", 2, 3),
    ("tokens 3-5", 3, 6),
    ("token 6 on", 6, None),
)


def by_position(results: Iterable[RequestResult]) -> dict[str, dict[str, float]]:
    """Per place: chunk delay p50 and p99 in ms, and the share of the run's slowest 1 % of chunks found there."""
    streams = [[d / 1e6 for d in result.delays_ns] for result in results]
    pooled = [d for delays in streams for d in delays]
    if not pooled:
        return {}
    slowest = percentile(pooled, 99)
    over = sum(d > slowest for d in pooled) or 1
    table: dict[str, dict[str, float]] = {}
    for name, first, end in POSITIONS:
        here = [d for delays in streams for d in delays[first:end]]
        if here:
            table[name] = {
                "chunks": len(here),
                "p50_ms": round(percentile(here, 50), 3),
                "p99_ms": round(percentile(here, 99), 3),
                "share_of_slowest_1pc": round(sum(d > slowest for d in here) / over, 3),
            }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.chunk_position", description=__doc__)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--scenario", choices=[s.name for s in SCENARIOS], default="64x8ms")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    scenario = {s.name: s for s in SCENARIOS}[args.scenario]
    load_cpu, proxy_cpu = pin_load_side()
    tables: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="flushgate-chunk-position-") as tmp:
        workdir = Path(tmp)
        engines = [start_engine(workdir, load_cpu) for _ in range(args.engines)]
        ports = [engine.port for engine in engines]
        starters: dict[str, Callable[[], Target | None]] = {
            "engine-direct": lambda: None,
            "flushgate": lambda: start_flushgate(workdir, ports, proxy_cpu, None),
            "nginx": lambda: start_nginx(workdir, ports, proxy_cpu, args.nginx),
        }
        try:
            for name, start in starters.items():
                target = start()
                port = ports[0] if target is None else target.port
                try:
                    _run(run_scenario(HOST, port, WARM_UP))
                    results: list[RequestResult] = []
                    for _ in range(args.repeat):
                        results.extend(_run(run_scenario(HOST, port, scenario)).results())
                    tables[name] = by_position(results)
                finally:
                    if target is not None:
                        target.stop()
        finally:
            for engine in engines:
                engine.stop()
    for name, table in tables.items():
        print(name)
        for place, row in table.items():
            print(
                f"  {place:11s} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
                f"share of the slowest 1 %: {row['share_of_slowest_1pc']:.2f}  ({row['chunks']:.0f} chunks)"
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"machine": machine(), "engines": args.engines, "scenario": args.scenario, "by_target": tables}
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
