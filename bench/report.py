"""Pooling the rounds per scenario and target, the numbers per target, the goals met or not, and the tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flushgate.bench.loadgen import ScenarioRun
from flushgate.bench.stats import Spread, added, within

DIRECT = "engine-direct"
FLUSHGATE = "flushgate"
FLUSHGATE_NO_HOP = "flushgate-no-hop"  # the same with --no-hop-timing: what the per-hop record costs
NGINX = "nginx"
NGINX_AGAIN = "nginx-again"  # a second nginx, configured alike: judged in flushgate's place, the goals' noise floor
LITELLM = "litellm"

# Where the reference adds about nothing, a ratio is noise: an absolute allowance of this many ms decides.
NOISE_FLOOR_MS = 0.3


@dataclass
class Cell:
    """One target in one scenario, every round pooled."""

    ttft_ms: list[float] = field(default_factory=list)
    delay_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    elapsed_s: float = 0.0
    cpu_s: float | None = None
    requests: int = 0
    errors: int = 0
    incomplete: int = 0
    error_samples: list[str] = field(default_factory=list)
    foreign_cpu_s: float = 0.0
    foreign_window_s: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def add(self, run: ScenarioRun, cpu_s: float | None, foreign: tuple[float, float] = (0.0, 0.0)) -> None:
        """Pool one round; ``foreign`` is (CPU s other processes took, over how many wall s)."""
        results = run.results()
        round_ttft: list[float] = []
        round_delay: list[float] = []
        for result in results:
            self.requests += 1
            if result.ttft_ns is not None:
                round_ttft.append(result.ttft_ns / 1e6)
            round_delay.extend(d / 1e6 for d in result.delays_ns)
            self.chunks += result.tokens
            if result.error is not None:
                self.errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(result.error)
            elif not result.complete:
                self.incomplete += 1
        self.ttft_ms += round_ttft
        self.delay_ms += round_delay
        elapsed = (run.ended_ns - run.started_ns) / 1e9
        self.elapsed_s += elapsed
        if cpu_s is not None:
            self.cpu_s = (self.cpu_s or 0.0) + cpu_s
        self.foreign_cpu_s += foreign[0]
        self.foreign_window_s += foreign[1]
        ttft = Spread.of(round_ttft)
        delay = Spread.of(round_delay)
        self.rounds.append(
            {
                "ttft_p50_ms": ttft and ttft.p50,
                "delay_p50_ms": delay and delay.p50,
                "delay_p99_ms": delay and delay.p99,
                "elapsed_s": elapsed,
                "cpu_s": cpu_s,
                "foreign_cpu_s": foreign[0],
            }
        )

    @property
    def ttft(self) -> Spread | None:
        return Spread.of(self.ttft_ms)

    @property
    def delay(self) -> Spread | None:
        return Spread.of(self.delay_ms)

    @property
    def chunks_per_s(self) -> float | None:
        return self.chunks / self.elapsed_s if self.elapsed_s else None

    @property
    def cpu_per_1000_chunks(self) -> float | None:
        if self.cpu_s is None or not self.chunks:
            return None
        return self.cpu_s / self.chunks * 1000


Results = Mapping[str, Mapping[str, Cell]]  # scenario -> target -> pooled cell


def summary(cell: Cell, direct: Cell | None) -> dict[str, Any]:
    """The per-target numbers of one scenario, in ms where they are times."""
    ttft, delay = cell.ttft, cell.delay
    base_ttft = direct.ttft if direct is not None else None
    base_delay = direct.delay if direct is not None else None
    added_ttft = added(ttft, base_ttft)
    added_delay = added(delay, base_delay)
    return {
        "requests": cell.requests,
        "errors": cell.errors,
        "incomplete": cell.incomplete,
        "error_samples": cell.error_samples,
        "chunks": cell.chunks,
        "ttft_p50_ms": ttft and ttft.p50,
        "ttft_p99_ms": ttft and ttft.p99,
        "added_ttft_p50_ms": added_ttft and added_ttft[0],
        "added_ttft_p99_ms": added_ttft and added_ttft[1],
        "delay_p50_ms": delay and delay.p50,
        "delay_p99_ms": delay and delay.p99,
        "added_delay_p50_ms": added_delay and added_delay[0],
        "added_delay_p99_ms": added_delay and added_delay[1],
        "chunks_per_s": cell.chunks_per_s,
        "cpu_s": cell.cpu_s,
        "cpu_s_per_1000_chunks": cell.cpu_per_1000_chunks,
        "foreign_cpu_share": cell.foreign_cpu_s / cell.foreign_window_s if cell.foreign_window_s else None,
        "rounds": cell.rounds,
    }


def summarize(results: Results) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        scenario: {name: summary(cell, cells.get(DIRECT)) for name, cell in cells.items()}
        for scenario, cells in results.items()
    }


@dataclass(frozen=True, slots=True)
class Check:
    """One goal for flushgate: met, not met, or not measurable in this run (None), and the numbers behind it."""

    goal: str
    met: bool | None
    detail: str


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _delay_check(table: dict[str, dict[str, dict[str, Any]]], scenarios: Sequence[str], candidate: str) -> Check:
    goal = f"added per-chunk delay p50 and p99 at most 1.5x nginx's (or within {NOISE_FLOOR_MS} ms of it)"
    verdicts: list[bool] = []
    details: list[str] = []
    for scenario in scenarios:
        cells = table.get(scenario, {})
        judged, ng = cells.get(candidate), cells.get(NGINX)
        if judged is None or ng is None:
            continue
        for q in ("p50", "p99"):
            mine, ref = judged[f"added_delay_{q}_ms"], ng[f"added_delay_{q}_ms"]
            if mine is None or ref is None:
                continue
            ok = within(mine, ref, factor=1.5, slack=NOISE_FLOOR_MS)
            verdicts.append(ok)
            details.append(f"{scenario} {q}: {_fmt(mine)} vs nginx {_fmt(ref)} ms {'ok' if ok else 'OVER'}")
    return Check(goal, all(verdicts) if verdicts else None, "; ".join(details))


def _stress_check(table: dict[str, dict[str, dict[str, Any]]], stress: str, candidate: str) -> Check:
    goal = f"{stress}: every request completes, added TTFT p50 at most 2x nginx's (or within {NOISE_FLOOR_MS} ms)"
    cells = table.get(stress, {})
    judged, ng = cells.get(candidate), cells.get(NGINX)
    if judged is None or ng is None:
        return Check(goal, None, f"{candidate} or nginx not measured")
    all_done = judged["errors"] == 0 and judged["incomplete"] == 0
    mine, ref = judged["added_ttft_p50_ms"], ng["added_ttft_p50_ms"]
    ttft_ok = mine is not None and ref is not None and within(mine, ref, factor=2, slack=NOISE_FLOOR_MS)
    detail = (
        f"{judged['requests'] - judged['errors'] - judged['incomplete']}/{judged['requests']} complete; "
        f"added TTFT p50 {_fmt(mine)} vs nginx {_fmt(ref)} ms"
    )
    return Check(goal, all_done and ttft_ok, detail)


def _cpu_check(results: Results, candidate: str) -> Check:
    goal = "proxy CPU per 1000 chunks at most 2x nginx's (all scenarios together)"

    mine, ref = _total_cpu_per_1000(results, candidate), _total_cpu_per_1000(results, NGINX)
    if mine is None or ref is None:
        return Check(goal, None, f"{candidate} or nginx not measured")
    return Check(goal, mine <= 2 * ref, f"{mine:.4f} vs nginx {ref:.4f} CPU s per 1000 chunks ({mine / ref:.2f}x)")


def _litellm_check(table: dict[str, dict[str, dict[str, Any]]], scenario: str) -> Check:
    goal = f"{scenario}: added TTFT p50 at least 10x better than LiteLLM's"
    cells = table.get(scenario, {})
    fg, ll = cells.get(FLUSHGATE), cells.get(LITELLM)
    if fg is None or ll is None or fg["added_ttft_p50_ms"] is None or ll["added_ttft_p50_ms"] is None:
        return Check(goal, None, "flushgate or LiteLLM not measured")
    mine, theirs = fg["added_ttft_p50_ms"], ll["added_ttft_p50_ms"]
    # Where flushgate adds nothing measurable the ratio is unbounded; the noise floor stands in for it.
    ratio = theirs / max(mine, NOISE_FLOOR_MS / 10)
    return Check(goal, ratio >= 10, f"flushgate {mine:.3f} vs LiteLLM {theirs:.3f} ms ({ratio:.1f}x)")


def checks(results: Results, *, stress: str, many: str, candidate: str = FLUSHGATE) -> list[Check]:
    """The goals, ``candidate`` against nginx; the LiteLLM and per-hop goals are flushgate's own."""
    table = summarize(results)
    return [
        _delay_check(table, list(results), candidate),
        _stress_check(table, stress, candidate),
        _cpu_check(results, candidate),
        _litellm_check(table, many),
        _hop_check(results),
    ]


