"""Ctrl-C while a pool stops (``with Pool()`` left, ``%dspex restart``): the stop waits out each worker's grace
period in turn, and an interrupt there must not leave the workers it had not reached yet running."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
from helpers import pid_alive, wait_until

from dspex_nb import Pool


@pytest.mark.parametrize("start", ["spawn", "template"])
def test_an_interrupt_while_the_pool_stops_leaves_no_worker_running(start: str) -> None:
    pool = Pool(workers=2, lm="demo", start=start, journal=False).start()
    pids = [row["pid"] for row in pool.status()]
    first = pool.workers[0].process

    def interrupted(grace: float = 2.0) -> None:
        first.signal(signal.SIGTERM)
        raise KeyboardInterrupt  # Ctrl-C while the stop waits for the first worker to end

    first.kill = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.shutdown()
        assert not pool.running
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=10,
                   what="the workers the interrupted stop had not reached to end")
    finally:
        pool.shutdown()  # the rest of the stop: the directory and the template
        for pid in pids:  # without the fix, the worker left running (only the pids this test started)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert pool.backend.dir is None
