"""vLLM's start-up log lines, mapped to the load phases a person wants to see."""

from __future__ import annotations

import re
from enum import StrEnum


class LoadPhase(StrEnum):
    """In the order vLLM goes through them (the CPU build skips compiling and graph capture)."""

    STARTING = "starting process"
    INITIALISING = "initialising engine"
    LOADING_WEIGHTS = "loading weights"
    COMPILING = "compiling"
    KV_CACHE = "allocating KV cache"
    GRAPH_CAPTURE = "capturing graphs"
    STARTING_SERVER = "starting API server"
    READY = "ready"


# The first match names the phase a line announces, so later phases come first. From vLLM's own messages.
_PATTERNS: tuple[tuple[re.Pattern[str], LoadPhase], ...] = (
    (
        re.compile(r"Starting vLLM (API )?server|Available routes are|Application startup complete"),
        LoadPhase.STARTING_SERVER,
    ),
    (re.compile(r"Capturing CUDA graphs?|Graph capturing"), LoadPhase.GRAPH_CAPTURE),
    (re.compile(r"KV cache size|Available KV cache memory|GiB for KV cache|Memory profiling"), LoadPhase.KV_CACHE),
    (
        re.compile(r"Compiling a graph|for vLLM's torch\.compile|torch\.compile took|Dynamo bytecode transform"),
        LoadPhase.COMPILING,
    ),
    (
        re.compile(r"Starting to load model|Loading weights|Loading safetensors|checkpoint shards"),
        LoadPhase.LOADING_WEIGHTS,
    ),
    (re.compile(r"Initializing a V1 LLM engine|Initializing an LLM engine"), LoadPhase.INITIALISING),
)
_ORDER = list(LoadPhase)


def phase_of(line: str) -> LoadPhase | None:
    """The phase this log line announces, if any."""
    for pattern, phase in _PATTERNS:
        if pattern.search(line):
            return phase
    return None


def advance(current: LoadPhase, line: str) -> LoadPhase:
    """Phases only move forward: a late line about weights does not send the progress line back."""
    seen = phase_of(line)
    if seen is None or _ORDER.index(seen) <= _ORDER.index(current):
        return current
    return seen
