"""Verdict rules on arrival times written out by hand: what a busy machine does must not read as a hop's fault."""

from __future__ import annotations

from collections.abc import Sequence

from flushgate.doctor.capture import Capture, Read
from flushgate.doctor.measures import engine_cadence
from flushgate.doctor.probe import Path, ProbeSettings, judge
from flushgate.doctor.verdicts import run_findings

STEP_MS = 25.0
EVENT_BYTES = 200


def capture(token_times: Sequence[float]) -> Capture:
    """A complete SSE answer whose tokens arrived at ``token_times`` (ms), several to a read where times repeat."""
    reads: list[Read] = []
    for at in token_times:
        if reads and reads[-1].at_ms == at:
            last = reads[-1]
            reads[-1] = Read(at, last.size + EVENT_BYTES, last.events + 1, last.tokens + 1, False)
        else:
            reads.append(Read(at, EVENT_BYTES, 1, 1, False))
    end = (token_times[-1] if token_times else 0.0) + 1
    return Capture(
        url="http://x/v1/chat/completions",
        status=200,
        headers={"content-type": "text/event-stream"},
        headers_ms=1.0,
        reads=reads,
        end_ms=end,
    )


def steady(tokens: int = 40, step_ms: float = STEP_MS, start_ms: float = 50.0) -> list[float]:
    return [start_ms + i * step_ms for i in range(tokens)]


def verdicts(reference: Sequence[Capture], other: Sequence[Capture]) -> tuple[str, str]:
    paths = [Path("engine", "http://engine"), Path("other", "http://other")]
    report = judge(paths, [list(reference), list(other)], ProbeSettings(), model="m")
    return report.paths[0].verdict, report.paths[1].verdict


def test_one_stall_of_the_client_in_one_request_is_not_buffering() -> None:
    stalled = steady()
    for i in range(10, 24):  # fourteen tokens read together after a 350 ms hiccup of the probe's machine
        stalled[i] = stalled[23]
    reference = [capture(steady()) for _ in range(3)]
    alone = run_findings(capture(stalled), engine_cadence(reference))
    assert [f.kind for f in alone] == ["buffering"]  # on its own the request looks held back ...
    assert verdicts(reference, [capture(stalled), capture(steady()), capture(steady())]) == ("clean", "clean")


def test_the_same_hold_in_most_requests_is_buffering() -> None:
    held = [50.0 + 40 * STEP_MS] * 40
    reference = [capture(steady()) for _ in range(3)]
    assert verdicts(reference, [capture(held), capture(held), capture(steady())])[1] == "buffering"


def test_a_round_where_the_whole_engine_was_slow_is_not_a_slow_hop() -> None:
    busy = 3 * STEP_MS  # the machine was busy in the second round, for both paths
    reference = [capture(steady()), capture(steady(step_ms=busy)), capture(steady())]
    other = [capture(steady()), capture(steady(step_ms=busy)), capture(steady())]
    assert verdicts(reference, other) == ("clean", "clean")


def test_slowness_in_only_some_requests_is_not_a_slow_hop_but_in_all_it_is() -> None:
    reference = [capture(steady()) for _ in range(3)]
    slow = capture(steady(step_ms=3 * STEP_MS))
    assert verdicts(reference, [slow, slow, capture(steady())])[1] == "clean"
    assert verdicts(reference, [slow, slow, slow])[1] == "slow"
