"""``python -m flushgate.bench.first_burst``: the stress scenario's TTFT on a proxy's first burst and after it.

The benchmark's rounds pool the first stress burst a proxy sees (its engine connections not yet open, beyond the
warm-up's few) with later ones. This separates them: for each proxy, started fresh, the warm-up, then the
256-stream scenario twice ("first" and "again"), each followed by the same scenario straight to the engine
("direct"). Prints TTFT p50 and p99 in ms, absolute, per run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from flushgate.bench.loadgen import ScenarioRun, run_scenario
from flushgate.bench.runner import SCENARIOS, STRESS, WARM_UP, _run, machine
from flushgate.bench.stats import percentile
from flushgate.bench.targets import HOST, Target, pin_load_side, start_engine, start_flushgate, start_nginx


def ttft_ms(run: ScenarioRun) -> dict[str, float]:
    ttfts = sorted(r.ttft_ns / 1e6 for r in run.results() if r.ttft_ns is not None)
    return {"p50": round(percentile(ttfts, 50), 2), "p99": round(percentile(ttfts, 99), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.first_burst", description=__doc__)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument(
        "--flushgate-args", default="", help="extra flags for flushgate serve, e.g. '--accept-handles 1'"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    stress = {s.name: s for s in SCENARIOS}[STRESS]
    load_cpu, proxy_cpu = pin_load_side()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="flushgate-first-burst-") as tmp:
        workdir = Path(tmp)
        engines = [start_engine(workdir, load_cpu) for _ in range(args.engines)]
        ports = [engine.port for engine in engines]
        starters: dict[str, Callable[[], Target]] = {
            "flushgate": lambda: start_flushgate(workdir, ports, proxy_cpu, None, shlex.split(args.flushgate_args)),
            "nginx": lambda: start_nginx(workdir, ports, proxy_cpu, args.nginx),
        }
        try:
            for _ in range(args.rounds):
                for name, start in starters.items():
                    target = start()
                    try:
                        _run(run_scenario(HOST, target.port, WARM_UP))
                        row: dict[str, object] = {"proxy": name}
                        for burst in ("first", "again"):
                            row[burst] = ttft_ms(_run(run_scenario(HOST, target.port, stress)))
                            row[f"direct after {burst}"] = ttft_ms(_run(run_scenario(HOST, ports[0], stress)))
                        rows.append(row)
                        print(json.dumps(row))
                    finally:
                        target.stop()
        finally:
            for engine in engines:
                engine.stop()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "machine": machine(),
            "engines": args.engines,
            "scenario": STRESS,
            "flushgate_args": args.flushgate_args,
            "ttft_ms": rows,
        }
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
