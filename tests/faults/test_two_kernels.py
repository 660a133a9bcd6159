"""Two kernels running the same batch on one journal pay for each item once: the second takes what the
first computes from the journal as it arrives, and computes what the first leaves when it stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from dspex_nb import Pool

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
