"""Packaging as Python users expect: one version, a console script, type information, a licence, and
ipywidgets needed only for the live widgets."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from helpers import ROOT

import dspex_nb


def test_the_version_is_in_one_place() -> None:
    assert metadata.version("dspex_nb") == dspex_nb.__version__
    assert "version =" not in (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]


def test_the_console_script_runs_doctor() -> None:
    script = Path(sys.executable).parent / "dspex-nb"
    done = subprocess.run([str(script), "doctor"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "[ok ] dspy" in done.stdout, done.stdout + done.stderr


def test_the_console_script_names_itself_and_refuses_a_bad_setting_in_one_line() -> None:
    script = Path(sys.executable).parent / "dspex-nb"
    done = subprocess.run([str(script), "demo", "-n", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("usage: dspex-nb ") and "Pool(workers=...) must be an int from 1" in done.stderr


def test_type_information_and_licence_ship() -> None:
    assert (Path(dspex_nb.__file__).parent / "py.typed").exists()
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_without_ipywidgets_the_api_and_text_views_work() -> None:
    code = """
import sys
sys.modules["ipywidgets"] = None  # as if it were not installed
from dspex_nb import Pool
from dspex_nb.ui import live_frontend
from dspex_nb.ui.render import show_batch
try:
    live_frontend("widgets")
except ImportError as exc:
    print("refused:", exc)
with Pool(workers=1, journal=False) as pool:
    show_batch(pool.batch(["a?", "b?"], "question -> answer"), "b", mode="auto")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert ("refused: display mode 'widgets' needs ipywidgets, anywidget and markdown-it-py: "
            "pip install 'ipywidgets>=8.1' 'anywidget>=0.9' 'markdown-it-py>=3'") in done.stdout
    assert "batch done: 2 items, 2 ok, 0 failed" in done.stdout