def _total_cpu_per_1000(results: Results, name: str) -> float | None:
    cells = [cells[name] for cells in results.values() if name in cells]
    if not cells or any(c.cpu_s is None for c in cells):
        return None
    chunks = sum(c.chunks for c in cells)
    return sum(c.cpu_s or 0.0 for c in cells) / chunks * 1000 if chunks else None


def _hop_check(results: Results) -> Check:
    goal = "per-hop timing on costs at most 3% more CPU per chunk than off (all scenarios together)"
    on, off = _total_cpu_per_1000(results, FLUSHGATE), _total_cpu_per_1000(results, FLUSHGATE_NO_HOP)
    if on is None or off is None:
        return Check(goal, None, f"{FLUSHGATE} or {FLUSHGATE_NO_HOP} (--no-hop-timing) not measured")
    return Check(goal, on <= 1.03 * off, f"on {on:.4f} vs off {off:.4f} CPU s per 1000 chunks ({on / off - 1:+.1%})")


_COLUMNS = (
    ("target", None, ""),
    ("TTFT p50", "ttft_p50_ms", "ms"),
    ("TTFT p99", "ttft_p99_ms", "ms"),
    ("added TTFT p50", "added_ttft_p50_ms", "ms"),
    ("added TTFT p99", "added_ttft_p99_ms", "ms"),
    ("added chunk delay p50", "added_delay_p50_ms", "ms"),
    ("added chunk delay p99", "added_delay_p99_ms", "ms"),
    ("chunks/s", "chunks_per_s", ""),
    ("proxy CPU s/1000 chunks", "cpu_s_per_1000_chunks", ""),
    ("errors", "errors", ""),
    ("incomplete", "incomplete", ""),
    ("other processes' CPU", "foreign_cpu_share", "cores"),
)


