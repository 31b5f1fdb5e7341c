"""proxy/eager.py: a coroutine started in the callback that has its input, handed to a task once it waits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flushgate.proxy import eager


async def test_a_coroutine_runs_up_to_its_first_wait_at_once_and_a_task_finishes_it() -> None:
    loop = asyncio.get_running_loop()
    steps: list[str] = []
    answer: asyncio.Future[str] = loop.create_future()

    async def serve() -> None:
        steps.append("sent")
        steps.append(await answer)

    task = eager.start(loop, serve())
    assert steps == ["sent"]  # before start returned: no turn of the loop in between
    assert task is not None
    answer.set_result("answered")
    await task
    assert steps == ["sent", "answered"]


async def test_a_coroutine_that_never_waits_is_done_when_start_returns() -> None:
    steps: list[str] = []

    async def refuse() -> None:
        steps.append("refused")

    assert eager.start(asyncio.get_running_loop(), refuse()) is None
    assert steps == ["refused"]


async def test_a_bare_yield_to_the_loop_is_resumed_like_any_wait() -> None:
    steps: list[int] = []

    async def turns() -> None:
        for n in range(3):
            steps.append(n)
            await asyncio.sleep(0)

    task = eager.start(asyncio.get_running_loop(), turns())
    assert task is not None
    assert steps == [0]
    await task
    assert steps == [0, 1, 2]


@pytest.mark.parametrize("after_first_step", [False, True])
async def test_a_cancel_reaches_the_coroutine_where_it_waits_before_or_after_the_tasks_first_step(
    after_first_step: bool,
) -> None:
    """The front cancels a request's task when its client goes: the exchange must see it where it waits, even
    when the task has not run yet, so it ends as a client abort and closes the engine's request."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    never: asyncio.Future[None] = loop.create_future()

    async def serve() -> None:
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled at the wait")
            raise
        finally:
            seen.append("cleaned up")

    task = eager.start(loop, serve())
    assert task is not None
    if after_first_step:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled at the wait", "cleaned up"]
    assert task.cancelled()


async def test_an_error_in_the_eager_part_goes_to_the_loops_exception_handler() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))

    async def broken() -> None:
        raise ValueError("bad")

    try:
        assert eager.start(loop, broken()) is None
    finally:
        loop.set_exception_handler(None)
    assert isinstance(reported[0]["exception"], ValueError)
