"""``python -m flushgate.bench``: every target through every scenario, in rounds, then the report.

The load generator and the fake engine share one core, every proxy gets the other, and only the target being
measured runs: the others are paused (SIGSTOP), so none of them takes CPU from it. Each round visits the proxies
in another order, so slow drift on the machine does not always hit the same one, and every scenario through a
proxy comes right after the same scenario straight to the engine, the baseline its added delay is taken from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from flushgate.bench.arrivals import arrivals
from flushgate.bench.loadgen import Scenario, ScenarioRun, run_scenario
from flushgate.bench.procstat import machine_busy_seconds, tree_cpu_seconds
from flushgate.bench.report import (
    DIRECT,
    FLUSHGATE,
    FLUSHGATE_NO_HOP,
    LITELLM,
    NGINX,
    NGINX_AGAIN,
    Cell,
    Check,
    Results,
    checks,
    markdown_checks,
    markdown_tables,
    summarize,
)
from flushgate.bench.targets import (
    HOST,
    Target,
    TargetError,
    start_engine,
    start_flushgate,
    start_litellm,
    start_nginx,
)

T = TypeVar("T")

SCENARIOS = (
    Scenario("1x8ms", streams=1, requests=20, tokens=32, interval_us=8000, deadline_s=30),
    Scenario("64x8ms", streams=64, requests=2, tokens=64, interval_us=8000, deadline_s=20),
    Scenario("256x1ms", streams=256, requests=1, tokens=200, interval_us=1000, deadline_s=20),
    Scenario("1xb2b", streams=1, requests=12, tokens=4000, interval_us=0, deadline_s=15),
)
TITLES = {
    "1x8ms": "1 stream, 8 ms/token",
    "64x8ms": "64 streams, 8 ms/token",
    "256x1ms": "256 streams, 1 ms/token (stress)",
    "1xb2b": "1 stream, tokens back to back (max chunk rate)",
}
STRESS, MANY = "256x1ms", "64x8ms"
WARM_UP = Scenario("warm-up", streams=8, requests=2, tokens=20, interval_us=1000, deadline_s=20)


def rotated(items: Sequence[Target], by: int) -> list[Target]:
    """The targets in the order of round ``by``: the list turned left by ``by`` places."""
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu_model": model,
        "commit": _git_commit(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _git_commit() -> str:
    """The commit measured, marked ``+changes`` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def wait_quiet(pids: Sequence[int], settle_s: float = 15.0, others_s: float = 1.0) -> None:
    """Wait until the given process trees are idle, so one scenario's backlog does not bill the next.

    For up to ``others_s`` it also waits for other processes on the machine to calm down (below a quarter of a
    core); what they still take while a scenario runs is reported beside it.
    """
    start = time.monotonic()
    while (waited := time.monotonic() - start) < settle_s:
        ours_before = sum(tree_cpu_seconds(p) for p in pids)
        all_before, busy_before = tree_cpu_seconds(os.getpid()), machine_busy_seconds()
        time.sleep(0.2)
        ours = sum(tree_cpu_seconds(p) for p in pids) - ours_before
        others = (machine_busy_seconds() - busy_before) - (tree_cpu_seconds(os.getpid()) - all_before)
        if ours <= 0.02 and (others <= 0.05 or waited > others_s):
            return


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.cells: dict[str, dict[str, Cell]] = {s.name: {} for s in args.scenarios}
        self.targets: list[Target] = []
        self.engine: Target | None = None
        self.more_engines: list[Target] = []  # with --engines N: the other N-1, behind flushgate and nginx only
        self.skipped: dict[str, str] = {}
        self.orders: list[list[str]] = []
        self.arrivals: list[dict[str, Any]] = []  # one line per request of the scenarios --arrivals names
        self.api_key = "sk-" + secrets.token_hex(32)  # LiteLLM's master key, sent to every target alike

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start(self) -> None:
        args = self.args
        self.engine = start_engine(self.workdir, args.load_cpu)
        engine_port = self.engine.port
        self.more_engines = [start_engine(self.workdir, args.load_cpu) for _ in range(args.engines - 1)]
        # engine-direct (the baseline) and LiteLLM use the first engine; flushgate and nginx spread over all.
        pool = [engine_port, *(e.port for e in self.more_engines)] if self.more_engines else engine_port
        self.log(f"fake engine on port {engine_port}" + "".join(f", {e.port}" for e in self.more_engines))
        starters: dict[str, Callable[[], Target]] = {
            DIRECT: lambda: Target(DIRECT, engine_port, version="fake engine (raw asyncio)"),
            FLUSHGATE: lambda: start_flushgate(
                self.workdir,
                pool,
                args.proxy_cpu,
                None if args.flushgate_log == "devnull" else self.workdir / "flushgate.log",
                args.flushgate_args.split(),
            ),
            FLUSHGATE_NO_HOP: lambda: start_flushgate(
                self.workdir,
                pool,
                args.proxy_cpu,
                None if args.flushgate_log == "devnull" else self.workdir / "flushgate-no-hop.log",
                [*args.flushgate_args.split(), "--no-hop-timing"],
                name=FLUSHGATE_NO_HOP,
            ),
            NGINX: lambda: start_nginx(self.workdir, pool, args.proxy_cpu, args.nginx),
            NGINX_AGAIN: lambda: start_nginx(
                self.workdir / NGINX_AGAIN, pool, args.proxy_cpu, args.nginx, name=NGINX_AGAIN
            ),
            LITELLM: lambda: start_litellm(
                self.workdir,
                engine_port,
                args.proxy_cpu,
                args.litellm,
                sorted({s.model for s in (*args.scenarios, WARM_UP)}),
                self.api_key,
            ),
        }
        for name in args.targets:
            try:
                target = starters[name]()
            except (TargetError, OSError) as exc:
                self.skipped[name] = str(exc)
                self.log(f"{name}: not measured: {exc}")
                continue
            self.log(f"{name} ({target.version}) on port {target.port}")
            target.pause()
            self.targets.append(target)

    def stop(self) -> None:
        for target in [*self.targets, *([self.engine] if self.engine else []), *self.more_engines]:
            target.stop()

    def _measure_one(self, target: Target, scenario: Scenario) -> None:
        assert self.engine is not None
        assert self.engine.process is not None
        engines = [self.engine.process.pid, *(e.process.pid for e in self.more_engines if e.process is not None)]
        wait_quiet(engines + ([target.process.pid] if target.process is not None else []))
        cpu_before = target.cpu_seconds()
        ours_before = tree_cpu_seconds(os.getpid())
        busy_before, window_start = machine_busy_seconds(), time.monotonic()
        run: ScenarioRun = _run(run_scenario(HOST, target.port, scenario, self.api_key))
        busy_after, window = machine_busy_seconds(), time.monotonic() - window_start
        ours_after = tree_cpu_seconds(os.getpid())
        cpu_after = target.cpu_seconds()
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        # CPU that processes outside this benchmark took meanwhile: a shared machine shows up here.
        foreign = max((busy_after - busy_before) - (ours_after - ours_before), 0.0)
        cell = self.cells[scenario.name].setdefault(target.name, Cell())
        cell.add(run, cpu, (foreign, window))
        if scenario.name in self.args.arrivals:
            where = {"round": len(self.orders), "target": target.name, "scenario": scenario.name}
            self.arrivals += [where | asdict(arrivals(r)) for r in run.recordings]
        self.log(
            f"  {target.name:13} {scenario.name:8} {(run.ended_ns - run.started_ns) / 1e9:6.2f} s"
            f"  errors {cell.errors} incomplete {cell.incomplete} (all rounds so far)"
        )

    def measure(self, target: Target, direct: Target | None) -> None:
        """Each scenario through ``target``, each right after the same scenario straight to the engine.

        The engine-direct baseline is thus measured as often as the proxies and next to each of them in time,
        so what drifts on the machine meanwhile weighs on both sides of the difference alike.
        """
        target.resume()
        try:
            _run(run_scenario(HOST, target.port, WARM_UP, self.api_key))
            for scenario in self.args.scenarios:
                if direct is not None and direct is not target:
                    self._measure_one(direct, scenario)
                self._measure_one(target, scenario)
        finally:
            target.pause()

    def run(self) -> None:
        direct = next((t for t in self.targets if t.process is None), None)
        proxies = [t for t in self.targets if t.process is not None] or ([direct] if direct else [])
        started = time.monotonic()
        for round_no in range(self.args.rounds):
            spent = time.monotonic() - started
            if round_no and spent / round_no * (round_no + 1) > self.args.budget_s:
                self.log(f"stopping after {round_no} rounds: another would pass the {self.args.budget_s:g} s budget")
                break
            order = rotated(proxies, round_no)
            self.orders.append([t.name for t in order])
            self.log(f"round {round_no + 1}/{self.args.rounds}: {', '.join(t.name for t in order)}")
            for target in order:
                if not target.alive():
                    self.log(f"{target.name} has exited; see {target.log_path}")
                    continue
                self.measure(target, direct)

    def request_records(self) -> dict[str, int]:
        """Outcomes in flushgate's request log: a cross-check that it saw every request the load generator sent."""
        log = self.workdir / "flushgate.log"
        outcomes: dict[str, int] = {}
        if log.exists():
            for line in log.read_bytes().splitlines():
                record = json.loads(line)
                if record.get("event") == "request":
                    outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
        return outcomes

    def results(self) -> dict[str, Any]:
        ordered = {
            s: {t.name: self.cells[s][t.name] for t in self.targets if t.name in self.cells[s]} for s in self.cells
        }
        found = checks(ordered, stress=STRESS, many=MANY, candidate=self.args.judge)
        floor = noise_floor_checks(ordered, self.args.judge)
        return {
            "machine": machine(),
            "pinning": {
                "load_and_engine_cpu": self.args.load_cpu,
                "proxy_cpu": self.args.proxy_cpu,
                "nice": self.args.nice_applied,
            },
            "engines": self.args.engines,
            "judged": self.args.judge,
            "versions": {t.name: t.version for t in self.targets},
            "not_measured": self.skipped,
            "flushgate": {
                "log": self.args.flushgate_log,
                "extra_args": self.args.flushgate_args,
                "request_records": self.request_records(),
            },
            "rounds": len(self.orders),
            "orders": self.orders,
            "scenarios": [asdict(s) | {"title": TITLES.get(s.name, s.name)} for s in self.args.scenarios],
            "results": summarize(ordered),
            "checks": [asdict(c) for c in found],
            "noise_floor_checks": [asdict(c) for c in floor],
        }


