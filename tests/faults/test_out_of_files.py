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
while len(os.listdir("/proc/self/fd")) < 62:  # a kernel whose own sockets and files hold all but two
    held.append(os.open(os.devnull, os.O_RDONLY))
try:
    Pool(workers=4, lm="demo", start=sys.argv[1], journal=False).start()
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


@pytest.mark.parametrize("start", ["template", "spawn"])
def test_a_start_out_of_file_descriptors_says_what_ran_out(start: str) -> None:
    done = subprocess.run([sys.executable, "-c", KERNEL, start], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"] is not None, "the pool started: the test's limit no longer binds"
    kind, message = result["error"]  # was: OSError: [Errno 24] Too many open files, from subprocess.Popen
    assert kind == "WorkerStartError", message
    assert "ran out of file descriptors" in message and "ulimit -n" in message and "fewer workers" in message
    assert result["left"] == []
