"""What one streamed answer looked like at the client, and the engine's own pace to compare it with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flushgate.doctor.bursts import find_bursts
from flushgate.doctor.capture import Capture
from flushgate.doctor.stats import gaps, median

MIN_BURST_TOKENS = 4  # fewer can be two reads meeting by chance on a busy machine
HELD_SILENCE_STEPS = 2  # a burst counts as held when the silence before it spans at least this many engine steps
ENGINE_GAP_FLOOR_MS = 0.5


@dataclass(slots=True)
class RunMeasures:
    tokens: int
    ttft_ms: float | None
    last_token_ms: float | None
    tok_s: float | None  # after the first token
    read_gap_p50_ms: float | None  # between reads that carried tokens
    read_gap_max_ms: float | None
    tokens_per_read: float | None
    bytes_per_event: float | None


def measure(capture: Capture) -> RunMeasures:
    times = capture.token_times
    token_reads = [read.at_ms for read in capture.reads if read.tokens]
    read_gaps = gaps(token_reads)
    tok_s = None
    if len(times) > 1 and times[-1] > times[0]:
        tok_s = (len(times) - 1) / ((times[-1] - times[0]) / 1000)
    return RunMeasures(
        tokens=len(times),
        ttft_ms=times[0] if times else None,
        last_token_ms=times[-1] if times else None,
        tok_s=tok_s,
        read_gap_p50_ms=median(read_gaps),
        read_gap_max_ms=max(read_gaps) if read_gaps else None,
        tokens_per_read=len(times) / len(token_reads) if token_reads else None,
        bytes_per_event=capture.wire_bytes / capture.events if capture.events else None,
    )


@dataclass(slots=True)
class EngineCadence:
    """The engine's own pace, measured on the reference (engine-direct) path."""

    gap_ms: float  # median gap between tokens
    tok_s: float | None
    ttft_ms: float | None
    max_gap_ms: float  # its longest pause (a thinking or queueing pause is not a fault of any hop)
    bytes_per_event: float | None
    held_share: float  # share of its tokens the reference itself delivered in held bursts


def held_share(capture: Capture, engine_gap_ms: float) -> float:
    tokens = capture.tokens
    if not tokens:
        return 0.0
    held = sum(b.tokens for b in find_bursts(capture, engine_gap_ms) if is_held(b.tokens, b.silence_ms, engine_gap_ms))
    return held / tokens


def is_held(tokens: int, silence_ms: float, engine_gap_ms: float) -> bool:
    return tokens >= MIN_BURST_TOKENS and silence_ms >= HELD_SILENCE_STEPS * engine_gap_ms


def engine_cadence(reference_runs: Sequence[Capture]) -> EngineCadence:
    streamed = [run for run in reference_runs if run.answered and run.tokens]
    all_gaps = [gap for run in streamed for gap in gaps(run.token_times)]
    gap_ms = max(ENGINE_GAP_FLOOR_MS, median(all_gaps) or 0.0)
    measures = [measure(run) for run in streamed]
    return EngineCadence(
        gap_ms=gap_ms,
        tok_s=median([m.tok_s for m in measures if m.tok_s is not None]),
        ttft_ms=median([m.ttft_ms for m in measures if m.ttft_ms is not None]),
        max_gap_ms=max(all_gaps, default=0.0),
        bytes_per_event=median([m.bytes_per_event for m in measures if m.bytes_per_event is not None]),
        held_share=median([held_share(run, gap_ms) for run in streamed]) or 0.0,
    )
