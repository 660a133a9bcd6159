"""Stale cleanup: a new pool ends the workers a dead pool of this user left behind, and only those."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, pid_alive, wait_until

from dspex_nb import Pool

CHILD = """
import json, sys
from dspex_nb import Pool
pool = Pool(workers=2, start="spawn").start()  # with a template, the template itself ends a wedged worker
pids = [r["pid"] for r in pool.status()]
print(json.dumps({"pids": pids, "dir": str(pool.backend.dir), "run": pool.run_id}), flush=True)
sys.stdin.read()
"""


def test_a_new_pool_ends_what_a_dead_pool_left(pool: Pool) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                             text=True)
    try:
        dead = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        wedged, other = dead["pids"]
        os.kill(wedged, signal.SIGSTOP)  # a stopped worker cannot notice that its owner died
        child.kill()
        child.wait()
        wait_until(lambda: not pid_alive(other), what="the other worker to exit by itself")
        assert pid_alive(wedged) and Path(dead["dir"]).exists()
        live = {r["pid"] for r in pool.status()}

        with Pool(workers=1) as fresh:
            assert {"dir": dead["dir"], "run_id": dead["run"], "killed": [wedged]} in fresh.cleaned
            wait_until(lambda: not pid_alive(wedged), what="the wedged worker to be killed")
            assert not Path(dead["dir"]).exists()
            assert all(c["dir"] != str(pool.backend.dir) for c in fresh.cleaned)  # a live pool is left alone
            assert all(pid_alive(p) for p in live) and pool.backend.dir.exists()
            assert pool.execute("echo", {"ok": 1}) == {"ok": 1}
    finally:
        child.kill()
        child.wait()
        if "wedged" in locals() and pid_alive(wedged):
            os.kill(wedged, signal.SIGKILL)
