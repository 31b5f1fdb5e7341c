"""A chart for reports: tokens received over time, one line per path. Needs matplotlib (``flushgate[chart]``)."""

from __future__ import annotations

from pathlib import Path

from flushgate.doctor.probe import ProbeReport
from flushgate.doctor.render import representative


class ChartUnavailable(Exception):
    """matplotlib is not installed."""


def write_chart(report: ProbeReport, destination: Path) -> None:
    """PNG or SVG, chosen by the file's suffix."""
    if destination.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"the chart is written as .png or .svg, not {destination.suffix or 'no suffix'!r}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartUnavailable("the chart needs matplotlib: pip install 'flushgate[chart]'") from None
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for result in report.paths:
        run = representative(result.runs)
        if run is None:
            continue
        times = [0.0] + [t / 1000 for t in run.token_times]
        counts = list(range(len(times)))
        axes.step(times, counts, where="post", label=f"{result.name}: {result.verdict}")
    axes.set_xlabel("seconds since the request was sent")
    axes.set_ylabel("tokens received")
    axes.set_title(f"Token arrivals per path ({report.model}, one typical request each)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    figure.savefig(destination)
