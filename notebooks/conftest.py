"""nbval runs the notebooks in text mode (the deterministic outputs saved in them), each notebook's
kernel with a batch journal of its own, so a batch never comes from an earlier run's journal."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["DSPEX_NONINTERACTIVE"] = "1"
_journal_dir = tempfile.mkdtemp(prefix="dspex-nbval-journal-")
atexit.register(shutil.rmtree, _journal_dir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a notebook's kernel starts (in its first cell's setup), point it at a fresh journal."""
    os.environ["DSPEX_JOURNAL"] = os.path.join(_journal_dir, f"{item.path.stem}.sqlite3")
