"""``%load_ext dspex_nb`` starts a template process at once; the first local pool forks its workers from it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from IPython.core.interactiveshell import InteractiveShell

from dspex_nb import Pool
from dspex_nb.pool import local

pytestmark = pytest.mark.skipif(local.DEFAULT_START != "template", reason="templates are for Linux (fork)")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def spare() -> Iterator[Callable[[], local.LocalBackend]]:
    """Warms a template when called (in the test itself: pytest sets PYTEST_CURRENT_TEST anew for each phase,
    and a template is used only by a pool started in the environment it started in)."""
    def warm() -> local.LocalBackend:
        local.warm()
        assert local._spare is not None and local._spare.template is not None
        return local._spare

    yield warm
    local.close_spare()


def test_the_first_pool_forks_its_workers_from_the_warmed_template(
        spare: Callable[[], local.LocalBackend]) -> None:
    spare = spare()
    template = spare.template
    with Pool(workers=2, journal=False) as pool:
        assert pool.backend is spare and local._spare is None  # taken, not shared with a later pool
        assert {parent_of(row["pid"]) for row in pool.status()} == {template.proc.pid}
        assert pool.execute("echo", {"x": 1}) == {"x": 1}
    assert template.proc.poll() is not None  # it ended with the pool


def test_a_warmed_template_is_not_used_once_the_environment_changed(
        spare: Callable[[], local.LocalBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    spare = spare()
    template = spare.template.proc
    monkeypatch.setenv("DSPEX_TEST_CHANGED", "1")  # e.g. an API key or DSPY_CACHEDIR set after %load_ext
    with Pool(workers=1, journal=False) as pool:
        assert pool.backend is not spare
        assert parent_of(pool.status()[0]["pid"]) != template.pid
    wait_until(lambda: template.poll() is not None, what="the unused template to end")


def test_load_ext_warms_a_template_and_unload_ext_ends_it() -> None:
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext dspex_nb")
    try:
        assert local._spare is not None
        template = local._spare.template.proc
        assert template.poll() is None
    finally:
        ip.run_cell("%unload_ext dspex_nb")
    assert local._spare is None
    wait_until(lambda: template.poll() is not None, what="the template to end")


def test_a_warmed_template_is_matched_when_the_pool_starts_not_when_it_is_made(
        spare: Callable[[], local.LocalBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    spare = spare()
    pool = Pool(workers=1, journal=False)
    monkeypatch.setenv("DSPEX_TEST_CHANGED", "1")  # set between Pool() and start(): the workers must see it
    with pool:
        assert pool.backend is not spare
        assert "DSPEX_TEST_CHANGED" in Path(f"/proc/{pool.status()[0]['pid']}/environ").read_bytes().decode()


def test_a_warmed_template_is_not_used_from_another_working_directory(
        spare: Callable[[], local.LocalBackend], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spare = spare()
    monkeypatch.chdir(tmp_path)  # %cd into a project after %load_ext: its workers must start there
    with Pool(workers=1, journal=False) as pool:
        assert pool.backend is not spare
        assert Path(f"/proc/{pool.status()[0]['pid']}/cwd").resolve() == tmp_path.resolve()


def test_load_ext_warns_and_loads_when_no_template_can_start(capsys: pytest.CaptureFixture[str]) -> None:
    ip = InteractiveShell.instance()
    ip.config.Dspex.python = "/nonexistent/python3"
    try:
        ip.run_cell("%load_ext dspex_nb")
        assert "dspex: could not start a template process ahead of the first pool" in capsys.readouterr().err
        assert local._spare is None
        assert ip.find_line_magic("dspex") is not None
    finally:
        ip.run_cell("%unload_ext dspex_nb")
        del ip.config.Dspex["python"]


CELLS = """
from IPython.testing.globalipapp import start_ipython
shell = start_ipython()
for cell in ["%load_ext dspex_nb", "from dspy.teleprompt import BootstrapFewShot",
             '%%dspex predict "question -> answer" -o pred\\nWhy?', "print(type(pred).__name__)",
             "%unload_ext dspex_nb"]:
    result = shell.run_cell(cell)
    assert result.success, (cell, result.error_in_exec or result.error_before_exec)
"""


def test_dspy_imports_right_after_load_ext_and_a_first_cell_stores_a_prediction() -> None:
    """In a fresh kernel-like process: nothing imports DSPy behind the user's back (a cell importing a part
    of it meanwhile got half-built modules), and the first cell's answer is a dspy.Prediction."""
    out = subprocess.run([sys.executable, "-c", CELLS], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DSPEX_NONINTERACTIVE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("Prediction"), out.stdout


HELD_IMPORT = """
import importlib.abc, importlib.machinery, sys, threading
released = threading.Event()

class Hold(importlib.abc.MetaPathFinder):
    # DSPy's import, begun by the first cell's thread, stops at dspy.predict until released: in the module's
    # execution, which holds only that module's lock (Python calls finders under its global import lock)
    def find_spec(self, name, path, target=None):
        if name != "dspy.predict":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def exec_module(module):
            if not released.wait(30):  # the call waited for DSPy: its first token comes after the import
                released.set()
            execute(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hold())
from IPython.testing.globalipapp import start_ipython
from dspex_nb.pool import calls

before_dspy = []
add = calls.Run._add

def _add(self, chunks):
    if not before_dspy and any(chunk.kind == "token" for chunk in chunks):
        before_dspy.append(not released.is_set())
        released.set()
    add(self, chunks)

calls.Run._add = _add
shell = start_ipython()
shell.run_line_magic("load_ext", "dspex_nb")
shell.run_cell_magic("dspex", 'predict "question -> answer"', "Why?")
shell.run_line_magic("unload_ext", "dspex_nb")
print(before_dspy)
"""


def test_a_first_cell_streams_its_answer_while_dspy_is_still_importing() -> None:
    """The first cell imports DSPy in a thread while its answer streams: nothing on the call's path may wait for
    that import (a first token 1.5-3 s late on 2 cores). Here the import is held until the first token comes."""
    out = subprocess.run([sys.executable, "-c", HELD_IMPORT], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "DSPEX_NONINTERACTIVE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[True]", out.stdout + out.stderr
