"""``python -m flushgate.bench.profile``: where flushgate's CPU goes in one scenario, sampled with py-spy.

flushgate runs pinned as in the benchmark; py-spy samples it (without pausing it) while the scenario repeats,
only while it holds the GIL: uvloop gives the GIL up while it waits in epoll and does its own socket reads, so
idle time stays out and what remains is the Python side of the hot path. Writes the collapsed stacks (for any
flamegraph viewer) and prints the innermost frames with the most samples.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from flushgate.bench.loadgen import run_scenario
from flushgate.bench.runner import SCENARIOS, _run
from flushgate.bench.targets import HOST, pin_load_side, start_engine, start_flushgate


def top_frames(collapsed: str, count: int, *, inclusive: bool = False) -> list[tuple[float, str]]:
    """Share of samples per frame from py-spy's raw (collapsed stack) output: innermost frames only, or every
    frame on the stack (``inclusive``), with line numbers dropped so a function counts once."""
    counted: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        total += int(samples)
        if inclusive:
            for frame in {f.rsplit(":", 1)[0] for f in stack.split(";")}:
                counted[frame] += int(samples)
        else:
            counted[stack.rsplit(";", 1)[-1]] += int(samples)
    return [(n / total * 100, frame) for frame, n in counted.most_common(count)] if total else []


def main(argv: list[str] | None = None) -> int:
    known = {s.name: s for s in SCENARIOS}
    parser = argparse.ArgumentParser(prog="python -m flushgate.bench.profile", description=__doc__)
    parser.add_argument("--scenario", choices=list(known), default="256x1ms")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("artifacts/profile"))
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    load_cpu, proxy_cpu = pin_load_side()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"flushgate-{args.scenario}.txt"
    with tempfile.TemporaryDirectory(prefix="flushgate-profile-") as tmp:
        engine = start_engine(Path(tmp), load_cpu)
        gateway = start_flushgate(Path(tmp), engine.port, proxy_cpu, None)
        assert gateway.process is not None
        sampling = ["--nonblocking", "--gil", "--rate", "500", "--format", "raw", "--output", str(raw)]
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(gateway.process.pid), *sampling], stdout=subprocess.DEVNULL
        )
        try:
            time.sleep(1)  # py-spy attaches
            for _ in range(args.repeat):
                _run(run_scenario(HOST, gateway.port, known[args.scenario]))
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            gateway.stop()
            engine.stop()
    collapsed = raw.read_text()
    lines = [f"flushgate, scenario {args.scenario} x {args.repeat}: share of py-spy samples (GIL held)", "", "own:"]
    lines += [f"{share:5.1f}%  {frame}" for share, frame in top_frames(collapsed, 25)]
    lines += ["", "including callees:"]
    lines += [f"{share:5.1f}%  {frame}" for share, frame in top_frames(collapsed, 40, inclusive=True)]
    summary = args.out / f"flushgate-{args.scenario}-top.txt"
    summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\ncollapsed stacks: {raw}\nsummary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
