"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import pid_alive, wait_until, worker_pids

from dspex_nb import Pool


@pytest.fixture(scope="module")
def slow_pool() -> Iterator[Pool]:
    """Two workers on a demo LM whose answers take 20 s: a call still in flight is one that was not stopped."""
    with Pool(workers=2, lm="demo", lm_kwargs={"per_token": 0.01, "answer_tokens": 2000}) as pool:
        yield pool
        pids = worker_pids(pool)
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), what="the pool's workers to exit")