def _cell_text(key: str | None, row: dict[str, Any], name: str) -> str:
    if key is None:
        return name
    value = row[key]
    if value is None:
        return "-"
    if key in ("errors", "incomplete"):
        return f"{value}/{row['requests']}"
    if key == "chunks_per_s":
        return f"{value:,.0f}"
    if key == "foreign_cpu_share":
        return f"{value:.2f}"
    if key == "cpu_s_per_1000_chunks":
        return f"{value:.4f}"
    if key.startswith("added_") and key.endswith("_ms"):
        return f"{value:+.3f}"
    return f"{value:.3f}"


def markdown_tables(table: dict[str, dict[str, dict[str, Any]]], titles: Mapping[str, str]) -> str:
    out: list[str] = []
    header = "| " + " | ".join(f"{label} ({unit})" if unit else label for label, _, unit in _COLUMNS) + " |"
    rule = "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(_COLUMNS))) + "|"
    for scenario, rows in table.items():
        out += [f"### {titles.get(scenario, scenario)}", "", header, rule]
        for name, row in rows.items():
            out.append("| " + " | ".join(_cell_text(key, row, name) for _, key, _ in _COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def markdown_checks(found: Sequence[Check]) -> str:
    lines = ["| goal | result | numbers |", "| --- | --- | --- |"]
    for check in found:
        verdict = "met" if check.met else ("not measured" if check.met is None else "**not met**")
        lines.append(f"| {check.goal} | {verdict} | {check.detail} |")
    return "\n".join(lines) + "\n"
