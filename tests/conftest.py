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

# Every pool (and every kernel the tests start) journals into a file of this test run only, and makes
# its socket directory under a directory of this run only: two runs of the suite cannot disturb each other.
_run_dir = tempfile.mkdtemp(prefix="dspex-test-run-")
atexit.register(shutil.rmtree, _run_dir, ignore_errors=True)
os.environ["DSPEX_JOURNAL"] = os.path.join(_run_dir, "journal.sqlite3")
os.environ["DSPEX_RUNTIME_DIR"] = os.path.join(_run_dir, "run")
os.makedirs(os.environ["DSPEX_RUNTIME_DIR"], mode=0o700)
os.environ["DSPY_CACHEDIR"] = os.path.join(_run_dir, "dspy-cache")  # DSPy's cache, which workers share
# litellm's prices from its own copy (as the pool's workers do): fetching them from GitHub, which CI cannot reach,
# cost every process of the suite that imports litellm ~8 s of retries.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

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
