"""Recycling: a worker is replaced after max_requests calls, after ttl seconds, or when the resident
memory it reports passes max_memory_mb; work in flight on it finishes first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from dspex_nb import Pool
from dspex_nb.errors import CallTimeout
from dspex_nb.ui import progress


def recycled(pool: Pool, worker: str, times: int) -> dict | None:
    row = next(r for r in pool.status() if r["worker"] == worker)
    return row if row["recycles"] >= times and row["state"] == "ready" else None


def test_max_requests() -> None:
    with Pool(workers=2, max_requests=3, health_interval=0.1, journal=False) as pool:
        first = pool.status()[0]
        for i in range(3):
            assert pool.execute("echo", {"i": i}, worker="w0") == {"i": i}
        row = wait_until(lambda: recycled(pool, "w0", 1), what="w0 to be recycled")
        assert row["pid"] != first["pid"] and row["restarts"] == 0
        assert "served 3 calls (max_requests=3)" in row["last_error"]
        assert pool.status()[1]["recycles"] == 0  # w1 served nothing
        assert pool.execute("whoami", worker="w0")["pid"] == row["pid"]


def test_max_requests_bounds_the_calls_a_process_takes_not_only_those_it_finished() -> None:
    # Was: a worker was recycled at the health round after its max_requests-th call finished, so calls made
    # meanwhile (or while the first ran) went to it too: max_requests=1 gave no fresh process per call
    with Pool(workers=2, max_requests=1, health_interval=0.1, journal=False) as pool:
        first = {row["pid"] for row in pool.status()}
        running = [pool.execute_stream("sleep", {"seconds": 1.0}) for _ in range(2)]
        assert pool.execute("whoami", timeout=60)["pid"] not in first  # both have had their call
        for run in running:
            assert run.result(30)["slept"] == 1.0


def test_ttl_lets_work_in_flight_finish_first() -> None:
    with Pool(workers=1, ttl=0.5, health_interval=0.1, journal=False) as pool:
        pid = pool.status()[0]["pid"]
        run = pool.execute_stream("sleep", {"seconds": 1.5})
        wait_until(lambda: pool.status()[0]["state"] == "draining", what="w0 to start draining")
        assert run.result(30) == {"slept": 1.5, "cancelled": False}  # not cut short by the recycle
        row = wait_until(lambda: recycled(pool, "w0", 1), what="w0 to be recycled")
        assert row["pid"] != pid and "(ttl=0.5 s)" in row["last_error"]


def test_max_memory_is_measured_by_the_worker() -> None:
    with Pool(workers=1, health_interval=0.1, journal=False) as pool:
        baseline = wait_until(lambda: pool.status()[0]["rss_mb"], what="a first memory reading")
        assert baseline > 20  # a Python process with dspy imported, as the worker measured it
        pool.max_memory_mb = baseline + 30
        session = pool.session()
        session.execute("session_put", {"value": "x" * (50 * 2**20)})  # about 50 MB more on the worker
        row = wait_until(lambda: recycled(pool, "w0", 1), what="w0 to be recycled for its memory")
        assert f"passed max_memory_mb={baseline + 30:g}" in row["last_error"]
        assert wait_until(lambda: pool.status()[0]["rss_mb"], what="a reading of the new process") < baseline + 30


def test_a_memory_limit_below_a_fresh_worker_is_reported_not_recycled_forever() -> None:
    with Pool(workers=1, max_memory_mb=1, health_interval=0.05, journal=False) as pool:
        row = wait_until(lambda: (r := pool.status()[0])["last_error"] and r, what="the limit to be reported")
        assert "more than max_memory_mb=1: not recycled for memory (raise max_memory_mb)" in row["last_error"]
        pid = row["pid"]
        for _ in range(20):  # calls, and health rounds meanwhile: the worker stays
            assert pool.execute("echo", {"x": 1}) == {"x": 1}
        assert pool.status()[0]["recycles"] == 0 and pool.status()[0]["pid"] == pid


def spin(started: str) -> str:
    """A program stuck in its own code (it makes no LM call, where a cancelled program stops)."""
    Path(started).touch()
    while True:
        pass


def block(started: str) -> str:
    """A program stuck in a blocking call of its own (a tool that waits forever)."""
    Path(started).touch()
    threading.Event().wait()
    return started


class Unprintable(Exception):
    def __str__(self) -> str:  # never returns: the worker's thread is stuck reporting the error, after the program
        while True:
            pass


def fails_unprintably(started: str) -> str:
    """A program whose error cannot be formatted."""
    Path(started).touch()
    raise Unprintable()


@pytest.mark.parametrize("program", [spin, block, fails_unprintably])
def test_a_cancelled_program_that_goes_on_running_is_ended_by_a_recycle(
        program: Callable[[str], str], tmp_path: Path) -> None:
    started = tmp_path / "started"
    with Pool(workers=1, health_interval=0.1, journal=False, cancel_grace=1.0) as pool:
        pid = pool.status()[0]["pid"]
        run = pool.run_stream(program, started=str(started))
        wait_until(started.exists, what="the program to start")
        run.cancel()
        row = wait_until(lambda: recycled(pool, "w0", 1), what="its worker to be recycled")
        assert row["pid"] != pid and "a cancelled call's program went on running" in row["last_error"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert pool.run("question -> answer", question="after?").answer.startswith("Demo LM answer to 'after?'")


def test_a_call_that_timed_out_while_its_error_is_formatted_is_ended_by_a_recycle(tmp_path: Path) -> None:
    # Was: the time the call's thread spent in the error's __str__ after its timeout was not counted as the
    # cancelled program going on (cancelled_running_s stayed 0), so the worker kept a core busy forever
    with Pool(workers=1, health_interval=0.1, journal=False, cancel_grace=1.0) as pool:
        pid = pool.status()[0]["pid"]
        with pytest.raises(CallTimeout):
            pool.call(fails_unprintably, {"started": str(tmp_path / "started")}, timeout=2)
        row = wait_until(lambda: recycled(pool, "w0", 1), what="its worker to be recycled")
        assert row["pid"] != pid and "a cancelled call's program went on running" in row["last_error"]


def test_with_cancel_grace_none_a_cancelled_program_that_goes_on_is_shown_not_recycled(tmp_path: Path) -> None:
    """``cancel_grace=None`` keeps the worker (and its session objects); ``status()`` shows how long the cancelled
    program has gone on, so a stuck one is seen."""
    started = tmp_path / "started"
    with Pool(workers=1, health_interval=0.1, journal=False, cancel_grace=None) as pool:
        pid = pool.status()[0]["pid"]
        run = pool.run_stream(block, started=str(started))
        wait_until(started.exists, what="the program to start")
        run.cancel()
        row = wait_until(lambda: next((r for r in pool.status() if r["cancelled_running_s"] >= 2.0), None),
                         what="a health ping to report the program going on 2 s after its cancel")
        assert row["pid"] == pid and row["recycles"] == 0 and row["state"] == "ready", row
        shown = progress.pool_rows(pool.status())[0][2]  # %dspex status and the pool dashboard say so too
        assert shown.startswith("ready (a cancelled program still running, "), shown
    with pytest.raises(ValueError, match=r"Pool\(cancel_grace=...\) must be a finite number > 0 \(seconds\) or None"):
        Pool(cancel_grace=0)
