"""Double faults leave no process behind and no slot stuck: a stopped template is replaced, and a stopped
template plus a killed kernel still ends every worker (and that template)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, pid_alive, wait_until

from dspex_nb import Pool
from dspex_nb.errors import WorkerDied

KERNEL = """
import json, sys
from dspex_nb import Pool
pool = Pool(workers=2, start="template", journal=False).start()
template = pool.backend.template.proc.pid
print(json.dumps({"workers": [r["pid"] for r in pool.status()], "template": template}), flush=True)
sys.stdin.read()
"""


def test_a_stopped_template_and_a_killed_kernel_leave_nothing_behind() -> None:
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              cwd=ROOT, text=True)
    pids: list[int] = []
    try:
        started = json.loads(kernel.stdout.readline())  # type: ignore[union-attr]
        pids = [*started["workers"], started["template"]]
        os.kill(started["template"], signal.SIGSTOP)  # it cannot close its workers' pipes now
        kernel.kill()
        kernel.wait()
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30,
                   what="the workers and the stopped template to end after the kernel")
    finally:
        kernel.kill()
        kernel.wait()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stopped_template_is_replaced_and_its_worker_reported_dead() -> None:
    with Pool(workers=1, start="template", start_timeout=6, health_interval=0.1, journal=False) as pool:
        template = pool.backend.template.proc.pid  # type: ignore[union-attr]
        os.kill(template, signal.SIGSTOP)
        try:
            in_flight = pool.execute_stream("sleep", {"seconds": 30})
            pool.kill_worker("w0", signal.SIGKILL)
            with pytest.raises(WorkerDied):  # its stopped template cannot say so, yet it is known dead
                in_flight.result(30)
            row = wait_until(lambda: (r := pool.status()[0])["state"] == "ready" and r["restarts"] >= 1 and r,
                             timeout=60, what="w0 to be back, from a new template")
            assert pool.backend.template is not None and pool.backend.template.proc.pid != template
            assert "died" in row["last_error"] or "template" in row["last_error"]
            assert pool.execute("echo", {"ok": 1}) == {"ok": 1}
        finally:
            if pid_alive(template):
                os.kill(template, signal.SIGKILL)
