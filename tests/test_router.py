"""Picking an engine, taking one out of rotation and bringing it back: the router and pool on their own."""

from __future__ import annotations

from collections import Counter

import aiohttp
import orjson
import pytest

from flushgate.proxy.affinity import affinity_key
from flushgate.proxy.pool import Ejection, EngineMember, EnginePool
from flushgate.proxy.router import Router, RoutingPolicy
from flushgate.proxy.upstream import Readiness, Unavailable


class StubBackend:
    """An engine that only has a URL and, when told, a reason it cannot take requests (loading, stopping)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.refusing: Unavailable | None = None

    @property
    def base_url(self) -> str:
        return self._url

    def unavailable(self) -> Unavailable | None:
        return self.refusing

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness:
        return Readiness(self.refusing is None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(
    n: int, *, mode: str = "least-outstanding", factor: float = 1.5, clock: Clock | None = None
) -> tuple[Router, list[StubBackend]]:
    backends = [StubBackend(f"http://10.0.0.{i + 1}:8000") for i in range(n)]
    pool = EnginePool(backends, ejection=Ejection(after_failures=3, duration_s=10.0), clock=clock or Clock())
    policy = RoutingPolicy(mode=mode, affinity_load_factor=factor)  # type: ignore[arg-type]
    return Router(pool, policy), backends


def take(router: Router, key: int | None = None) -> EngineMember:
    member = router.pick(key)
    assert member is not None
    router.acquire(member)
    return member


def conversation(first_user: str, turns: int) -> list[bytes]:
    """The request bodies of a chat's turns: each resends every earlier message."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    bodies = []
    for turn in range(turns):
        messages.append({"role": "user", "content": first_user if turn == 0 else f"and then {turn}?"})
        bodies.append(orjson.dumps({"model": "m", "messages": messages, "stream": True}))
        messages.append({"role": "assistant", "content": f"answer {turn}"})
    return bodies


def test_least_outstanding_picks_the_engine_with_fewest_open_requests() -> None:
    router, _ = make_router(3)
    members = router.pool.members
    for member, load in zip(members, (4, 1, 2), strict=True):
        member.outstanding = load
    assert router.pick(None) is members[1]
    members[1].outstanding = 5
    assert router.pick(None) is members[2]


def test_an_idle_pool_spreads_one_request_after_another_evenly() -> None:
    router, _ = make_router(4)
    served: Counter[str] = Counter()
    for _ in range(40):
        member = take(router)
        served[member.url] += 1
        router.release(member)
    assert sorted(served.values()) == [10, 10, 10, 10]


def test_concurrent_requests_fill_the_pool_level() -> None:
    router, _ = make_router(4)
    for _ in range(8):
        take(router)
    assert [m.outstanding for m in router.pool.members] == [2, 2, 2, 2]


def test_every_turn_of_a_conversation_has_the_same_affinity_key() -> None:
    keys = {affinity_key(body) for body in conversation("What is the capital of France?", 5)}
    assert len(keys) == 1
    assert keys != {None}


def test_conversations_that_share_only_a_system_prompt_have_different_keys() -> None:
    first = affinity_key(conversation("What is the capital of France?", 1)[0])
    second = affinity_key(conversation("Name a prime number.", 1)[0])
    assert first != second


@pytest.mark.parametrize(
    ("body", "keyed"),
    [
        (b"not json", False),
        (b"[1, 2]", False),
        (b'{"model": "m"}', False),
        (b'{"model": "m", "messages": []}', False),
        (b'{"model": "m", "prompt": "Once upon a time"}', True),
        (b'{"model": "m", "prompt": [1, 2, 3]}', True),
    ],
)
def test_only_a_body_that_names_a_conversation_or_prompt_has_a_key(body: bytes, keyed: bool) -> None:
    assert (affinity_key(body) is not None) == keyed


def test_prefix_affinity_sends_every_turn_to_one_engine() -> None:
    router, _ = make_router(4, mode="prefix-affinity")
    bodies = conversation("Tell me about Lyon.", 6)
    chosen = set()
    for body in bodies:
        member = take(router, affinity_key(body))
        chosen.add(member.url)
        router.release(member)
    assert len(chosen) == 1


def test_prefix_affinity_spreads_different_conversations_over_the_pool() -> None:
    router, _ = make_router(4, mode="prefix-affinity")
    served: Counter[str] = Counter()
    for i in range(400):
        member = take(router, affinity_key(conversation(f"question number {i}", 1)[0]))
        served[member.url] += 1
        router.release(member)
    assert len(served) == 4
    assert min(served.values()) >= 60  # rendezvous hashing: ~100 each


