"""The engines a gateway can send to, and what it has learnt about each: load, health, ejections.

Membership can change while requests run (DNS discovery adds and removes pods); a request holds its member
object until it ends, so an engine that leaves the pool still finishes the streams it is serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Literal

from flushgate.proxy.upstream import Backend, Readiness

FailureKind = Literal["connect", "status", "broken"]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Ejection:
    """Passive health: when an engine is taken out of rotation without asking it, and for how long.

    A connection that cannot be opened ejects at once (the engine is gone or restarting); answers with status
    5xx and streams that break count in a row, so one bad request does not eject a healthy engine.
    """

    after_failures: int = 3
    duration_s: float = 10.0


def url_hash(url: str) -> int:
    return int.from_bytes(blake2b(url.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True, eq=False)
class EngineMember:
    backend: Backend
    url: str
    hash: int
    outstanding: int = 0  # requests this gateway has open on the engine now
    healthy: bool = True  # the last active check; an engine is assumed healthy until one says otherwise
    ejected_until: float = 0.0
    consecutive_failures: int = 0
    ejections: int = 0
    picks: dict[str, int] = field(default_factory=dict)  # routing decisions that chose this engine, by reason
    last_check: Readiness | None = None

    @classmethod
    def of(cls, backend: Backend) -> EngineMember:
        return cls(backend=backend, url=backend.base_url, hash=url_hash(backend.base_url))

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and self.backend.unavailable() is None


class EnginePool:
    """The current members, and the rules that take one out of rotation and bring it back."""

    def __init__(self, backends: Iterable[Backend], *, ejection: Ejection | None = None, clock: Clock | None = None):
        self.ejection = ejection or Ejection()
        self.clock: Clock = clock or time.monotonic
        self.members: list[EngineMember] = [EngineMember.of(b) for b in backends]
        self.active_checks = False  # set by the health checker: then only a passing check re-admits

    def replace(self, backends: Iterable[Backend]) -> tuple[list[str], list[str]]:
        """New membership (from discovery); known engines keep their state. Returns (added, removed) URLs."""
        known = {m.url: m for m in self.members}
        members, added = [], []
        for backend in backends:
            member = known.pop(backend.base_url, None)
            if member is None:
                member = EngineMember.of(backend)
                added.append(member.url)
            members.append(member)
        self.members = members
        return added, sorted(known)

    # --- passive health ---------------------------------------------------------------------------------------

    def succeeded(self, member: EngineMember) -> None:
        member.consecutive_failures = 0

    def failed(self, member: EngineMember, kind: FailureKind) -> bool:
        """Note a failure; True if it ejected the engine."""
        member.consecutive_failures += 1
        if kind == "connect":
            if self.active_checks:
                member.healthy = False  # back once its /health answers again
            return self._eject(member)
        if member.consecutive_failures >= self.ejection.after_failures:
            return self._eject(member)
        return False

    def _eject(self, member: EngineMember) -> bool:
        now = self.clock()
        was_in = now >= member.ejected_until
        member.ejected_until = now + self.ejection.duration_s
        if was_in:
            member.ejections += 1
        return was_in

    # --- active health ----------------------------------------------------------------------------------------

    def checked(self, member: EngineMember, verdict: Readiness) -> bool:
        """Note an active check's verdict; True if it re-admitted the engine."""
        ready = verdict.ready
        came_back = ready and not member.healthy
        member.healthy = ready
        member.last_check = verdict
        if came_back:
            member.consecutive_failures = 0
        return came_back