def noise_floor_checks(results: Results, judge: str, stress: str = STRESS, many: str = MANY) -> list[Check]:
    """With a second nginx measured beside the judged target, the goals it meets or misses against the first in
    the same run: how far this machine's noise alone moves them. The LiteLLM and per-hop goals, flushgate's own,
    are left out."""
    if judge == NGINX_AGAIN or not any(NGINX_AGAIN in cells for cells in results.values()):
        return []
    return checks(results, stress=stress, many=many, candidate=NGINX_AGAIN)[:3]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed, as the proxies under test do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def write_outputs(out: Path, data: dict[str, Any], plot: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    m, pin = data["machine"], data["pinning"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} cores (nproc), Linux {m['kernel']}, Python {m['python']}; "
        f"run {m['date_utc']} on commit {m['commit']}.",
        f"Load generator and fake engine on CPU {pin['load_and_engine_cpu']}, {_proxy_cores(pin['proxy_cpu'])}, all at "
        f"nice {pin['nice']}; {data['rounds']} rounds, the order of proxies rotated each round.",
        "",
        *_engines_note(data.get("engines", 1)),
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in data["versions"].items()) + ".",
        "",
    ]
    for name, why in data["not_measured"].items():
        lines += [f"Not measured: {name}: {why}", ""]
    lines += [f"## Goals for {data['judged']}", "", markdown_checks_from(data)]
    if data.get("noise_floor_checks"):
        lines += [
            f"## The same goals for {NGINX_AGAIN}",
            "",
            "A second nginx, configured alike, judged against the first in the same run: a goal it misses here is "
            "missed by this machine's noise alone.",
            "",
            markdown_checks_from(data, "noise_floor_checks"),
        ]
    lines += ["## Per scenario", ""]
    lines.append(markdown_tables(data["results"], {s["name"]: s["title"] for s in data["scenarios"]}))
    if plot:
        lines += ["![added delay, TTFT and CPU per target](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    if plot:
        from flushgate.bench.plot import plot_results

        plot_results(data, out / "results.png")


def _engines_note(engines: int) -> list[str]:
    if engines <= 1:
        return []
    return [
        f"{engines} fake engines (each its own process, beside the load generator): flushgate and nginx spread the "
        f"streams over all of them (flushgate's least-outstanding routing, nginx's least_conn); the engine-direct "
        f"baseline and LiteLLM use the first.",
        "",
    ]


def _proxy_cores(cpu: object) -> str:
    if isinstance(cpu, str):  # several: flushgate and nginx run one worker per core
        return f"each proxy on CPUs {cpu} (one worker per core)"
    return f"proxy on CPU {cpu}"


def markdown_checks_from(data: dict[str, Any], key: str = "checks") -> str:
    return markdown_checks([Check(**c) for c in data[key]])


def _raise_priority(nice: int) -> int:
    """Run this process and every child (engine, proxies) at ``nice``, where allowed (root).

    Other work on a shared machine then takes less CPU from the cores being measured; it still runs.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        return os.getpriority(os.PRIO_PROCESS, 0)
    return nice


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="where results.{md,json,png} go")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--budget-s", type=float, default=540, help="start no round that would end the measuring after this many s"
    )
    parser.add_argument(
        "--targets", nargs="+", default=[DIRECT, FLUSHGATE, FLUSHGATE_NO_HOP, NGINX, LITELLM], help="names to measure"
    )
    parser.add_argument("--scenarios", nargs="+", default=[s.name for s in SCENARIOS])
    parser.add_argument(
        "--engines", type=int, default=1, help="fake engines behind flushgate and nginx (several: routing across them)"
    )
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--litellm", default=".venv-litellm/bin/litellm")
    parser.add_argument(
        "--flushgate-log",
        choices=("file", "devnull"),
        default="file",
        help="where flushgate's request log goes: a file in the run's temp dir, or /dev/null",
    )
    parser.add_argument("--flushgate-args", default="", help="extra flags for flushgate serve, e.g. '--idle-timeout 0'")
    parser.add_argument(
        "--proxy-cores",
        type=int,
        default=1,
        metavar="N",
        help="cores for each proxy (CPUs 1..N; needs N+1 cores): flushgate runs --workers N, nginx N worker "
        "processes, LiteLLM --num_workers N",
    )
    parser.add_argument("--nice", type=int, default=-10, help="scheduling priority of every benchmark process")
    parser.add_argument(
        "--judge",
        choices=[FLUSHGATE, NGINX_AGAIN],
        default=FLUSHGATE,
        help=f"whose figures the goals hold against nginx's; {NGINX_AGAIN} (a second nginx, configured alike, "
        f"added to --targets) shows how often nginx itself would miss them in the same conditions",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--arrivals",
        nargs="+",
        default=[],
        metavar="SCENARIO",
        help="also write arrivals.jsonl: per request of these scenarios, the pieces it arrived in and those "
        "holding a late token",
    )
    args = parser.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    unknown = [n for n in [*args.scenarios, *args.arrivals] if n not in known]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(known)}")
    args.scenarios = [known[n] for n in args.scenarios]
    if args.judge == NGINX_AGAIN and NGINX_AGAIN not in args.targets:
        args.targets.append(NGINX_AGAIN)
    if args.engines < 1:
        parser.error("--engines must be at least 1")
    if args.proxy_cores < 1:
        parser.error("--proxy-cores must be at least 1")
    if args.proxy_cores > 1 and cores < args.proxy_cores + 1:
        parser.error(f"--proxy-cores {args.proxy_cores} needs {args.proxy_cores + 1} cores; this machine has {cores}")
    args.load_cpu = 0 if cores >= 2 else None
    args.proxy_cpu = None if cores < 2 else 1 if args.proxy_cores == 1 else f"1-{args.proxy_cores}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    args.nice_applied = _raise_priority(args.nice)
    with tempfile.TemporaryDirectory(prefix="flushgate-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.start()
            bench.run()
        finally:
            bench.stop()
        data = bench.results()
    write_outputs(args.out, data, plot=not args.no_plot)
    if args.arrivals:
        lines = (json.dumps(line) + "\n" for line in bench.arrivals)
        (args.out / "arrivals.jsonl").write_text("".join(lines))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
