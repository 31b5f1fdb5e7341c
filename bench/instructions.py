"""``python -m flushgate.bench.instructions``: what the per-hop record costs, in instructions per chunk; with
``--per-request``, what a whole one-token request costs, in instructions.

CPU seconds per chunk, read from /proc, move by tens of percent from one run to the next on a shared machine
(scheduling, clock frequency, caches), which hides a difference of a few percent. Instructions executed do not.
flushgate runs under valgrind's callgrind with instrumentation off; after a warm-up it is switched on for one
fixed workload (the same requests, the same tokens) and the count is dumped: once with the per-hop record on and
once with ``--no-hop-timing``. The fake engine and the load generator run normally.

``--per-request`` counts ``ONE_TOKEN`` instead: requests of one token, each on a new connection, 8 at a time (what
``python -m flushgate.bench.request_cost`` reads as CPU seconds, in a count that repeats far more closely).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flushgate.bench.loadgen import Scenario, ScenarioRun, run_scenario
from flushgate.bench.runner import _run, machine
from flushgate.bench.targets import HOST, Target, _spawn, free_port, start_engine

WARM_UP = Scenario("warm-up", streams=4, requests=2, tokens=50, interval_us=0, deadline_s=300)
WORKLOAD = Scenario("counted", streams=8, requests=4, tokens=250, interval_us=0, deadline_s=600)
ONE_TOKEN_WARM_UP = Scenario("warm-up", streams=4, requests=25, tokens=1, interval_us=0, deadline_s=300)
ONE_TOKEN = Scenario("one-token", streams=8, requests=50, tokens=1, interval_us=0, deadline_s=600)
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def count(
    workdir: Path, engine_port: int, extra: list[str], warm_up: Scenario = WARM_UP, workload: Scenario = WORKLOAD
) -> dict[str, float]:
    """Instructions flushgate executed for ``workload``, with ``extra`` flags."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    port = free_port()
    out = workdir / "callgrind.out"
    command = [
        valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "flushgate", "serve", "--upstream", f"http://{HOST}:{engine_port}",
        "--host", HOST, "--port", str(port), "--log-format", "json", *extra,
    ]  # fmt: skip
    log_path = workdir / "flushgate.log"
    with log_path.open("ab") as log:
        gateway = Target("flushgate", port, _spawn(command, log), log_path)
    try:
        gateway.wait_ready("/healthz", 600)  # start-up under valgrind takes a while
        _complete(_run(run_scenario(HOST, port, warm_up)), warm_up)
        assert gateway.process is not None
        pid = str(gateway.process.pid)
        subprocess.run([control, "--instr=on", pid], check=True, capture_output=True)
        _complete(_run(run_scenario(HOST, port, workload)), workload)
        subprocess.run([control, "--dump=counted", pid], check=True, capture_output=True)
    finally:
        gateway.stop()
    dumps = sorted(workdir.glob("callgrind.out*"))
    totals = [int(m.group(1)) for path in dumps for m in [_TOTAL.search(path.read_bytes())] if m]
    instructions = max(totals)  # the dump of the counted part (the final one at exit holds only its tail)
    for path in dumps:
        path.unlink()
    chunks = workload.expected_chunks
    requests = workload.streams * workload.requests
    records = [json.loads(line) for line in log_path.read_bytes().splitlines() if b'"event":"request"' in line]
    counted = records[-requests:]
    reads = sum(record.get("chunks") or 0 for record in counted)  # reads from the engine (0 with the record off)
    log_path.unlink()
    return {
        "instructions": instructions,
        "chunks": chunks,
        "per_chunk": instructions / chunks,
        "requests": requests,
        "per_request": instructions / requests,
        "reads": reads,
    }


def _complete(run: ScenarioRun, scenario: Scenario) -> None:
    results = run.results()
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{scenario.name}: {len(bad)} of {len(results)} requests did not complete: {bad[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.instructions", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="default: docs/bench/hop-instructions.json")
    parser.add_argument("--per-request", action="store_true", help="count whole one-token requests instead")
    args = parser.parse_args(argv)
    if args.per_request:
        return _per_request(args.out)
    with tempfile.TemporaryDirectory(prefix="flushgate-instructions-") as tmp:
        engine = start_engine(Path(tmp), None)
        try:
            on = count(Path(tmp), engine.port, [])
            off = count(Path(tmp), engine.port, ["--no-hop-timing"])
        finally:
            engine.stop()
    extra = on["per_chunk"] / off["per_chunk"] - 1
    report = {
        "workload": {"streams": WORKLOAD.streams, "requests": WORKLOAD.requests, "tokens": WORKLOAD.tokens},
        "hop_timing_on": on,
        "hop_timing_off": off,
        "extra_per_chunk": round(extra, 4),
        "goal_met": extra <= 0.03,
    }
    out = args.out or Path("docs/bench/hop-instructions.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"per-hop record: {on['per_chunk']:,.0f} instructions per chunk on, {off['per_chunk']:,.0f} off "
        f"({extra:+.1%}; goal at most +3%: {'met' if extra <= 0.03 else 'not met'})"
    )
    return 0


def _per_request(out: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="flushgate-instructions-") as tmp:
        engine = start_engine(Path(tmp), None)
        try:
            counted = count(Path(tmp), engine.port, [], ONE_TOKEN_WARM_UP, ONE_TOKEN)
        finally:
            engine.stop()
    print(f"{counted['per_request']:,.0f} instructions per one-token request on a new connection")
    if out is not None:
        workload = {"clients": ONE_TOKEN.streams, "requests": counted["requests"], "tokens": ONE_TOKEN.tokens}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "workload": workload, "counted": counted}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
