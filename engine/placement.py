"""Where each of several managed engines runs: its own GPU, or a share of one.

Engines are dealt round the GPUs in turn (engine i on GPU i mod n) through ``CUDA_VISIBLE_DEVICES``; with
``--tensor-parallel-size t`` each engine takes a group of t GPUs. Where k engines land on one GPU (group), each
gets 1/k of the memory fraction the arguments ask for (``--gpu-memory-utilization``, vLLM's default 0.9 when none
is given), so together they take what one engine would have. A single engine is left as it was: it sees every
GPU the gateway sees.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
MEMORY_FLAG = "--gpu-memory-utilization"
TP_FLAGS = ("--tensor-parallel-size", "-tp")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees


@dataclass(frozen=True, slots=True)
class Placement:
    index: int
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # after every other argument, so they win

    @property
    def gpu(self) -> str | None:
        return self.env.get("CUDA_VISIBLE_DEVICES")


def visible_gpus(environ: Mapping[str, str] = os.environ, driver_dir: Path = NVIDIA_GPUS) -> tuple[str, ...]:
    """The GPUs engines may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU the driver lists, else none."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(gpu.strip() for gpu in listed.split(",") if gpu.strip())
    if driver_dir.is_dir():
        return tuple(str(i) for i in range(sum(1 for _ in driver_dir.iterdir())))
    return ()


def last_value(args: Sequence[str], flags: Sequence[str]) -> str | None:
    """The value of the last of ``flags`` among the arguments (the one vLLM would use), either spelling."""
    value = None
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(tuple(flag + "=" for flag in flags)):
            value = arg.split("=", 1)[1]
    return value


def place_engines(count: int, gpus: Sequence[str], args: Sequence[str]) -> list[Placement]:
    """One placement per engine; without GPUs (the CPU build), or for one engine, nothing extra."""
    if count < 1:
        raise ValueError("--engines must be at least 1")
    if count == 1 or not gpus:
        return [Placement(i) for i in range(count)]
    width = int(last_value(args, TP_FLAGS) or 1)
    groups = [",".join(gpus[j : j + width]) for j in range(0, len(gpus) - width + 1, width)]
    if not groups:
        raise ValueError(f"--tensor-parallel-size {width} needs {width} GPUs per engine; {len(gpus)} visible")
    sharing = Counter(groups[i % len(groups)] for i in range(count))
    fraction = float(last_value(args, (MEMORY_FLAG,)) or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION)
    placements = []
    for i in range(count):
        group = groups[i % len(groups)]
        share = sharing[group]
        extra = (MEMORY_FLAG, f"{fraction / share:.4g}") if share > 1 else ()
        placements.append(Placement(i, {"CUDA_VISIBLE_DEVICES": group}, extra))
    return placements
