"""A template that takes long to import DSPy (a busy machine, a slow disk) is waited for up to the pool's
``start_timeout``: only its forks, once it is ready, must be quick. Before, its first fork had to come within the
10 s fork timeout counted from the request, import included, so on a loaded machine pools failed to start with
"the template process did not fork a worker within 10 s"."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from dspex_nb import Pool
from dspex_nb.pool import local


def test_a_template_slow_to_import_dspy_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = tmp_path / "slow-python"  # an interpreter that takes 2 s more to start than this one
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(local, "FORK_TIMEOUT", 0.5)  # a fork, once the template is ready, takes milliseconds
    with Pool(workers=2, python=str(slow), start="template", journal=False, start_timeout=60) as pool:
        assert pool.execute("echo", {"x": 1}) == {"x": 1}
        assert all(row["state"] == "ready" for row in pool.status())
        assert pool.backend.template is not None and pool.backend.template.ready  # type: ignore[union-attr]
        assert os.path.samefile(pool.backend.python, slow)  # type: ignore[union-attr]
