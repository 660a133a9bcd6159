"""Ctrl-C that lands while a ``Run`` or a ``BatchRun`` starts its threads (``Thread.start`` waits for each,
so a KeyboardInterrupt lands there), or while ``result()`` shows its view before it waits, stops the work it
started: the caller never got the handle to stop it with, and it would run to its end on the workers (a whole
batch), its journal claims kept."""

from __future__ import annotations

import threading
from collections.abc import Callable

import dspy
import pytest
from helpers import wait_until

from dspex_nb import Pool

QA = dspy.Predict("question -> answer")


def interrupt_starting(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Ctrl-C lands in ``start()`` of the thread named ``name`` once it is running, as it does in its wait."""
    start: Callable[[threading.Thread], None] = threading.Thread.start

    def interrupted(thread: threading.Thread) -> None:
        start(thread)
        if thread.name == name:
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted)


def idle(pool: Pool) -> bool:
    return sum(row["in_flight"] for row in pool.status()) == 0


def test_ctrl_c_while_a_batch_starts_stops_it(slow_pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_starting(monkeypatch, "dspex-batch-1")
    with pytest.raises(KeyboardInterrupt):
        slow_pool.map(QA, [f"q{i}?" for i in range(8)]).result()
    monkeypatch.undo()
    wait_until(lambda: idle(slow_pool), timeout=10, what="the interrupted batch's shards to stop")
    with slow_pool.journal._lock:  # its claims are given up: running it again does not wait out their lease
        assert slow_pool.journal._db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    assert slow_pool.execute("echo", {"x": 1}) == {"x": 1}


def test_ctrl_c_while_a_stream_starts_stops_it(slow_pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_starting(monkeypatch, "run-run_module")
    with pytest.raises(KeyboardInterrupt):
        slow_pool.run_stream(QA, question="Why?").result()
    monkeypatch.undo()
    wait_until(lambda: idle(slow_pool), timeout=10, what="the interrupted call to stop")
    assert slow_pool.execute("echo", {"x": 1}) == {"x": 1}


def test_ctrl_c_before_result_waits_stops_the_batch(slow_pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(handle: object, block: bool) -> None:  # Ctrl-C while result() looks for a notebook to show it in
        raise KeyboardInterrupt

    monkeypatch.setattr("dspex_nb.ui.render.view_while_waiting", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slow_pool.map(QA, [f"r{i}?" for i in range(8)]).result()
    wait_until(lambda: idle(slow_pool), timeout=10, what="the interrupted batch's shards to stop")
