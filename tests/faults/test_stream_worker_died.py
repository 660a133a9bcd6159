"""A stream whose worker dies raises ``WorkerDied`` wherever it is read: iterated, iterated with ``async for``,
or with ``result()``; never a quiet, truncated end."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator

import pytest
from helpers import wait_until

from dspex_nb import Pool
from dspex_nb.errors import WorkerDied
from dspex_nb.pool.calls import Chunk, Run

STREAMS: dict[str, Callable[[Pool], Run]] = {
    "execute_stream": lambda pool: pool.execute_stream(
        "predict", {"signature": "question -> answer", "inputs": {"question": "Why?"}}, worker="w0"),
    "run_stream": lambda pool: pool.run_stream("question -> answer", question="Why?"),
}


@pytest.fixture
def ready_pool(slow_pool: Pool) -> Iterator[Pool]:
    """The slow pool once every worker is ready (a test before killed one), so a stream is on w0 or w1."""
    wait_until(lambda: all(row["state"] == "ready" for row in slow_pool.status()), timeout=60,
               what="the pool's workers to be ready")
    yield slow_pool


def killed_at_first_token(pool: Pool, run: Run) -> Callable[[Chunk], int | None]:
    """A check for each chunk read: SIGKILL the run's worker at the first token; its pid, once killed."""
    killed: list[int] = []

    def check(chunk: Chunk) -> int | None:
        if chunk.kind == "token" and not killed:
            killed.append(pool.kill_worker(run.worker, signal.SIGKILL))
        return killed[0] if killed else None

    return check


def died(run: Run, pid: int) -> str:
    return rf"worker {run.worker} \(pid {pid}\) died \(killed by SIGKILL\) during the call"


@pytest.mark.parametrize("start", STREAMS)
def test_iterating_a_stream_whose_worker_dies_raises_worker_died(ready_pool: Pool, start: str) -> None:
    run = STREAMS[start](ready_pool)
    check = killed_at_first_token(ready_pool, run)
    pid, seen = None, 0
    with pytest.raises(WorkerDied) as caught:  # was: the loop ended quietly on the first tokens of the answer
        for chunk in run:
            pid, seen = check(chunk), seen + 1
    assert pid is not None and seen < 100 and run.status == "failed"
    assert caught.match(died(run, pid))
    with pytest.raises(WorkerDied) as again:
        run.result(30)
    assert again.value is caught.value  # the same error as result() raises


def test_async_iterating_a_stream_whose_worker_dies_raises_worker_died(ready_pool: Pool) -> None:
    run = STREAMS["run_stream"](ready_pool)
    check = killed_at_first_token(ready_pool, run)
    killed: list[int | None] = [None]

    async def read() -> None:
        async for chunk in run:
            killed[0] = check(chunk)

    with pytest.raises(WorkerDied, match="during the call") as caught:  # was: the async for ended quietly
        asyncio.run(read())
    assert killed[0] is not None and caught.match(died(run, killed[0]))


def test_a_cancelled_stream_still_ends_its_iteration_quietly(ready_pool: Pool) -> None:
    run = STREAMS["run_stream"](ready_pool)
    for chunk in run:
        if chunk.kind == "token":
            run.cancel()
    assert run.status == "cancelled"
