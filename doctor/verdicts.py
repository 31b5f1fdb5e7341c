"""Verdicts for one path, each with the measured evidence behind it.

Every rule compares what the client saw with the engine's own cadence (measured on the reference path) or reads
a header; nothing is inferred from a path's name. Timing verdicts must show in most of a path's requests, so one
hiccup of a busy machine is not reported as a hop's fault; broken streams are reported even once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from flushgate.doctor.bursts import Burst, find_bursts
from flushgate.doctor.capture import Capture
from flushgate.doctor.events import stream_format
from flushgate.doctor.measures import EngineCadence, is_held, measure
from flushgate.doctor.stats import is_regular, median

Kind = Literal[
    "failed",
    "http_error",
    "probe_timeout",
    "idle_cut",
    "cut",
    "error_event",
    "not_a_stream",
    "no_tokens",
    "compression",
    "buffering",
    "batching",
    "slow",
    "late_start",
]

LABELS: dict[Kind, str] = {
    "failed": "no answer",
    "http_error": "HTTP error",
    "probe_timeout": "probe timeout",
    "idle_cut": "idle cut",
    "cut": "cut",
    "error_event": "error event",
    "not_a_stream": "not a stream",
    "no_tokens": "no tokens",
    "compression": "compressed",
    "buffering": "buffering",
    "batching": "batching",
    "slow": "slow",
    "late_start": "late start",
}
_EVERY_RUN: frozenset[Kind] = frozenset({"slow"})  # a hop that cannot keep up does so every time; load comes and goes
_ANY_RUN: frozenset[Kind] = frozenset(
    {
        "failed",
        "http_error",
        "probe_timeout",
        "idle_cut",
        "cut",
        "error_event",
        "not_a_stream",
        "no_tokens",
        "compression",
    }
)

HELD_SHARE_MIN = 0.3  # of a request's tokens, beyond what the reference itself shows
HELD_TOKENS_MIN = 8
IDLE_CUT_MIN_MS = 250.0
IDLE_CUT_STEPS = 10  # a silence this many engine steps long before a cut is an idle timeout, not a crash
SLOW_RATIO = 0.5  # of the engine's tok/s; generous, as clean paths on a busy shared CPU drift apart
LATE_START_MIN_MS = 250.0
LATE_START_STEPS = 5


@dataclass(slots=True)
class Finding:
    kind: Kind
    text: str
    runs: int = 1  # how many of the path's requests showed it
    score: float = 0.0  # picks the request quoted as evidence
    label: str = ""  # for the table; the kind's usual label unless set

    def __post_init__(self) -> None:
        self.label = self.label or LABELS[self.kind]


def seconds(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _broken_stream(capture: Capture, engine: EngineCadence) -> Finding | None:
    if capture.ending == "failed":
        return Finding("failed", capture.error or "no answer")
    if capture.ending == "http_error":
        return Finding("http_error", capture.error or f"HTTP {capture.status}")
    if capture.ending == "probe_timeout":
        return Finding("probe_timeout", f"{capture.error} ({capture.tokens} tokens in)")
    if capture.ending not in ("cut", "error_event"):
        return None
    times = capture.token_times
    ended_ms = capture.error_event_ms if capture.ending == "error_event" else capture.end_ms
    assert ended_ms is not None
    last_data_ms = times[-1] if times else (capture.headers_ms or 0.0)
    silence = ended_ms - last_data_ms
    said = f"; it said: {capture.error}" if capture.ending == "error_event" else ""
    if silence >= max(IDLE_CUT_MIN_MS, IDLE_CUT_STEPS * engine.gap_ms):
        paused = ""
        if engine.max_gap_ms >= silence:
            paused = f"; on the reference path the engine paused up to {seconds(engine.max_gap_ms)} and went on"
        text = f"stream cut by an idle timeout at {seconds(silence)} ({len(times)} tokens in{said}){paused}"
        return Finding("idle_cut", text, score=silence)
    if capture.ending == "error_event":
        return Finding("error_event", f"stream ended with an error event after {len(times)} tokens{said}")
    return Finding("cut", f"stream ended without its end marker after {seconds(ended_ms)} ({len(times)} tokens in)")


def _framing(capture: Capture, engine: EngineCadence) -> list[Finding]:
    found: list[Finding] = []
    content_type = capture.headers.get("content-type")
    if stream_format(content_type) is None:
        found.append(Finding("not_a_stream", f"Content-Type {content_type!r} where an event stream was expected"))
    coding = capture.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        name = "gzip" if coding in ("gzip", "x-gzip") else coding
        detail = f"Content-Encoding: {coding}"
        per_event = measure(capture).bytes_per_event
        if per_event is not None and engine.bytes_per_event is not None:
            detail += (
                f"; {per_event:.0f} bytes per event on the wire against {engine.bytes_per_event:.0f} from the engine"
            )
        if not capture.decodable:
            detail += "; the probe cannot decode it, so token timing is unknown"
        found.append(Finding("compression", f"{name} on an event stream ({detail})", label=name))
    return found


def _holding(capture: Capture, engine: EngineCadence) -> Finding | None:
    """Buffering (held, then released at once) or batching (released on a clock)."""
    tokens = capture.tokens
    if not tokens:
        return None
    bursts = find_bursts(capture, engine.gap_ms)
    held = [b for b in bursts if is_held(b.tokens, b.silence_ms, engine.gap_ms)]
    held_tokens = sum(b.tokens for b in held)
    share = held_tokens / tokens
    first_held = bool(held) and held[0] is bursts[0] and held[0].tokens >= HELD_TOKENS_MIN
    if held_tokens < HELD_TOKENS_MIN or not (share >= engine.held_share + HELD_SHARE_MIN or first_held):
        return None
    score = float(held_tokens)
    released = bursts[:-1] if len(bursts) > 2 else bursts
    intervals = [b.start_ms - a.start_ms for a, b in itertools.pairwise(released)]
    split = sum(b.split for b in held) / len(held)
    if len(held) >= 3 and split < 0.5 and is_regular(intervals):
        size = median([b.tokens for b in released])
        period = median(intervals)
        assert size is not None
        assert period is not None
        return Finding("batching", f"bursts of ~{size:.0f} tokens every {period:.0f} ms (a batching hop)", score=score)
    return Finding("buffering", _buffering_text(held, bursts, tokens, split), score=score)


def _buffering_text(held: Sequence[Burst], bursts: Sequence[Burst], tokens: int, split: float) -> str:
    biggest = max(held, key=lambda b: (b.tokens, b.silence_ms))
    text = (
        f"buffering: {biggest.tokens} tokens arrived within {max(1.0, biggest.span_ms):.0f} ms "
        f"after {seconds(biggest.silence_ms)} of silence"
    )
    if len(held) >= 2 and split >= 0.5:
        size = median([b.size for b in held])
        text += f"; released in blocks of ~{size:.0f} bytes that cut events in two (a size-limited buffer)"
    elif biggest.last and biggest.tokens >= 0.9 * tokens:
        text += "; the whole answer was held until it was complete"
    elif held[0] is bursts[0] and len(bursts) > 1:
        text += f"; the first {held[0].tokens} tokens were held, then they flowed"
    return text


def _pace(capture: Capture, engine: EngineCadence, beside: Capture | None) -> list[Finding]:
    """Rate and first token against the reference request of the same round (the engine's load at that moment),
    or against the engine's medians when that request has no tokens."""
    found: list[Finding] = []
    run = measure(capture)
    paired = measure(beside) if beside is not None and beside.tokens else None
    engine_tok_s = paired.tok_s if paired is not None and paired.tok_s is not None else engine.tok_s
    engine_ttft = paired.ttft_ms if paired is not None and paired.ttft_ms is not None else engine.ttft_ms
    if run.tok_s is not None and engine_tok_s is not None and run.tok_s < SLOW_RATIO * engine_tok_s:
        text = f"slow: {run.tok_s:.1f} tok/s against the engine's {engine_tok_s:.1f} tok/s"
        found.append(Finding("slow", text, score=engine_tok_s - run.tok_s))
    late_by = max(LATE_START_MIN_MS, LATE_START_STEPS * engine.gap_ms)
    if run.ttft_ms is not None and engine_ttft is not None and run.ttft_ms >= engine_ttft + late_by:
        text = f"first token after {seconds(run.ttft_ms)} against {seconds(engine_ttft)} from the engine"
        found.append(Finding("late_start", text, score=run.ttft_ms))
    return found


def run_findings(capture: Capture, engine: EngineCadence, beside: Capture | None = None) -> list[Finding]:
    """Everything wrong with one request; an empty list means it was clean. ``beside``: the reference path's
    request of the same round."""
    broken = _broken_stream(capture, engine)
    if capture.ending in ("failed", "http_error"):
        return [broken] if broken else []
    found = _framing(capture, engine)
    if broken is not None:
        found.append(broken)
    if capture.ending == "probe_timeout" or not capture.decodable:
        return found
    if not capture.tokens:
        if capture.ending == "complete":
            found.append(Finding("no_tokens", f"the stream ended normally with no text in {capture.events} events"))
        return found
    holding = _holding(capture, engine)
    if holding is not None:
        found.append(holding)
    else:
        found.extend(_pace(capture, engine, beside))  # a hop that holds tokens back is late and uneven by definition
    return found


def path_findings(per_run: Sequence[Sequence[Finding]]) -> list[Finding]:
    """One finding per kind: broken streams from any request, timing verdicts only from most of them (slowness
    from all)."""
    runs = len(per_run)
    by_kind: dict[Kind, list[Finding]] = {}
    for findings in per_run:
        for finding in findings:
            by_kind.setdefault(finding.kind, []).append(finding)
    counts = {kind: len(seen) for kind, seen in by_kind.items()}
    _merge_holding(by_kind, counts)
    result: list[Finding] = []
    for kind in LABELS:
        seen = counts.get(kind, 0)
        if not seen or (kind not in _ANY_RUN and seen <= runs // 2) or (kind in _EVERY_RUN and seen < runs):
            continue
        evidence = max(by_kind[kind], key=lambda f: f.score)
        text = evidence.text if seen == runs else f"{evidence.text} ({seen} of {runs} requests)"
        result.append(Finding(kind, text, runs=seen, score=evidence.score, label=evidence.label))
    return result


def _merge_holding(by_kind: dict[Kind, list[Finding]], counts: dict[Kind, int]) -> None:
    """Buffering and batching are one fault, tokens held back, seen two ways: the path gets the name most of its
    requests showed (buffering on a tie) and the count of all requests that held tokens back."""
    buffering = by_kind.pop("buffering", [])
    batching = by_kind.pop("batching", [])
    counts.pop("buffering", None)
    counts.pop("batching", None)
    if buffering or batching:
        name: Kind = "batching" if len(batching) > len(buffering) else "buffering"
        by_kind[name] = batching if name == "batching" else buffering
        counts[name] = len(buffering) + len(batching)
