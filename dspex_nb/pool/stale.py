"""Stale cleanup: find and end worker processes that an earlier pool of this user left behind.

Every pool writes ``pool.json`` (0600) in its private socket directory (0700): its owner's pid and
start time, its run id, where those pids mean something (host and PID namespace), and its workers' pids
with their start times. Workers normally exit when their owner dies (their stdin closes), but a stopped
or wedged one cannot. A new pool looks at the directories of *this user* whose owner is gone (no such
pid, or a pid reused by another process) and SIGKILLs the workers listed there that still run
``dspex_nb.worker`` with that run id, then removes the directory. A live owner's pool (another kernel),
a pool of another host or PID namespace (a container sharing the directory), another user's
directories, links, and anything a forged ``pool.json`` points at (a pid of another user, one not
started at the recorded time, or one without the run id) are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from dspex_nb.wire import pid_space, start_time

log = logging.getLogger(__name__)
PREFIX = "dspex-"
OWNER_FILE = "pool.json"
RUN_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], as Pool makes them
RUNTIME_DIR_ENV = "DSPEX_RUNTIME_DIR"  # where pools make their socket directories (default: the temp dir)


def runtime_dir() -> Path:
    """The directory under which pools make their private socket directories, and cleanup looks, as its real path.

    It and every directory above it must be this user's or root's, and sticky if others may write to it (as /tmp
    is; a group of the user's own may): in another user's directory, or one without the sticky bit, another user
    could move a pool's directory away and put sockets of their own in its place, which the kernel would then send
    programs, inputs and LM keys to. Links are followed once, here: a link another user owns (one made in /tmp
    before the user's ``$DSPEX_RUNTIME_DIR`` was) could be pointed elsewhere while the pool runs.
    """
    given = Path(os.environ.get(RUNTIME_DIR_ENV) or tempfile.gettempdir())
    where = f"the runtime directory {given} (${RUNTIME_DIR_ENV}, else the temp directory)"
    try:
        path = given.resolve(strict=True)
        info = os.stat(path)
    except OSError as exc:  # named: "No such file or directory: '/x'" does not say which setting to change
        raise type(exc)(exc.errno, f"{where} cannot be used ({exc.strerror}); set ${RUNTIME_DIR_ENV} to a "
                                   "directory of your own") from None
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"{where} is not a directory; set ${RUNTIME_DIR_ENV} to a "
                                                "directory of your own")
    _refuse_unsafe(given, path, where, f"another user could replace a pool's sockets there; set ${RUNTIME_DIR_ENV} "
                                      "to a directory of your own")
    return path


def check_dspy_cache() -> None:
    """Refuse DSPy's disk cache where another user could change it: ``$DSPY_CACHEDIR`` (else ``~/.dspy_cache``,
    as DSPy picks it), which the workers share with the kernel. DSPy keeps its entries as pickles and loads one for
    every cached LM call: whoever could put a file there would run code in the pool's workers, as this user. So it
    (or, where it does not exist yet, the directory DSPy would make it in) and every directory above it must be as
    the runtime directory's (``runtime_dir``), and the cache itself writable by no one else, sticky or not (another
    user could make its shard directories first). Within the home directory, the walk stops below it: whoever may
    change the home (its owner in a container that runs the notebook as another uid, as OpenShift does; ``nobody``
    on an NFS home) can change its startup files too, and the cache adds nothing to that."""
    given = _dspy_cache_dir()
    where = f"DSPy's cache directory {given} ($DSPY_CACHEDIR, else ~/.dspy_cache)"
    harm = ("DSPy loads its entries as pickles, so another user who put a file there would run code in the pool's "
            "workers; set $DSPY_CACHEDIR to a directory of your own")
    path = given.resolve()
    existing = next(directory for directory in (path, *path.parents) if directory.exists())
    if existing == path and _others_may_write(os.stat(path)):
        raise PermissionError(f"{where} may be written to by others: {harm}")
    _refuse_unsafe(given, path, where, harm, start=existing, stop=_home())


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, OSError):  # no home directory
        return None


def _dspy_cache_dir() -> Path:
    """Where DSPy keeps its disk cache, as it picks it (``dspy.utils.caching.default_cache_dir``), without importing
    DSPy."""
    if explicit := os.environ.get("DSPY_CACHEDIR"):
        return Path(explicit)
    try:
        return Path.home() / ".dspy_cache"
    except RuntimeError:  # no home directory: DSPy's is then relative
        return Path(".dspy_cache")


def _refuse_unsafe(given: Path, path: Path, where: str, harm: str, start: Path | None = None,
                   stop: Path | None = None) -> None:
    """Raise PermissionError where ``path`` (``given``'s real path), or ``start`` (a directory above it) and those
    above that, up to ``stop`` (not included) where it is one of them, is a directory whose entries another user
    could change (``_unsafe``)."""
    start = start or path
    for directory in (start, *start.parents):
        if directory == stop:
            return
        why = _unsafe(os.stat(directory))
        if why:
            if directory != given:
                why = f"{'leads to' if directory == path else 'is under'} {directory}, which {why}"
            raise PermissionError(f"{where} {why}: {harm}")


def _unsafe(info: os.stat_result) -> str | None:
    """Why another user could change what a directory of ``info`` holds, or None."""
    if info.st_uid not in (os.getuid(), 0):
        return "belongs to another user"
    if _others_may_write(info) and not info.st_mode & stat.S_ISVTX:
        return "may be written to by others but is not sticky"
    return None


def _others_may_write(info: os.stat_result) -> bool:
    """Whether users other than this one may write to a directory of ``info``: every user, or a group not theirs."""
    return bool(info.st_mode & stat.S_IWOTH or info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid))


def _private_group(gid: int) -> bool:
    """Whether group ``gid`` is this user's own (a user private group, named as the user and their primary group,
    as Debian, Ubuntu and Fedora make one for each user, whose umask 002 makes directories group-writable)."""
    try:
        user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def write_owner(directory: Path, run_id: str, workers: list[int]) -> None:
    """Record (atomically, mode 0600) who owns ``directory`` and which worker pids it started, each with
    its start time (so a reused pid is never taken for one of ours)."""
    record = {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid()), "run_id": run_id,
              "pid_space": pid_space(), "workers": [{"pid": pid, "start": start_time(pid)} for pid in workers]}
    tmp = directory / f".{OWNER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        tmp.replace(directory / OWNER_FILE)
    except BaseException:  # a full disk: what was written of it goes, the last complete record stays
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _private(path: Path, kind: int) -> bool:
    """``path`` itself (not a link) is a ``kind`` (S_IFDIR / S_IFREG) of this user that no one else may use."""
    info = os.lstat(path)
    return stat.S_IFMT(info.st_mode) == kind and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _ours(pid: int, started: str, run_id: str) -> bool:
    """``pid`` is still the worker (or template) of run ``run_id`` that this user started at ``started``."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid() or start_time(pid) != started:
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    runs_ours = b"dspex_nb.worker" in argv or b"dspex_nb.worker.template" in argv  # a template's forks keep its argv
    return runs_ours and run_id.encode() in argv