def test_prefix_affinity_gives_way_when_the_preferred_engine_is_busier_than_the_bound() -> None:
    router, _ = make_router(2, mode="prefix-affinity", factor=1.5)
    key = affinity_key(conversation("Tell me about Lyon.", 1)[0])
    # The bound for the n-th open request is ceil(1.5 * n / 2): 1, 2, 3, 3. The preferred engine takes the first
    # three (1, 2, 3 open); a fourth there would make 4 > 3, so it goes to the idle engine.
    preferred = take(router, key)
    other = next(m for m in router.pool.members if m is not preferred)
    assert take(router, key) is preferred
    assert take(router, key) is preferred
    assert take(router, key) is other
    assert preferred.picks == {"affinity": 3}
    assert other.picks == {"affinity_overflow": 1}


def test_losing_an_engine_moves_only_the_conversations_it_had() -> None:
    router, backends = make_router(4, mode="prefix-affinity")
    keys = [affinity_key(conversation(f"question {i}", 1)[0]) for i in range(200)]
    before = {key: router.pick(key) for key in keys}
    router.pool.replace(backends[:3])
    after = {key: router.pick(key) for key in keys}
    moved = [key for key in keys if after[key] is not before[key]]
    assert moved
    assert all(before[key] is not None and before[key].url == backends[3].base_url for key in moved)  # type: ignore[union-attr]


def test_a_refused_connection_ejects_the_engine_at_once_until_its_time_is_up() -> None:
    clock = Clock()
    router, _ = make_router(2, clock=clock)
    gone, other = router.pool.members
    router.failed(gone, "connect")
    assert {router.pick(None) for _ in range(4)} == {other}
    assert gone.ejections == 1
    clock.now += 10.0
    assert {router.pick(None) for _ in range(4)} == {gone, other}


def test_5xx_answers_eject_only_when_they_come_in_a_row() -> None:
    router, _ = make_router(2)
    flaky, _other = router.pool.members
    router.answered(flaky, 500)
    router.answered(flaky, 502)
    router.answered(flaky, 200)  # a good answer in between resets the count
    router.answered(flaky, 500)
    router.answered(flaky, 500)
    assert flaky.available(router.pool.clock())
    router.failed(flaky, "broken")  # a stream that broke counts like a 5xx
    assert not flaky.available(router.pool.clock())
    assert flaky.ejections == 1


def test_with_active_checks_a_refused_engine_returns_only_after_a_passing_check() -> None:
    clock = Clock()
    router, _ = make_router(2, clock=clock)
    router.pool.active_checks = True
    gone, _other = router.pool.members
    router.failed(gone, "connect")
    clock.now += 60.0
    assert not gone.available(clock())
    assert not router.pool.checked(gone, Readiness(False))
    assert not gone.available(clock())
    assert router.pool.checked(gone, Readiness(True))
    assert gone.available(clock())


def test_a_failing_check_takes_an_engine_out_and_a_passing_one_brings_it_back() -> None:
    router, _ = make_router(2)
    sick, other = router.pool.members
    router.pool.checked(sick, Readiness(False))
    assert {router.pick(None) for _ in range(4)} == {other}
    router.pool.checked(sick, Readiness(True))
    assert {router.pick(None) for _ in range(4)} == {sick, other}


def test_when_every_engine_is_out_of_rotation_they_are_all_tried_anyway() -> None:
    router, _ = make_router(2)
    for member in router.pool.members:
        router.failed(member, "connect")
    chosen = router.pick(None)
    assert chosen is not None
    assert chosen.picks == {"panic": 1}


def test_a_loading_engine_is_never_picked_and_all_loading_is_the_refusal() -> None:
    router, backends = make_router(2)
    backends[0].refusing = Unavailable("loading", "engine_loading", 5)
    assert {router.pick(None) for _ in range(4)} == {router.pool.members[1]}
    backends[1].refusing = Unavailable("restarting", "engine_restarting", 3)
    assert router.pick(None) is None
    assert router.unavailable() == Unavailable("restarting", "engine_restarting", 3)  # the soonest retry


def test_engines_already_tried_for_a_request_are_not_picked_again() -> None:
    router, _ = make_router(3)
    first = take(router)
    second = router.pick(None, [first])
    assert second is not None
    third = router.pick(None, [first, second])
    assert third not in (None, first, second)
    assert router.pick(None, router.pool.members) is None


def test_rediscovered_engines_keep_their_state_and_new_ones_start_clean() -> None:
    router, backends = make_router(2)
    kept = router.pool.members[0]
    kept.outstanding = 3
    added, removed = router.pool.replace([backends[0], StubBackend("http://10.0.0.9:8000")])
    assert added == ["http://10.0.0.9:8000"]
    assert removed == [backends[1].base_url]
    assert router.pool.members[0] is kept
    assert router.pool.members[1].outstanding == 0
