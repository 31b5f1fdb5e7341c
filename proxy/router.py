"""Which engine serves a request: the least busy one, or the one that has this conversation's prefix cached.

The router also stands for the whole pool wherever the gateway asks one ``Backend`` (``/readyz``, refusals),
so a single engine and many look the same from the outside.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection
from dataclasses import dataclass

import aiohttp

from flushgate.config import RoutingMode
from flushgate.proxy.pool import EngineMember, EnginePool, FailureKind
from flushgate.proxy.upstream import Backend, FailedBeforeAnswer, Readiness, Unavailable

_MASK = (1 << 64) - 1
RETRY_STATUSES = frozenset({502, 503, 504})  # an engine's answers that another engine may not give


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    mode: RoutingMode = "least-outstanding"
    # Prefix affinity gives way when the preferred engine would hold more than this times the pool's average
    # load (outstanding requests, this one included): a cache hit is not worth queueing behind a busy engine.
    affinity_load_factor: float = 1.5
    retries: int = 2  # further engines a request may be tried on while nothing has been sent to the client


def rendezvous_score(key: int, engine_hash: int) -> int:
    """An engine's score for a key (highest wins): splitmix64's finaliser over both, cheap and well spread.

    Rendezvous hashing: when an engine leaves, only the keys it won move, each to its runner-up."""
    value = key ^ engine_hash
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
    return value ^ (value >> 31)


class Router:
    def __init__(self, pool: EnginePool, policy: RoutingPolicy | None = None, *, source: str | None = None) -> None:
        self.pool = pool
        self.policy = policy or RoutingPolicy()
        self.source = source  # where members come from when discovered (for messages); None: a fixed list
        self._turn = 0
        self._ahead_turn = 0

    @classmethod
    def of_one(cls, backend: Backend) -> Router:
        return cls(EnginePool([backend]))

    @property
    def several(self) -> bool:
        """More than one engine, now or later: bodies are kept for a second attempt, and affinity applies."""
        return self.source is not None or len(self.pool.members) > 1

    # --- per request ------------------------------------------------------------------------------------------

    def pick(self, key: int | None, exclude: Collection[EngineMember] = ()) -> EngineMember | None:
        """The engine for the next attempt, or None when no engine can take one.

        ``key`` is the conversation's affinity key (prefix-affinity mode only); ``exclude`` the engines this
        request already failed on. When every engine is ejected or failing its checks, all that are not
        loading or stopping are candidates again: trying is better than refusing when nothing is known good.
        """
        candidates, reason = self._candidates(exclude)
        if not candidates:
            return None
        chosen: EngineMember | None = None
        if key is not None and len(candidates) > 1:
            preferred = max(candidates, key=lambda m: rendezvous_score(key, m.hash))
            total = sum(m.outstanding for m in candidates)
            bound = math.ceil(self.policy.affinity_load_factor * (total + 1) / len(candidates))
            if preferred.outstanding + 1 <= bound:
                chosen = preferred
            if reason != "panic":
                reason = "affinity" if chosen is not None else "affinity_overflow"
        if chosen is None:
            chosen = self._least_outstanding(candidates)
        chosen.picks[reason] = chosen.picks.get(reason, 0) + 1
        return chosen

    def likely_next(self) -> EngineMember | None:
        """An engine a coming request may well be routed to (taking turns over those that can take one); nothing
        is counted."""
        candidates, _ = self._candidates(())
        if not candidates:
            return None
        self._ahead_turn += 1
        return candidates[self._ahead_turn % len(candidates)]

    def _candidates(self, exclude: Collection[EngineMember]) -> tuple[list[EngineMember], str]:
        now = self.pool.clock()
        members = self.pool.members
        candidates = [m for m in members if m.available(now) and m not in exclude]
        if candidates:
            return candidates, "least_outstanding"
        return [m for m in members if m.backend.unavailable() is None and m not in exclude], "panic"

    def can_try_another(self, exclude: Collection[EngineMember]) -> bool:
        return bool(self._candidates(exclude)[0])

    def may_retry(self, failovers: int, tried: Collection[EngineMember]) -> bool:
        """Another engine may be tried: there are several, retries are left, and one not tried yet can take it.

        Callers add their own condition: nothing has reached the client, and the body can be sent again."""
        return self.several and failovers < self.policy.retries and self.can_try_another(tried)

    def failed_before_answer(
        self,
        member: EngineMember,
        exc: BaseException,
        failover: list[dict[str, str]],
        tried: Collection[EngineMember],
        replayable: bool = True,
    ) -> FailedBeforeAnswer | None:
        """The engine failed before its answer's head: held against it, then either noted in ``failover`` (None:
        try another engine) or read as what to tell the client. ``tried`` includes ``member``."""
        failure = FailedBeforeAnswer.of(exc, member.url)
        self.failed(member, "connect" if failure.connect else "broken")
        if replayable and self.may_retry(len(failover), tried):
            failover.append({"engine": member.url, "error": repr(exc)})
            return None
        return failure

    def retries_status(
        self,
        member: EngineMember,
        status: int,
        failover: list[dict[str, str]],
        tried: Collection[EngineMember],
        replayable: bool = True,
    ) -> bool:
        """An answer another engine may not give (502/503/504) while another can still be tried: noted in
        ``failover``, and the request goes on to the next engine. ``tried`` includes ``member``."""
        if status in RETRY_STATUSES and replayable and self.may_retry(len(failover), tried):
            failover.append({"engine": member.url, "error": f"status {status}"})
            return True
        return False

    def no_engine(self) -> Unavailable:
        """Why a request found no engine to pick."""
        return self.unavailable() or Unavailable("no engine can take the request now", "no_engine", 1)

    def _least_outstanding(self, candidates: list[EngineMember]) -> EngineMember:
        """Fewest open requests; ties go round the pool so an idle pool still spreads its load."""
        self._turn += 1
        n = len(candidates)
        start = self._turn % n
        best = candidates[start]
        for i in range(1, n):
            member = candidates[(start + i) % n]
            if member.outstanding < best.outstanding:
                best = member
        return best

    def acquire(self, member: EngineMember) -> None:
        member.outstanding += 1

    def release(self, member: EngineMember) -> None:
        member.outstanding -= 1

    def answered(self, member: EngineMember, status: int) -> None:
        if status >= 500:
            self.pool.failed(member, "status")
        else:
            self.pool.succeeded(member)

    def failed(self, member: EngineMember, kind: FailureKind) -> None:
        self.pool.failed(member, kind)

    # --- the pool as one Backend ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The engine a request without affinity would go to now (for callers that need one URL, such as
        the Ollama routes); not counted as a routing decision."""
        candidates, _ = self._candidates(())
        if candidates:
            return self._least_outstanding(candidates).url
        return self.pool.members[0].url if self.pool.members else ""

    def unavailable(self) -> Unavailable | None:
        members = self.pool.members
        if not members:
            return Unavailable(f"no engine has been found at {self.source} yet; retry shortly", "no_engine", 5)
        reasons = []
        for member in members:
            reason = member.backend.unavailable()
            if reason is None:
                return None
            reasons.append(reason)
        return min(reasons, key=lambda r: r.retry_after_s)

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness:
        members = list(self.pool.members)
        if len(members) == 1 and self.source is None:
            return await members[0].backend.readiness(session)
        if self.pool.active_checks:  # the health checker's last verdicts: no fan-out per probe of the gateway
            verdicts = [m.last_check or Readiness(m.healthy) for m in members]
        else:
            verdicts = list(await asyncio.gather(*(m.backend.readiness(session) for m in members)))
        now = self.pool.clock()
        engines = [
            {"url": m.url, "ready": v.ready, "in_rotation": m.available(now), "outstanding": m.outstanding, **v.detail}
            for m, v in zip(members, verdicts, strict=True)
        ]
        ready = any(v.ready and m.available(now) for m, v in zip(members, verdicts, strict=True))
        detail: dict[str, object] = {"engines": engines}
        if self.source is not None:
            detail["discovery"] = self.source
        return Readiness(ready, detail)
