"""A cancelled ``await pool.run_async(...)`` (a cancelled task, ``asyncio.wait_for``'s timeout, a cancelled
``asyncio.gather``) raises ``CancelledError`` (or the timeout's ``TimeoutError``) and stops its remote work, at
whatever moment the cancel lands: while the call waits for a worker, starts, or streams."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from helpers import wait_until

from dspex_nb import Pool

QA = dspy.Predict("question -> answer")


def idle(pool: Pool) -> bool:
    return sum(row["in_flight"] for row in pool.status()) == 0 and pool.queue_length == 0


def test_wait_for_timeout_is_a_timeout_and_stops_the_call(slow_pool: Pool) -> None:
    async def main() -> None:
        await asyncio.wait_for(slow_pool.run_async(QA, question="Why?"), 0.5)

    with pytest.raises(TimeoutError):  # was dspex_nb's Cancelled: wait_for saw no CancelledError to turn into it
        asyncio.run(main())
    wait_until(lambda: idle(slow_pool), timeout=10, what="the timed-out call to stop on its worker")


@pytest.mark.parametrize("after", [0.0, 0.05, 0.3])
def test_cancelled_gather_stops_every_call(slow_pool: Pool, after: float) -> None:
    async def main() -> None:
        gathering = asyncio.gather(*(slow_pool.run_async(QA, question=f"q{i}?") for i in range(30)))
        await asyncio.sleep(after)
        gathering.cancel()
        await gathering

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    # calls that a worker took just as the task was cancelled were left running to their end (20 s here)
    wait_until(lambda: idle(slow_pool), timeout=10, what="every cancelled call to stop on its worker")
    assert slow_pool.execute("echo", {"x": 1}) == {"x": 1}
