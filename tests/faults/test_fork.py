"""A kernel that forks (``os.fork`` in a cell, multiprocessing's "fork" start method): the child holds a copy of
every pool, and its end, or a ``shutdown()`` there, must not end the parent's workers or remove their directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, pid_alive, wait_until

# The parent starts a pool (and, with the template warmed, a spare template), forks a child that tries the pool and
# then ends as a script ends (atexit handlers run) or after pool.shutdown(); the parent then calls the pool again.
SCRIPT = r"""
import json, os, sys
from dspex_nb import Pool
from dspex_nb.errors import PoolClosed
from dspex_nb.pool import local

how = sys.argv[1]
pool = Pool(workers=1, lm="demo", journal=False, health_interval=60).start()
local.warm()  # a spare template for the next pool, as %load_ext starts one
pids = [row["pid"] for row in pool.status()] + [pool.backend.template.proc.pid, local._spare.template.proc.pid]
child = os.fork()
if child == 0:
    assert not pool.running
    try:  # gRPC's connections do not survive a fork: a call says so, rather than failing somewhere in gRPC
        pool.execute("echo", {"x": "child"}, timeout=30)
    except PoolClosed as exc:
        assert "forked" in str(exc), exc
    else:
        raise AssertionError("the call in the forked child did not raise PoolClosed")
    if how == "shutdown":
        pool.shutdown()
    sys.exit(0)  # as a script ends: atexit handlers run in the child too
_, status = os.waitpid(child, 0)
report = {"child_status": status, "pids": pids, "dir": pool.backend.dir.is_dir(),
          "spare_dir": local._spare.dir.is_dir(), "status": pool.status()[0]["restarts"]}
try:
    report["echo"] = pool.execute("echo", {"x": "parent"}, timeout=30)
finally:
    pool.shutdown()
print(json.dumps(report))
"""


def _run(script: str, arg: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``arg`` in a Python process of its own (this checkout's dspex_nb); it must succeed."""
    done = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("how", ["exit", "shutdown"])
def test_a_forked_child_leaves_the_parents_pool_alone(how: str) -> None:
    done = _run(SCRIPT, how)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        assert report["child_status"] == 0, done.stderr[-3000:]
        assert report["dir"] and report["spare_dir"], "the child removed the parent's socket directories"
        assert report["status"] == 0, "the parent's worker was ended by the child"
        assert report["echo"] == {"x": "parent"}
    finally:  # the script's own exit ends them all; none is left behind
        wait_until(lambda: not any(pid_alive(pid) for pid in report["pids"]), what="the script's processes to exit")


# A thread of the parent holds one of the pool's locks when the kernel forks (a call choosing its worker, a program
# being installed): in the child that lock stays held, its holder gone, so a call must refuse before taking it.
HELD = r"""
import os, sys, threading
import dspy
from dspex_nb import Pool
from dspex_nb.errors import PoolClosed

pool = Pool(workers=1, lm="demo", journal=False, health_interval=60).start()
lock = {"scheduler": pool._lock, "install": pool._installing}[sys.argv[1]]
held, release = threading.Event(), threading.Event()

def hold():
    with lock:
        held.set()
        release.wait()

threading.Thread(target=hold, daemon=True).start()
held.wait()
child = os.fork()
if child == 0:
    answered = threading.Event()
    threading.Thread(target=lambda: answered.wait(20) or os._exit(3), daemon=True).start()  # it hung
    try:
        if sys.argv[1] == "scheduler":
            pool.execute("echo", {"x": "child"}, timeout=5)
        else:
            pool.run(dspy.Predict("question -> answer"), question="Never shipped before?")
    except PoolClosed as exc:
        answered.set()
        os._exit(0 if "forked" in str(exc) else 4)
    os._exit(5)
release.set()
_, status = os.waitpid(child, 0)
pool.shutdown()
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("lock", ["scheduler", "install"])
def test_a_call_in_a_forked_child_refuses_even_where_the_parent_held_a_lock(lock: str) -> None:
    done = _run(HELD, lock)
    assert done.stdout.strip().splitlines()[-1] == "0", "the call in the child hung on the parent's held lock"
