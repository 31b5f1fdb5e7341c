"""``doctor logs``: where requests spent their time, over many records, and which requests fared worst."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flushgate.doctor.records import (
    KNOWN_FIELDS,
    STAGES,
    Hop,
    ReadStats,
    Record,
    first_token_ms,
    has_field,
    number,
    read_records,
    stage_times,
    total_ms,
)
from flushgate.doctor.stats import percentile
from flushgate.doctor.verdicts import seconds

WorstBy = Literal["total", "ttft", "gap"]
_STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
WORST_KEYS: dict[WorstBy, tuple[str, ...]] = {
    "total": ("total_ms", "duration_ms"),
    "ttft": ("first_token_ms", "ttft_ms", "first_event_ms", "first_chunk_ms"),
    "gap": ("gap_max_ms",),
}


@dataclass(slots=True)
class Spread:
    name: str
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    total: float  # summed over the records
    share: float | None = None  # of all stage time


@dataclass(slots=True)
class WorstRequest:
    request_id: str
    status: int | None
    outcome: str | None
    ttft_ms: float | None
    total_ms: float | None
    gap_max_ms: float | None
    dominant_stage: str | None
    dominant_ms: float | None


@dataclass(slots=True)
class LogsReport:
    records: int
    lines: int
    skipped_lines: int
    outcomes: dict[str, int]
    stages: list[Spread]
    hops: dict[Hop, float]  # share of all stage time
    dominant_hop: Hop | None
    dominant_stage: str | None
    dominant_before_first_token: str | None
    measures: list[Spread]
    worst: list[WorstRequest]
    missing_fields: list[str] = field(default_factory=list)


def spread(name: str, values: Sequence[float]) -> Spread:
    return Spread(
        name,
        len(values),
        percentile(values, 50),
        percentile(values, 90),
        percentile(values, 99),
        max(values, default=None),
        sum(values),
    )


_MEASURES: dict[str, Callable[[Record], float | None]] = {
    "TTFT": first_token_ms,
    "total": total_ms,
    "gap p99": lambda r: number(r, "gap_p99_ms"),
    "gap max": lambda r: number(r, "gap_max_ms"),
    "tokens": lambda r: number(r, "tokens"),
    "decode tok/s": lambda r: number(r, "decode_tok_s"),
}


def _measures(records: Sequence[Record]) -> list[Spread]:
    """Per-request numbers that are not stages: what the user felt, and the shape of the stream."""
    found = []
    for name, pick in _MEASURES.items():
        values = [v for v in (pick(r) for r in records) if v is not None]
        if values:
            found.append(spread(name, values))
    return found


def _dominant(shares: dict[str, float]) -> str | None:
    return max(shares, key=lambda name: shares[name]) if shares and max(shares.values()) > 0 else None


def analyse(records: Sequence[Record], stats: ReadStats, worst: int = 5, worst_by: WorstBy = "total") -> LogsReport:
    per_record = [stage_times(r) for r in records]
    stages = [spread(s.name, [t[s.name] for t in per_record if s.name in t]) for s in STAGES]
    stages = [s for s in stages if s.count]
    all_time = sum(s.total for s in stages)
    hop_time: dict[Hop, float] = {}
    for found in stages:
        found.share = found.total / all_time if all_time else None
        hop = _STAGE_BY_NAME[found.name].hop
        hop_time[hop] = hop_time.get(hop, 0.0) + found.total
    hops: dict[Hop, float] = {hop: t / all_time for hop, t in hop_time.items()} if all_time else {}
    early = {s.name: s.total for s in stages if _STAGE_BY_NAME[s.name].before_first_token}
    outcomes: dict[str, int] = {}
    for r in records:
        outcome = str(r.get("outcome", "unknown"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    dominant_hop = max(hops.items(), key=lambda kv: kv[1])[0] if hops else None
    return LogsReport(
        records=len(records),
        lines=stats.lines,
        skipped_lines=stats.lines - stats.records,
        outcomes=outcomes,
        stages=stages,
        hops=hops,
        dominant_hop=dominant_hop,
        dominant_stage=_dominant({s.name: s.total for s in stages}),
        dominant_before_first_token=_dominant(early),
        measures=_measures(records),
        worst=_worst(records, per_record, worst, worst_by),
        missing_fields=[name for name in KNOWN_FIELDS if records and not any(has_field(r, name) for r in records)],
    )


def _worst(
    records: Sequence[Record], per_record: Sequence[dict[str, float]], count: int, by: WorstBy
) -> list[WorstRequest]:
    keys = WORST_KEYS[by]
    ranked = sorted(
        (i for i, r in enumerate(records) if number(r, *keys) is not None),
        key=lambda i: number(records[i], *keys) or 0.0,
        reverse=True,
    )
    worst = []
    for i in ranked[:count]:
        r, times = records[i], per_record[i]
        stage = max(times, key=lambda name: times[name]) if times else None
        status = r.get("status")
        worst.append(
            WorstRequest(
                request_id=str(r.get("request_id", "?")),
                status=status if isinstance(status, int) else None,
                outcome=str(r["outcome"]) if "outcome" in r else None,
                ttft_ms=first_token_ms(r),
                total_ms=total_ms(r),
                gap_max_ms=number(r, "gap_max_ms"),
                dominant_stage=stage,
                dominant_ms=times[stage] if stage else None,
            )
        )
    return worst


def analyse_lines(lines: Iterable[bytes | str], worst: int = 5, worst_by: WorstBy = "total") -> LogsReport:
    stats = ReadStats()
    records = list(read_records(lines, stats))
    return analyse(records, stats, worst, worst_by)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def _most_time(worst: WorstRequest) -> str:
    if worst.dominant_stage is None or worst.dominant_ms is None:
        return "-"
    return f"{worst.dominant_stage} {seconds(worst.dominant_ms)}"


def render_logs(report: LogsReport) -> str:
    if not report.records:
        return f"doctor logs: no request records among {report.lines} lines (flushgate writes them as JSON lines)\n"
    outcomes = ", ".join(f"{n} {name}" for name, n in sorted(report.outcomes.items(), key=lambda kv: -kv[1]))
    out = [f"doctor logs: {report.records} requests ({outcomes})", ""]
    header = ["stage (ms)", "n", "p50", "p90", "p99", "max", "share"]
    rows = [
        [s.name, str(s.count), _ms(s.p50), _ms(s.p90), _ms(s.p99), _ms(s.max), f"{(s.share or 0) * 100:.0f}%"]
        for s in report.stages
    ]
    out += _grid(header, rows)
    if report.measures:
        out.append("")
        rows = [[m.name, str(m.count), _ms(m.p50), _ms(m.p90), _ms(m.p99), _ms(m.max)] for m in report.measures]
        out += _grid(["per request", "n", "p50", "p90", "p99", "max"], rows)
    out.append("")
    if report.dominant_hop is not None:
        hops = ", ".join(
            f"{hop} {share * 100:.0f}%" for hop, share in sorted(report.hops.items(), key=lambda kv: -kv[1])
        )
        out.append(f"dominant hop: {report.dominant_hop} ({hops} of all time)")
        out.append(f"dominant stage: {report.dominant_stage}")
        if report.dominant_before_first_token is not None:
            out.append(f"dominant stage before the first token: {report.dominant_before_first_token}")
    if report.worst:
        out += ["", f"worst {len(report.worst)} requests:"]
        rows = [
            [
                w.request_id[:16],
                str(w.status if w.status is not None else "-"),
                w.outcome or "-",
                _ms(w.ttft_ms),
                _ms(w.total_ms),
                _ms(w.gap_max_ms),
                f"{w.dominant_stage} {seconds(w.dominant_ms)}"
                if w.dominant_stage and w.dominant_ms is not None
                else "-",
            ]
            for w in report.worst
        ]
        out += _grid(["request id", "status", "outcome", "TTFT ms", "total ms", "gap max ms", "most time in"], rows)
    if report.missing_fields:
        out += ["", "not in these records (stages that need them are left out): " + ", ".join(report.missing_fields)]
    if report.skipped_lines:
        out += ["", f"{report.skipped_lines} other lines skipped"]
    return "\n".join(out) + "\n"
