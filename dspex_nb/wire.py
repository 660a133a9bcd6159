"""What the kernel side and the workers agree on, beside the proto: environment names and addresses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from json import encoder
from pathlib import Path
from typing import Any

LM_KWARGS_ENV = "DSPEX_LM_KWARGS"  # the worker's dspy.LM settings, as JSON (not on argv: they may hold a key)
KERNEL_ENV = "DSPEX_KERNEL"  # "pid:start time" of the kernel that owns a template and its workers
WARNINGS = "warning"  # the output stream of a call's warnings: one JSON object a line (worker/output.py)
LOGS = "log"  # the output stream of a call's log records: one JSON object a line (worker/output.py)
EXIT_MISSING_DEPENDENCIES = 3  # a worker (or template) that cannot import what it needs exits with this
CACHE = "dspex_cache"  # in the kernel's settings a call carries: its dspy.configure_cache arguments that differ
# from DSPy's defaults (safe_types as (module, qualname) pairs), so that the workers' DSPy cache is made as the kernel's
ENV = "dspex_env"  # in the kernel's settings a call carries: its environment variables changed since the pool
# started ({name: value, or None where deleted}), set on the worker before the program runs
LM_STALE = "_dspex_stale"  # on an LM in the kernel whose change on a worker could not come back: why, which the
# worker says when it is sent again (it would not answer as in the kernel)
LM_VERSION = "_dspex_version"  # on an LM in the kernel: how many of its changes on the pool it took; a copy sent with
# a call has the count it was sent at, so a change made from an older one (a call in flight meanwhile) is not kept


def valid_text(text: str) -> str:
    """``text`` where it is valid Unicode; else with its lone surrogates (``"\\ud800"``, which ``os.fsdecode`` makes of
    a byte that is not UTF-8 too) written as their escapes, as Python's stderr writes them: a proto string field, a
    log file and a terminal take no lone surrogate, and one in a print or an error's message must not cost the call."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def message_options(limit: int) -> list[tuple[str, int]]:
    """gRPC channel and server options: messages of up to ``limit`` bytes, both ways."""
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def health_address(address: str) -> str:
    """Where a worker answers health pings: a server of its own beside the one that does the work, so that
    a worker busy with calls is never taken for a hung one."""
    return address.removesuffix(".sock") + ".health.sock"


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T for stopped, Z for a zombie...), or None if it is gone."""
    fields = _stat(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (to tell a reused pid apart), or None if it is gone or a zombie."""
    fields = _stat(pid)
    return None if not fields or fields[0] == "Z" else fields[19]


def processes(uid: int | None = None) -> dict[int, list[str]]:
    """The fields of ``/proc/PID/stat`` (state, parent, process group... as ``_stat`` reads them) of every process, or
    of those of ``uid``, by pid: one scan of /proc. Without /proc, none."""
    found: dict[int, list[str]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or (fields := _stat(int(entry.name))) is None:
                continue
            with contextlib.suppress(OSError):  # it ended meanwhile
                if uid is None or entry.stat().st_uid == uid:
                    found[int(entry.name)] = fields
    return found


def started_by(pid: int) -> list[int]:
    """The live processes that ``pid`` started, and those they started in turn (also in a session of their own, as
    ``subprocess.Popen(..., start_new_session=True)`` makes), with the members of the process group it leads (one
    whose parent ended meanwhile): what must end with it. Without /proc, none."""
    stats = {child: fields for child, fields in processes().items() if fields[0] != "Z"}
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    found = {pid} | {member for member, fields in stats.items() if int(fields[2]) == pid}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(pid)
    return sorted(found)


def started_any() -> bool:
    """Whether this process ever started a child: one still there (a zombie too) in its threads' lists of children,
    or one it waited for, whose page faults ``/proc/self/stat`` adds up (``cminflt``: no process runs without
    some). True where /proc cannot tell."""
    try:
        if int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[8]):
            return True
        return any(Path(task.path, "children").read_text().strip() for task in os.scandir("/proc/self/task"))
    except (OSError, IndexError, ValueError):
        return True


def kernel_spec() -> str:
    """This process as the owning kernel, for KERNEL_ENV."""
    return f"{os.getpid()}:{start_time(os.getpid())}"


def kernel_gone(spec: str) -> bool:
    """True when the kernel that KERNEL_ENV names has ended (its pid gone, or reused by another process); never
    where its start time was not known (no /proc: macOS), which would take every kernel for gone."""
    pid, _, started = spec.partition(":")
    return pid.isdigit() and started != "None" and start_time(int(pid)) != started


def pid_space() -> str:
    """Where this process's pids mean what they say: its host and PID namespace. A runtime directory may be shared
    with a container (pids of its own) or another host (a network file system); a pool there must not be judged
    dead because its owner's pid is no process here."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # no /proc (macOS): the host alone
        namespace = ""
    return f"{platform.node()} {namespace}"


def owner_spec() -> str:
    """This process as the owner of something others may find and judge (a journal claim, a Ray directory): the
    kernel (``kernel_spec``) and where its pid means something (``pid_space``)."""
    return f"{kernel_spec()} {pid_space()}"


def owner_gone(owner: str) -> bool:
    """The process an ``owner_spec`` names has ended: one of this host and PID namespace, no longer running. Never
    one elsewhere (a container sharing the file, another host), nor one without a start time (``kernel_gone``)."""
    kernel, _, where = owner.partition(" ")
    return where == pid_space() and kernel_gone(kernel)


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps's own C encoder with json.dumps's settings, made once: json.dumps makes one per call, which is
# two thirds of its time for a small chunk. It has no circular check: a value that contains itself ends in
# RecursionError, and json.dumps then says which it is ("Circular reference detected", or too deep).
_ENCODE = encoder.c_make_encoder(None, _not_serialisable, encoder.encode_basestring_ascii, None, ": ", ", ",
                                 False, False, True) if encoder.c_make_encoder else None


def dumps(value: Any) -> bytes:
    """``json.dumps(value).encode()``, faster; its errors as json.dumps's."""
    if _ENCODE:
        try:
            return "".join(_ENCODE(value, 0)).encode()
        except RecursionError:  # a value that contains itself, or one nested too deeply: json.dumps tells which
            pass
    return json.dumps(value).encode()


_SCAN = json.JSONDecoder().scan_once  # json.loads's C scanner, with its settings


def loads(data: bytes) -> Any:
    """``json.loads(data)``, faster for what ``dumps`` wrote (no whitespace around the value): the C scanner is
    called directly, without json.loads's layers of Python (encoding detection, two regular expressions), which
    cost a small message more than the scan itself. Anything else goes to json.loads, which raises its errors."""
    try:
        value, end = _SCAN(data.decode(), 0)
        if end == len(data):  # ASCII: as many characters as bytes
            return value
    except (StopIteration, ValueError):  # no JSON value at the start (json.loads says why), or not UTF-8
        pass
    return json.loads(data)


def definition_version(definition: str) -> str:
    """Which version of a defined program a worker holds: a digest of the source or payload it was defined
    from, as the kernel and the worker both compute it (a batch's items computed by another version, defined
    while it ran, are told apart by it)."""
    return hashlib.sha256(definition.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def sole_input(inputs: list[str], needed: list[str]) -> str | None:
    """The input a bare value (a plain ``%%dspex run`` cell, a string item) fills, as the kernel's magics and the
    worker both decide it: the only one, or the only one of ``needed``, those a call must give (the others
    optional); None where it is not clear which."""
    return inputs[0] if len(inputs) == 1 else needed[0] if len(needed) == 1 else None
