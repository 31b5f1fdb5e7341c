"""Records of requests that end together are published one per turn of the event loop, all of them, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from flushgate.metrics import Metrics
from flushgate.record import RequestRecord
from flushgate.recorder import Recorder
from flushgate.timings import RequestTimings, now


class ListLog:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


def finished(request_id: str) -> RequestRecord:
    start = now()
    return RequestRecord(request_id=request_id, method="POST", path="/v1/chat/completions",
                         timings=RequestTimings(start=start, end=start + 0.01))  # fmt: skip


async def test_records_ending_together_leave_the_loop_free_between_them_and_all_get_published() -> None:
    log = ListLog()
    recorder = Recorder(log, Metrics(inflight=lambda: 0.0))
    published_when_other_work_ran: list[int] = []
    for n in range(5):
        recorder.finish(finished(f"r{n}"))
    # Work that became ready after the five ends (a chunk from a stream still running, say) runs after the first
    # record, not after the fifth.
    asyncio.get_running_loop().call_soon(lambda: published_when_other_work_ran.append(len(log.events)))
    assert log.events == []  # nothing was done on the path of the requests that ended
    await recorder.flush()
    assert published_when_other_work_ran == [1]
    assert [e["request_id"] for e in log.events] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(e["event"] == "request" for e in log.events)
    recorder.finish(finished("later"))  # a new burst starts its own turn-by-turn publishing
    await recorder.flush()
    assert log.events[-1]["request_id"] == "later"


async def test_when_more_requests_end_per_turn_than_one_the_queue_of_records_stays_bounded() -> None:
    """Publishing one record per turn would fall behind for good once several requests end in every turn."""
    log = ListLog()
    recorder = Recorder(log, Metrics(inflight=lambda: 0.0))
    longest = 0
    for turn in range(2000):  # four requests end in every turn of the loop
        for n in range(4):
            recorder.finish(finished(f"{turn}-{n}"))
        longest = max(longest, len(recorder._queue))
        await asyncio.sleep(0)
    assert longest <= 16 * 4 + 4
    await recorder.flush()
    assert len(log.events) == 8000
