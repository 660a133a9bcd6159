"""Helpers shared by the tests: polling with a deadline, process liveness."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dspex_nb import Pool

ROOT = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def worker_pids(pool: Pool) -> list[int]:
    return [row["pid"] for row in pool.status()]


TWO_STEP = '''
class TwoStep(dspy.Module):
    """Find the topic with reasoning, then answer with it."""

    def __init__(self):
        super().__init__()
        self.topic = dspy.ChainOfThought("question -> topic")
        self.answer = dspy.Predict("question, topic -> answer")

    def forward(self, question):
        topic = self.topic(question=question).topic
        return self.answer(question=question, topic=topic)
'''
