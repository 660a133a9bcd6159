"""The benchmarks still run and print every figure (smoke runs: nothing here asserts a time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    return out.stdout


def test_core_prints_every_figure_with_its_peer() -> None:
    table = run("core.py", "--quick").split("figure", 1)[1]
    for figure in ("unary echo p50", "count stream", "kernel CPU per 1,000 chunks", "token stream",
                   "pool ready, 4 vs 1 workers, template", "batch 40 items", "throughput, 8 callers"):
        assert figure in table, figure


def test_scale_prints_a_row_per_pool_size() -> None:
    rows = run("scale.py", "--items", "32", "--latency", "0.01", "--max-workers", "2").splitlines()[2:]
    assert [row.split()[0] for row in rows] == (["1", "2"] if (os.cpu_count() or 1) >= 2 else ["1"])
    assert all(len(row.split()) == 8 for row in rows)  # ipyparallel's column: a figure, or "-" without it


def test_first_token_compares_with_in_kernel_dspy() -> None:
    out = run("first_token.py", "--repeats", "1")
    assert "%load_ext -> first token" in out and "dspy.streamify" in out and "ratio" in out
