"""Shared fixtures: one real pool per test module, and process-cleanup checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """A started pool of 2 workers on the fast demo LM, shared by a test module."""
    started: set[int] = set()
    with Pool(workers=2, lm="demo") as p:
        yield p
        started.update(worker_pids(p))
    wait_until(lambda: not any(pid_alive(pid) for pid in started), what="the pool's workers to exit")


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python interpreter without grpcio, protobuf or dspy (a venv without packages)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    base = getattr(sys, "_base_executable", sys.executable)
    assert os.path.exists(base)
    return str(venv / "bin" / "python")
