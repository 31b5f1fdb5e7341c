"""``python -m flushgate.bench.instructions``: what the per-hop record costs, in instructions per chunk.

CPU seconds per chunk, read from /proc, move by tens of percent from one run to the next on a shared machine
(scheduling, clock frequency, caches), which hides a difference of a few percent. Instructions executed do not.
flushgate runs under valgrind's callgrind with instrumentation off; after a warm-up it is switched on for one
fixed workload (the same requests, the same tokens) and the count is dumped: once with the per-hop record on and
once with ``--no-hop-timing``. The fake engine and the load generator run normally.
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
from flushgate.bench.runner import _run
from flushgate.bench.targets import HOST, Target, _spawn, free_port, start_engine

WARM_UP = Scenario("warm-up", streams=4, requests=2, tokens=50, interval_us=0, deadline_s=300)
WORKLOAD = Scenario("counted", streams=8, requests=4, tokens=250, interval_us=0, deadline_s=600)
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def count(workdir: Path, engine_port: int, extra: list[str]) -> dict[str, float]:
    """Instructions flushgate executed for WORKLOAD, with ``extra`` flags."""
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
        _complete(_run(run_scenario(HOST, port, WARM_UP)), WARM_UP)
        assert gateway.process is not None
        pid = str(gateway.process.pid)
        subprocess.run([control, "--instr=on", pid], check=True, capture_output=True)
        _complete(_run(run_scenario(HOST, port, WORKLOAD)), WORKLOAD)
        subprocess.run([control, "--dump=counted", pid], check=True, capture_output=True)
    finally:
        gateway.stop()
    dumps = sorted(workdir.glob("callgrind.out*"))
    totals = [int(m.group(1)) for path in dumps for m in [_TOTAL.search(path.read_bytes())] if m]
    instructions = max(totals)  # the dump of the counted part (the final one at exit holds only its tail)
    for path in dumps:
        path.unlink()
    chunks = WORKLOAD.expected_chunks
    records = [json.loads(line) for line in log_path.read_bytes().splitlines() if b'"event":"request"' in line]
    counted = records[-WORKLOAD.streams * WORKLOAD.requests :]
    reads = sum(record.get("chunks") or 0 for record in counted)  # reads from the engine (0 with the record off)
    log_path.unlink()
    return {"instructions": instructions, "chunks": chunks, "per_chunk": instructions / chunks, "reads": reads}


def _complete(run: ScenarioRun, scenario: Scenario) -> None:
    results = run.results()
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{scenario.name}: {len(bad)} of {len(results)} requests did not complete: {bad[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.instructions", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/hop-instructions.json"))
    args = parser.parse_args(argv)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"per-hop record: {on['per_chunk']:,.0f} instructions per chunk on, {off['per_chunk']:,.0f} off "
        f"({extra:+.1%}; goal at most +3%: {'met' if extra <= 0.03 else 'not met'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
