"""Two kernels running the same batch on one journal pay for each item once: the second takes what the
first computes from the journal as it arrives, and computes what the first leaves when it stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from dspex_nb import Pool
from dspex_nb.journal import digest

ITEMS = [f"shared question {i}?" for i in range(60)]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pool, Pool]]:
    journal = tmp_path_factory.mktemp("shared") / "journal.sqlite3"
    with Pool(workers=1, lm_kwargs={"ttft": 0.02}, journal=journal) as one, \
            Pool(workers=1, lm_kwargs={"ttft": 0.02}, journal=journal) as two:
        yield one, two


def lm_calls(pool: Pool) -> int:
    return sum(pool.describe(row["worker"])["counters"]["lm_calls"] for row in pool.status())


def test_the_same_batch_in_two_kernels_is_paid_for_once(kernels: tuple[Pool, Pool]) -> None:
    one, two = kernels
    before = lm_calls(one) + lm_calls(two)
    first, second = one.batch(ITEMS, "question -> answer"), two.batch(ITEMS, "question -> answer")
    assert first.result(120) == second.result(120)
    assert lm_calls(one) + lm_calls(two) - before == len(ITEMS)
    assert second.from_journal == len(ITEMS)


def test_what_a_stopped_kernel_leaves_is_computed_by_the_other(kernels: tuple[Pool, Pool], tmp_path: Path) -> None:
    one, two = kernels
    items = [f"left over {i}?" for i in range(40)]
    first = one.batch(items, "question -> answer")
    second = two.batch(items, "question -> answer")
    wait_until(lambda: first.ok >= 5, what="the first kernel's batch to be under way")
    first.cancel()  # as a kernel that stops: its claims are released
    results = second.result(120)
    assert all(r["answer"].startswith(f"Demo LM answer to 'left over {i}?'") for i, r in enumerate(results))
    assert 0 < second.from_journal < len(items)


def test_what_a_killed_kernel_claimed_runs_over_the_whole_pool_once_its_claim_lapses(
        kernels: tuple[Pool, Pool]) -> None:
    """A SIGKILLed kernel releases nothing: its claims lapse. The items it held then run as the batch's own do,
    several at a time on every worker, not one by one in the thread that watches the claims (a kernel that died
    with 1,000 items claimed cost the other 1,000 LM calls' time in a row)."""
    _, two = kernels
    items = [f"orphaned {i}?" for i in range(60)]
    key = two.batch([], "question -> answer").key  # the batch's key in the journal: the program's, not the items'
    assert two.journal is not None
    two.journal.claim(key, [digest(item) for item in items], "a-kernel-killed-mid-batch", 1.0)
    batch = two.batch(items, "question -> answer")
    peak = 0
    while not batch.wait(0.005):
        peak = max(peak, batch.snapshot()["running"])
    results = batch.result()
    assert all(r["answer"].startswith(f"Demo LM answer to 'orphaned {i}?'") for i, r in enumerate(results))
    assert batch.from_journal == 0 and batch.ok == len(items)
    assert peak > 1, "the lapsed items ran one at a time"
