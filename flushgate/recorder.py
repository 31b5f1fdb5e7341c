"""Finishing a request's record: join the engine's own timing, observe metrics, write the log line."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from flushgate.engine_timing import EngineTimings
from flushgate.logs import record_writer
from flushgate.metrics import Metrics
from flushgate.record import RequestRecord

ENGINE_JOIN_TIMEOUT_S = 2.0  # the engine exports its span ~50 ms after the request ends


class Recorder:
    def __init__(self, log: Any, metrics: Metrics, engine_timings: EngineTimings | None = None) -> None:
        self.log = log
        self._write = record_writer(log)
        self.metrics = metrics
        self.engine_timings = engine_timings
        self._pending: set[asyncio.Task[None]] = set()
        self._queue: deque[RequestRecord] = deque()
        self._scheduled = False  # a callback that publishes the next record is due
        self._drained: asyncio.Future[None] | None = None  # what ``flush`` waits on while records are queued

    def finish(self, record: RequestRecord) -> None:
        """Publish now, or once the engine's span for this request has arrived (off the request's path)."""
        if self.engine_timings is not None and record.engine is None and record.wants_engine_split():
            task = asyncio.get_running_loop().create_task(self._join_then_publish(record))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self._enqueue(record)

    async def join_engine(self, record: RequestRecord, timeout_s: float = ENGINE_JOIN_TIMEOUT_S) -> None:
        if self.engine_timings is not None and record.engine is None:
            record.engine = await self.engine_timings.wait(record.request_id, timeout_s)

    async def _join_then_publish(self, record: RequestRecord) -> None:
        await self.join_engine(record)
        self._enqueue(record)

    def _enqueue(self, record: RequestRecord) -> None:
        """Records of streams that end together (they share the engine's tick) are published one per turn of the
        event loop, so the chunks of streams still running are written in between rather than after all of them.
        A callback per record: nothing here waits, so no task (a coroutine, an entry in asyncio's set of tasks)."""
        self._queue.append(record)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._publish_next)

    def _publish_next(self) -> None:
        """One record, and one more for every 16 still waiting: under more ends per turn than one, the queue stays
        bounded (about 16 per end per turn), and a burst of 256 ends costs a turn at most 17 records."""
        queue = self._queue
        try:
            for _ in range(1 + len(queue) // 16):
                self.publish(queue.popleft())
        finally:  # a record that failed to publish does not stop the ones after it
            if queue:
                asyncio.get_running_loop().call_soon(self._publish_next)
            else:
                self._scheduled = False
                if self._drained is not None and not self._drained.done():
                    self._drained.set_result(None)

    def publish(self, record: RequestRecord) -> None:
        t = record.timings
        m = self.metrics
        api, outcome = record.api, record.outcome
        m.requests.labels(api, outcome).inc()
        m.duration.labels(api, outcome).observe(t.end - t.start)
        if t.upstream_headers:
            m.upstream_ttfb.labels(api).observe(t.upstream_headers - t.start)
        if t.first_token:
            m.ttft.labels(api).observe(t.first_token - t.start)
        if record.served_by is not None:
            m.engine_requests.labels(record.served_by, outcome).inc()
            if t.first_token:
                m.engine_ttft.labels(record.served_by).observe(t.first_token - t.start)
        for attempt in record.failover:
            m.engine_failovers.labels(attempt["engine"]).inc()
        if record.stale_resent is not None:
            m.engine_stale_resends.labels(record.stale_resent).inc()
        m.gap.observe_many(t.gaps(), ordered=True)
        if t.fast_chunks or t.slow_chunks:
            m.chunk.observe_many(t.slow_chunks, fast=t.fast_chunks, total=t.write_blocked + t.chunk_work)
        record.emit(self._write)

    async def flush(self) -> None:
        """Publish every record still waiting for its engine span (at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._scheduled:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
