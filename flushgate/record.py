"""The one structured record written at the end of every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from flushgate.timings import RequestTimings

Outcome = Literal["completed", "client_abort", "upstream_error", "idle_timeout", "rejected"]


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    timings: RequestTimings
    status: int = 0
    outcome: Outcome = "completed"
    error: str | None = None

    def emit(self, log: Any) -> None:
        log.info(
            "request",
            request_id=self.request_id,
            method=self.method,
            path=self.path,
            status=self.status,
            outcome=self.outcome,
            error=self.error,
            **self.timings.summary(),
        )
