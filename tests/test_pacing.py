"""Request starts spread over turns of the event loop (proxy/pacing.py), and the front's requests that wait."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from flushgate.proxy.front import ClientConnection
from flushgate.proxy.pacing import Startable, StartPacer
from flushgate.server import Server
from tests.fakes import FakeUpstream
from tests.test_front import post_bytes, read_answer
from tests.turns import turns_until

GUARD_S = 10


class Clock:
    """The pacer's clock, moved by the test: by the loop's other work, and by each start's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Named:
    def __init__(self, name: int, started: list[int], clock: Clock | None = None, cost_s: float = 0.0) -> None:
        self.name, self._started, self._clock, self._cost_s = name, started, clock, cost_s

    def start_if_still_wanted(self) -> None:
        self._started.append(self.name)
        if self._clock:
            self._clock.now += self._cost_s


async def one_turn() -> None:
    """The pacer's callback was queued before this task's wake-up: it runs first, exactly once."""
    await asyncio.sleep(0)


async def test_at_most_the_budget_starts_in_a_turn_and_the_rest_follow_in_order_a_turn_at_a_time() -> None:
    pacer = StartPacer(asyncio.get_running_loop(), per_turn=4, clock=Clock())  # time stands still: the count rules
    started: list[int] = []
    admitted = [pacer.admit(Named(n, started)) for n in range(10)]
    assert admitted == [True] * 4 + [False] * 6
    assert (started, pacer.waiting) == ([], 6)
    await one_turn()
    assert started == [4, 5, 6, 7]
    assert pacer.admit(Named(10, started)) is False  # this turn's four are used, and others wait before it
    await one_turn()
    assert started == [4, 5, 6, 7, 8, 9, 10]
    await one_turn()  # a turn with no start
    assert pacer.admit(Named(11, started)) is True  # nothing waits and the count began again
    assert pacer.waiting == 0


async def test_a_turn_starts_more_while_its_starts_took_less_than_the_loops_other_work_since_the_last_turn() -> None:
    clock = Clock()
    pacer = StartPacer(asyncio.get_running_loop(), per_turn=2, clock=clock)
    started: list[int] = []
    assert [pacer.admit(Named(n, started, clock, cost_s=0.3)) for n in range(13)] == [True] * 2 + [False] * 11
    clock.now = 1.0  # the rest of this turn and the poll took 1 s: the next turn's starts may take as long
    await one_turn()
    assert started == [2, 3, 4, 5]  # two by the count, then 1.6 < 2.0 and 1.9 < 2.0 s; 2.2 is over
    await one_turn()  # nothing else ran since: the count alone
    assert started == [2, 3, 4, 5, 6, 7]
    clock.now += 0.5
    await one_turn()
    assert started == [2, 3, 4, 5, 6, 7, 8, 9]  # 0.5 s of other work: two starts (0.6 s) fill it
    clock.now += 0.7
    await one_turn()
    assert started == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # 0.7 s: a third start, begun at 0.6 s, still fits
    assert pacer.waiting == 0


async def test_a_quiet_loop_keeps_no_callback_of_the_pacer() -> None:
    loop = asyncio.get_running_loop()
    pacer = StartPacer(loop, per_turn=2, clock=Clock())
    started: list[int] = []
    for n in range(3):
        pacer.admit(Named(n, started))
    for _ in range(4):
        await one_turn()
    assert started == [2]
    assert not pacer._scheduled  # it stops after a turn in which nothing started


class HeldPacer:
    """Admits nothing: every complete request waits, as one behind a burst of others does, until the test says."""

    def __init__(self) -> None:
        self.waiting: list[Startable] = []

    def admit(self, request: Startable) -> bool:
        self.waiting.append(request)
        return False


@pytest.fixture
async def held(gateway: Server, monkeypatch: pytest.MonkeyPatch) -> HeldPacer:
    assert gateway.front is not None
    pacer = HeldPacer()
    monkeypatch.setattr(gateway.front, "pacer", pacer)
    return pacer


async def test_a_waiting_request_is_answered_once_started_and_what_the_client_sent_meanwhile_after_it(
    fake: FakeUpstream,
    held: HeldPacer,
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    reader, writer = connection
    first, second = post_bytes(body=b'{"n": 1}'), post_bytes(body=b'{"n": 2}')
    writer.write(first)
    await turns_until(lambda: held.waiting)
    (waiting,) = held.waiting
    assert isinstance(waiting, ClientConnection)
    writer.write(second)  # sent on while the first waits: kept, not taken for part of the first
    await writer.drain()
    await turns_until(lambda: len(waiting._raw) == len(first) + len(second))
    assert fake.seen == []  # nothing went to the engine while it waited
    held.waiting.pop().start_if_still_wanted()
    assert orjson.loads((await read_answer(reader)).split(b"\r\n\r\n", 1)[1]) == {"ok": True}
    await turns_until(lambda: held.waiting)  # the second is read after the first's answer, and waits its turn
    held.waiting.pop().start_if_still_wanted()
    assert orjson.loads((await read_answer(reader)).split(b"\r\n\r\n", 1)[1]) == {"ok": True}
    assert [seen.body for seen in fake.seen] == [b'{"n": 1}', b'{"n": 2}']


async def test_a_waiting_request_whose_client_left_is_not_started(
    fake: FakeUpstream, gateway: Server, held: HeldPacer, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    _, writer = connection
    writer.write(post_bytes())
    await turns_until(lambda: held.waiting)
    (waiting,) = held.waiting
    assert isinstance(waiting, ClientConnection)
    writer.close()
    await turns_until(lambda: waiting.transport is None or waiting.transport.is_closing() or waiting._parser is None)
    waiting.start_if_still_wanted()
    assert gateway.front is not None
    assert gateway.front.stats.answered == 0
    assert fake.seen == []
