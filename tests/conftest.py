"""Shared fixtures: one real pool per test module, checked to leave no worker behind."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from helpers import pid_alive, wait_until, worker_pids

from dspex_nb import Pool

# Every pool (and every kernel the tests start) journals into a file of this test run only.
_journal_dir = tempfile.mkdtemp(prefix="dspex-test-journal-")
atexit.register(shutil.rmtree, _journal_dir, ignore_errors=True)
os.environ["DSPEX_JOURNAL"] = os.path.join(_journal_dir, "journal.sqlite3")

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
