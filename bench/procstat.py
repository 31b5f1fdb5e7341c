"""CPU time of a process and all its descendants, read from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def parse_stat(text: str) -> tuple[int, int]:
    """(parent pid, utime + stime in clock ticks) from the text of ``/proc/PID/stat``.

    The command name sits in parentheses and may itself hold spaces or parentheses, so fields are counted
    from the last ``)``: state is field 3, ppid field 4, utime and stime fields 14 and 15 (proc(5)).
    """
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _all_stats() -> dict[int, tuple[int, int]]:
    stats: dict[int, tuple[int, int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return stats


def _tree(root: int, stats: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU seconds used so far by ``root`` and every live descendant (threads included)."""
    stats = _all_stats()
    return sum(stats[pid][1] for pid in _tree(root, stats)) / _TICKS_PER_S


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant."""
    return _tree(root, _all_stats())


def machine_busy_seconds() -> float:
    """CPU seconds all cores together spent not idle since boot (the ``cpu`` line of /proc/stat)."""
    fields = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / _TICKS_PER_S
