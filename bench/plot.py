"""One PNG of a run: added TTFT, added per-chunk delay and proxy CPU, per scenario and target (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; chosen before pyplot is imported
import matplotlib.pyplot as plt

_PANELS = (
    ("added_ttft_p50_ms", "added TTFT p50 (ms)"),
    ("added_delay_p50_ms", "added per-chunk delay p50 (ms)"),
    ("added_delay_p99_ms", "added per-chunk delay p99 (ms)"),
    ("cpu_s_per_1000_chunks", "proxy CPU s per 1000 chunks"),
)
_FLOOR = 1e-3  # a symlog axis shows 0 and negatives; below a microsecond is drawn as linear


def plot_results(data: dict[str, Any], path: Path) -> None:
    results: dict[str, dict[str, dict[str, Any]]] = data["results"]
    scenarios = list(results)
    targets = [t for t in data["versions"] if t != "engine-direct"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    width = 0.8 / max(len(targets), 1)
    for ax, (key, label) in zip(axes.flat, _PANELS, strict=True):
        for i, target in enumerate(targets):
            values = [results[s].get(target, {}).get(key) for s in scenarios]
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(scenarios))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=target)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(label)
        ax.set_yscale("symlog", linthresh=_FLOOR if key.startswith("cpu") else 0.1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend()
    m = data["machine"]
    figure.suptitle(f"What each proxy adds over the engine direct: {m['cpu_model']}, {m['nproc']} cores")
    figure.savefig(path, dpi=110)
    plt.close(figure)
