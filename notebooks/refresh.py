"""Run every notebook here top to bottom in a fresh kernel and save its outputs in place.

Usage: python notebooks/refresh.py [NOTEBOOK ...]
Outputs are made in text mode (DSPEX_NONINTERACTIVE=1), as nbval runs them in CI, so the saved
outputs are what nbval compares and what GitHub and nbviewer show.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def refresh(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(notebook, path)
    print(f"refreshed {path.name}")


if __name__ == "__main__":
    os.environ["DSPEX_NONINTERACTIVE"] = "1"
    with tempfile.TemporaryDirectory() as journals:
        for name in sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb")):
            os.environ["DSPEX_JOURNAL"] = os.path.join(journals, f"{name}.sqlite3")  # as nbval runs them
            refresh(HERE / name)
