"""``doctor logs``: where requests spent their time, over many records, and which requests fared worst."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flushgate.doctor.records import (
    FIRST_TOKEN,
    KNOWN_FIELDS,
    TOTAL,
    Hop,
    ReadStats,
    Record,
    first_token_parts,
    has_field,
    hop_of,
    hop_parts,
    number,
    read_records,
)
from flushgate.doctor.stats import percentile
from flushgate.doctor.verdicts import seconds

WorstBy = Literal["total", "ttft", "gap"]
WORST_KEYS: dict[WorstBy, tuple[str, ...]] = {"total": TOTAL, "ttft": FIRST_TOKEN, "gap": ("gap_max_ms",)}

_MEASURES: dict[str, Callable[[Record], float | None]] = {
    "TTFT": lambda r: number(r, *FIRST_TOKEN),
    "total": lambda r: number(r, *TOTAL),
    "gap p99": lambda r: number(r, "gap_p99_ms"),
    "gap max": lambda r: number(r, "gap_max_ms"),
    "gaps over 100 ms": lambda r: number(r, "gaps_over_100ms"),
    "tokens": lambda r: number(r, "tokens"),
    "decode tok/s": lambda r: number(r, "decode_tok_s", "chunk_rate_s"),
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
    share: float | None = None  # of the table's summed time


@dataclass(slots=True)
class WorstRequest:
    request_id: str
    status: int | None
    outcome: str | None
    ttft_ms: float | None
    total_ms: float | None
    gap_max_ms: float | None
    most_time_in: str | None
    most_time_ms: float | None


@dataclass(slots=True)
class LogsReport:
    records: int
    lines: int
    skipped_lines: int
    outcomes: dict[str, int]
    parts: list[Spread]  # where all time went
    first_token_parts: list[Spread]  # where the time before the first token went
    hops: dict[Hop, float]  # share of all time
    dominant_hop: Hop | None
    dominant_part: str | None
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


def _table(per_record: Sequence[dict[str, float]]) -> list[Spread]:
    names = list(dict.fromkeys(name for parts in per_record for name in parts))
    spreads = [spread(name, [parts[name] for parts in per_record if name in parts]) for name in names]
    all_time = sum(s.total for s in spreads)
    for s in spreads:
        s.share = s.total / all_time if all_time else None
    return spreads


def _largest(spreads: Sequence[Spread]) -> str | None:
    top = max(spreads, key=lambda s: s.total, default=None)
    return top.name if top is not None and top.total > 0 else None


def _measures(records: Sequence[Record]) -> list[Spread]:
    """Per-request numbers that are not parts of the time: what the user felt, and the shape of the stream."""
    found = []
    for name, pick in _MEASURES.items():
        values = [v for v in (pick(r) for r in records) if v is not None]
        if values:
            found.append(spread(name, values))
    return found


def analyse(records: Sequence[Record], stats: ReadStats, worst: int = 5, worst_by: WorstBy = "total") -> LogsReport:
    per_record = [hop_parts(r) for r in records]
    parts = _table(per_record)
    hops: dict[Hop, float] = {}
    for part in parts:
        hop = hop_of(part.name)
        hops[hop] = hops.get(hop, 0.0) + (part.share or 0.0)
    first_token = _table([first_token_parts(r) for r in records])
    outcomes: dict[str, int] = {}
    for r in records:
        outcome = str(r.get("outcome", "unknown"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return LogsReport(
        records=len(records),
        lines=stats.lines,
        skipped_lines=stats.lines - stats.records,
        outcomes=outcomes,
        parts=parts,
        first_token_parts=first_token,
        hops=hops,
        dominant_hop=max(hops.items(), key=lambda kv: kv[1])[0] if any(hops.values()) else None,
        dominant_part=_largest(parts),
        dominant_before_first_token=_largest(first_token),
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
        r, parts = records[i], per_record[i]
        largest = max(parts, key=lambda name: parts[name]) if parts else None
        status = r.get("status")
        worst.append(
            WorstRequest(
                request_id=str(r.get("request_id", "?")),
                status=status if isinstance(status, int) else None,
                outcome=str(r["outcome"]) if "outcome" in r else None,
                ttft_ms=number(r, *FIRST_TOKEN),
                total_ms=number(r, *TOTAL),
                gap_max_ms=number(r, "gap_max_ms"),
                most_time_in=largest,
                most_time_ms=parts[largest] if largest else None,
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


def _spread_rows(spreads: Sequence[Spread], with_share: bool) -> list[list[str]]:
    rows = []
    for s in spreads:
        row = [s.name, str(s.count), _ms(s.p50), _ms(s.p90), _ms(s.p99), _ms(s.max)]
        if with_share:
            row.append(f"{(s.share or 0) * 100:.0f}%")
        rows.append(row)
    return rows


def _most_time(worst: WorstRequest) -> str:
    if worst.most_time_in is None or worst.most_time_ms is None:
        return "-"
    return f"{worst.most_time_in} {seconds(worst.most_time_ms)}"


def render_logs(report: LogsReport) -> str:
    if not report.records:
        return f"doctor logs: no request records among {report.lines} lines (flushgate writes them as JSON lines)\n"
    outcomes = ", ".join(f"{n} {name}" for name, n in sorted(report.outcomes.items(), key=lambda kv: -kv[1]))
    out = [f"doctor logs: {report.records} requests ({outcomes})", ""]
    share_header = ["n", "p50", "p90", "p99", "max", "share"]
    if report.parts:
        out += _grid(["where the time went (ms)", *share_header], _spread_rows(report.parts, True))
    if report.first_token_parts:
        rows = _spread_rows(report.first_token_parts, True)
        out += ["", *_grid(["before the first token (ms)", *share_header], rows)]
    if report.measures:
        out += ["", *_grid(["per request", *share_header[:-1]], _spread_rows(report.measures, False))]
    out.append("")
    if report.dominant_hop is not None:
        ranked = sorted(report.hops.items(), key=lambda kv: -kv[1])
        hops = ", ".join(f"{hop} {share * 100:.0f}%" for hop, share in ranked)
        out.append(f"dominant hop: {report.dominant_hop} ({hops} of all time); largest part: {report.dominant_part}")
    if report.dominant_before_first_token is not None:
        out.append(f"before the first token, most time went to: {report.dominant_before_first_token}")
    if report.worst:
        out += ["", f"worst {len(report.worst)} requests:"]
        rows = [
            [
                w.request_id[:32],
                str(w.status if w.status is not None else "-"),
                w.outcome or "-",
                _ms(w.ttft_ms),
                _ms(w.total_ms),
                _ms(w.gap_max_ms),
                _most_time(w),
            ]
            for w in report.worst
        ]
        out += _grid(["request id", "status", "outcome", "TTFT ms", "total ms", "gap max ms", "most time in"], rows)
    if report.missing_fields:
        out += ["", "not in these records (what needs them is left out): " + ", ".join(report.missing_fields)]
    if report.skipped_lines:
        out += ["", f"{report.skipped_lines} other lines skipped"]
    return "\n".join(out) + "\n"
