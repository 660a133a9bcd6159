"""Stale cleanup: find and end worker processes that an earlier pool of this user left behind.

Every pool writes ``pool.json`` in its private socket directory: its owner's pid and start time,
its run id, and its workers' pids. Workers normally exit when their owner dies (their stdin closes),
but a stopped or wedged one cannot. A new pool looks at the directories of *this user* whose owner
is gone (no such pid, or a pid reused by another process) and SIGKILLs the workers listed there that
still run ``dspex_nb.worker`` with that run id, then removes the directory. A live owner's pool
(another kernel) and another user's directories are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "dspex-"
OWNER_FILE = "pool.json"
RUNTIME_DIR_ENV = "DSPEX_RUNTIME_DIR"  # where pools make their socket directories (default: the temp dir)


def runtime_dir() -> Path:
    """The directory under which pools make their private socket directories, and cleanup looks."""
    return Path(os.environ.get(RUNTIME_DIR_ENV) or tempfile.gettempdir())


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a reused pid apart), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_owner(directory: Path, run_id: str, workers: list[int]) -> None:
    """Record (atomically) who owns ``directory`` and which worker pids it started."""
    record = {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid()), "run_id": run_id, "workers": workers}
    tmp = directory / f".{OWNER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(directory / OWNER_FILE)


def _runs_worker(pid: int, run_id: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    runs_ours = b"dspex_nb.worker" in argv or b"dspex_nb.worker.template" in argv  # a template's forks keep its argv
    return runs_ours and run_id.encode() in argv


def cleanup(root: Path | None = None) -> list[dict[str, Any]]:
    """End the leftovers of this user's dead pools under ``root`` (``runtime_dir()``); return what was done."""
    root = root or runtime_dir()
    cleaned = []
    for directory in root.glob(f"{PREFIX}*"):
        try:
            if directory.stat().st_uid != os.getuid() or not directory.is_dir():
                continue
            record = json.loads((directory / OWNER_FILE).read_text())
            owner_start = start_time(int(record["owner_pid"]))
            if owner_start is not None and owner_start == record["owner_start"]:
                continue  # a live pool: another kernel's
            killed = [pid for pid in record["workers"] if _runs_worker(int(pid), str(record["run_id"]))]
        except (OSError, ValueError, KeyError, TypeError):  # not a pool's directory, or not readable: leave it
            continue
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        log.info("dspex_nb: removed %s of dead pool %s, killed workers %s", directory, record["run_id"], killed)
        cleaned.append({"dir": str(directory), "run_id": record["run_id"], "killed": killed})
    return cleaned