def _leftovers(directory: Path) -> tuple[str, list[int]] | None:
    """(run id, pids to end) of a dead pool's directory that this user provably owns, else None."""
    if not (_private(directory, stat.S_IFDIR) and _private(directory / OWNER_FILE, stat.S_IFREG)):
        return None
    fd = os.open(directory / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as source:
        record = json.load(source)
    run_id = record["run_id"]
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        return None
    if record.get("pid_space", pid_space()) != pid_space():  # its pids are another machine's: alive or not, unknown
        return None
    owner_start = start_time(int(record["owner_pid"]))
    if owner_start is not None and owner_start == record["owner_start"]:
        return None  # a live pool: another kernel's
    workers = [(w["pid"], w["start"]) for w in record["workers"]
               if isinstance(w, dict) and isinstance(w.get("pid"), int) and isinstance(w.get("start"), str)]
    return run_id, [pid for pid, started in workers if _ours(pid, started, run_id)]


def cleanup(root: Path | None = None) -> list[dict[str, Any]]:
    """End the leftovers of this user's dead pools under ``root`` (``runtime_dir()``); return what was done.

    Only what this user provably owns is touched: directories and ``pool.json`` files that are not links,
    belong to this user and are private to it (0700 / 0600), an exact run id, and processes of this user
    whose start time is the one recorded and whose command line carries that run id.
    """
    root = root or runtime_dir()
    cleaned = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(PREFIX)]
    except OSError:
        return []
    for entry in entries:
        directory = Path(entry.path)
        try:
            found = _leftovers(directory)
        except Exception:  # not a pool's directory, or a record that cannot be read (damaged, of another version:
            continue  # a pid of 1e999, nesting deeper than the parser's recursion): leave it, start the pool
        if found is None:
            continue
        run_id, killed = found
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        log.info("dspex_nb: removed %s of dead pool %s, killed workers %s", directory, run_id, killed)
        cleaned.append({"dir": str(directory), "run_id": run_id, "killed": killed})
    return cleaned
