"""Group token arrivals into bursts: tokens that reached the client (almost) at the same moment.

An engine emits tokens one decode step apart. Several tokens arriving within a fraction of that step were held
somewhere and released together; how many, after how long a silence, and at which byte boundary is the evidence
the verdicts quote.
"""

from __future__ import annotations

from dataclasses import dataclass

from flushgate.doctor.capture import Capture

MAX_WINDOW_MS = 5.0
MIN_WINDOW_MS = 1.0


@dataclass(slots=True)
class Burst:
    tokens: int
    start_ms: float
    span_ms: float  # first to last token of the burst
    silence_ms: float  # since the previous token, or since the request was sent for the first burst
    size: int  # wire bytes of the reads that carried it
    split: bool  # its last read ended inside an event, as a fixed-size buffer does
    last: bool  # holds the stream's last token


def window_ms(engine_gap_ms: float) -> float:
    """Tokens closer than this count as one release: a quarter of the engine's step, within 1..5 ms."""
    return min(MAX_WINDOW_MS, max(MIN_WINDOW_MS, engine_gap_ms / 4))


def find_bursts(capture: Capture, engine_gap_ms: float) -> list[Burst]:
    window = window_ms(engine_gap_ms)
    token_reads = [index for index, read in enumerate(capture.reads) if read.tokens]
    groups: list[list[int]] = []
    for index in token_reads:
        if groups and capture.reads[index].at_ms - capture.reads[groups[-1][-1]].at_ms <= window:
            groups[-1].append(index)
        else:
            groups.append([index])
    bursts: list[Burst] = []
    previous_ms = 0.0
    for number, group in enumerate(groups):
        first, last = capture.reads[group[0]], capture.reads[group[-1]]
        bursts.append(
            Burst(
                tokens=sum(capture.reads[i].tokens for i in group),
                start_ms=first.at_ms,
                span_ms=last.at_ms - first.at_ms,
                silence_ms=first.at_ms - previous_ms,
                size=sum(read.size for read in capture.reads[group[0] : group[-1] + 1]),
                split=last.partial,
                last=number == len(groups) - 1,
            )
        )
        previous_ms = last.at_ms
    return bursts
