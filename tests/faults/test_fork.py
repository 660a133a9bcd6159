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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("how", ["exit", "shutdown"])
def test_a_forked_child_leaves_the_parents_pool_alone(how: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        assert report["child_status"] == 0, done.stderr[-3000:]
        assert report["dir"] and report["spare_dir"], "the child removed the parent's socket directories"
        assert report["status"] == 0, "the parent's worker was ended by the child"
        assert report["echo"] == {"x": "parent"}
    finally:  # the script's own exit ends them all; none is left behind
        wait_until(lambda: not any(pid_alive(pid) for pid in report["pids"]), what="the script's processes to exit")
