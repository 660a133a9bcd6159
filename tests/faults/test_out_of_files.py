"""A pool start that runs out of file descriptors says so, and what to do, and leaves nothing running."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

KERNEL = r'''
import json, os, resource, sys
from pathlib import Path
from dspex_nb import Pool
from dspex_nb.wire import KERNEL_ENV, kernel_spec

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
while len(os.listdir("/proc/self/fd")) < 64 - int(sys.argv[3]):  # a kernel whose own sockets and files hold all but
    # a few
    held.append(os.open(os.devnull, os.O_RDONLY))
try:
    Pool(workers=int(sys.argv[2]), lm="demo", start=sys.argv[1], journal=False).start()
    error = None
except Exception as exc:
    error = [type(exc).__name__, str(exc)]
for fd in held:
    os.close(fd)
mine = f"{KERNEL_ENV}={kernel_spec()}".encode()
left = []
for entry in Path("/proc").iterdir():
    try:
        if entry.name.isdigit() and mine in (entry / "environ").read_bytes().split(b"\0"):
            left.append(int(entry.name))
    except OSError:
        pass
print(json.dumps({"error": error, "left": left}))
'''


@pytest.mark.parametrize(("start", "workers", "free"), [
    ("template", 4, 2), ("spawn", 4, 2),  # a process or pipe cannot be made
    ("template", 12, 10),  # the workers start, but this process cannot connect to the last: it read as "worker w9
    # exited with code 255 before it was ready", with no reason (its log and its /proc state could not be read)
])
def test_a_start_out_of_file_descriptors_says_what_ran_out(start: str, workers: int, free: int) -> None:
    done = subprocess.run([sys.executable, "-c", KERNEL, start, str(workers), str(free)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"] is not None, "the pool started: the test's limit no longer binds"
    kind, message = result["error"]  # was: OSError: [Errno 24] Too many open files, from subprocess.Popen
    assert kind == "WorkerStartError", message
    assert "ran out of file descriptors" in message and "ulimit -n" in message and "fewer workers" in message
    assert result["left"] == []
