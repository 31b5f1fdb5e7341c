"""Terminal output of a probe: the comparison table, the evidence per path, and a token-arrival timeline."""

from __future__ import annotations

from collections.abc import Sequence

from flushgate.doctor.capture import Capture
from flushgate.doctor.measures import RunMeasures
from flushgate.doctor.probe import PathResult, ProbeReport
from flushgate.doctor.stats import median
from flushgate.doctor.verdicts import seconds

TIMELINE_COLUMNS = 64
# tokens in one column: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, more
_DENSITY = ".:-=+*#@"
_LEGEND = "tokens per column: . 1  : 2  - 3-4  = 5-8  + 9-16  * 17-32  # 33-64  @ more"


def _number(value: float | None, digits: int = 0, cap: float | None = None) -> str:
    if value is None:
        return "-"
    if cap is not None and value > cap:
        return f">{cap:.0f}"
    return f"{value:.{digits}f}"


def _row(result: PathResult) -> list[str]:
    m: RunMeasures = result.measures
    gap = f"{_number(m.read_gap_p50_ms)}/{_number(m.read_gap_max_ms)}"
    name = result.name + (" (ref)" if result.reference else "")
    return [
        name,
        _number(m.ttft_ms),
        _number(m.last_token_ms),
        str(m.tokens),
        _number(m.tok_s, 1, cap=9999),
        gap,
        _number(m.tokens_per_read, 1),
        _number(m.bytes_per_event),
        result.verdict,
    ]


_HEADER = ["path", "TTFT ms", "last ms", "tokens", "tok/s", "gap p50/max ms", "tok/read", "B/event", "verdict"]


def table(report: ProbeReport) -> str:
    rows = [_HEADER] + [_row(result) for result in report.paths]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(w) if i in (0, len(row) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def engine_line(report: ProbeReport) -> str:
    engine = report.engine
    reference = report.paths[0].name
    if engine.tok_s is None and engine.ttft_ms is None:
        return f"engine cadence: unknown, {reference} streamed no tokens; the other paths are judged on their own"
    rate = f", {engine.tok_s:.1f} tok/s" if engine.tok_s is not None else ""
    first = f", first token after {seconds(engine.ttft_ms)}" if engine.ttft_ms is not None else ""
    return f"engine cadence, measured on {reference}: {engine.gap_ms:.1f} ms between tokens{rate}{first}"


def evidence(report: ProbeReport) -> str:
    width = max(len(result.name) for result in report.paths)
    lines = []
    for result in report.paths:
        texts = [finding.text for finding in result.findings] or [_clean_text(result, report)]
        lines.append(f"{result.name.ljust(width)}  {texts[0]}")
        lines.extend(f"{' ' * width}  {text}" for text in texts[1:])
    return "\n".join(lines)


def _clean_text(result: PathResult, report: ProbeReport) -> str:
    gap = result.measures.read_gap_p50_ms
    shown = f"{gap:.1f} ms apart" if gap is not None else "as sent"
    return f"clean: tokens arrived {shown}, against {report.engine.gap_ms:.1f} ms from the engine"


def representative(runs: Sequence[Capture]) -> Capture | None:
    """The request whose last token came at the median time: a typical one, not the best or the worst."""
    streamed = [run for run in runs if run.reads]
    if not streamed:
        return None
    middle = median([run.end_ms or 0.0 for run in streamed])
    return min(streamed, key=lambda run: abs((run.end_ms or 0.0) - (middle or 0.0)))


def _density(tokens: int) -> str:
    if tokens <= 0:
        return " "
    return _DENSITY[min(len(_DENSITY) - 1, (tokens - 1).bit_length())]


def timeline(report: ProbeReport, columns: int = TIMELINE_COLUMNS) -> str:
    chosen = [(result.name, representative(result.runs)) for result in report.paths]
    span = max((run.end_ms or 0.0 for _, run in chosen if run is not None), default=0.0)
    if span <= 0:
        return ""
    width = max(len(name) for name, _ in chosen)
    lines = []
    for name, run in chosen:
        counts = [0] * columns
        for read in run.reads if run is not None else ():
            counts[min(columns - 1, int(read.at_ms / span * columns))] += read.tokens
        lines.append(f"{name.ljust(width)} |{''.join(_density(c) for c in counts)}|")
    indent = " " * (width + 2)
    lines.append(indent + "0" + seconds(span).rjust(columns))
    lines.append(indent + _LEGEND)
    return "\n".join(lines)


def render(report: ProbeReport) -> str:
    head = f"doctor probe: {report.requests} streamed chat requests per path ({report.api} API, model {report.model}"
    head += f", up to {report.max_tokens} tokens)"
    parts = [head, "", table(report), "", engine_line(report), "", evidence(report)]
    drawn = timeline(report)
    if drawn:
        parts += ["", "token arrivals (one typical request per path):", drawn]
    return "\n".join(parts) + "\n"
