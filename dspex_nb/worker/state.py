"""What one worker process knows about itself: identity, LM, counters."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from dspex_nb import redact
from dspex_nb.worker.sessions import Sessions

if TYPE_CHECKING:
    from dspex_nb.worker.tools import CancelEvent


def _where() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "a directory that was removed"


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Slots:
    """One call's use of a (maybe shared) semaphore: each item thread ``take``s a slot and ``release``s it;
    ``give_back`` returns those still held when the call ends, so an item that hangs past its call's end
    (threads cannot be stopped) does not keep the slot from the calls after it."""

    def __init__(self, semaphore: threading.Semaphore, cancelled: CancelEvent) -> None:
        self._semaphore = semaphore
        self._cancelled = cancelled
        self._held: set[int] = set()  # threads holding a slot
        self._ended = False
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Wait for a slot; False (and no slot) once the call is cancelled or over."""
        while not self._semaphore.acquire(timeout=0.2):
            if self._cancelled.is_set():
                return False
        with self._lock:
            if self._ended or self._cancelled.is_set():
                self._semaphore.release()
                return False
            self._held.add(threading.get_ident())
        return True

    def release(self) -> None:
        with self._lock:
            if threading.get_ident() in self._held:  # not given back already
                self._held.discard(threading.get_ident())
                self._semaphore.release()

    def give_back(self) -> None:
        with self._lock:
            self._ended = True
            for _ in self._held:
                self._semaphore.release()
            self._held.clear()


class _Active:
    """``WorkerState.track()``'s block: a class, as a generator's context manager made for each call cost a unary
    call's handler a sixth of its time."""

    __slots__ = ("state", "cancelled")

    def __init__(self, state: WorkerState, cancelled: CancelEvent) -> None:
        self.state = state
        self.cancelled = cancelled

    def __enter__(self) -> None:
        state = self.state
        if sys.getrecursionlimit() < state.recursion_limit:
            sys.setrecursionlimit(state.recursion_limit)
        with state._lock:
            state.active += 1
            state.total += 1
            state._programs[self.cancelled] = state._programs.get(self.cancelled, 0) + 1

    def __exit__(self, *exc: object) -> None:
        state = self.state
        with state._lock:
            state.active -= 1
            state._running_ended(self.cancelled)


@dataclass
class WorkerState:
    worker_id: str
    run_id: str
    max_message_bytes: int
    lm: Any = None  # a dspy.LM
    lm_model: str = ""
    lm_kwargs: dict[str, Any] = field(default_factory=dict)
    demo_engine: Any = None  # the DemoEngine when lm_model == "demo": its counters are exposed
    rate_limit: float | None = None  # LM requests per minute on this worker
    callbacks: list[Any] = field(default_factory=list)  # DSPy callbacks of every request (rate limit)
    counters: dict[str, int] = field(default_factory=dict)
    session_ttl: float = 3600.0
    sessions: Sessions = field(init=False)  # objects kept across calls of a session
    modules: dict[str, Any] = field(default_factory=dict)  # name -> DefinedModule, kept by the define tool
    started: float = field(default_factory=time.time)
    active: int = 0
    total: int = 0
    recursion_limit: int = field(default_factory=sys.getrecursionlimit)  # the least a call starts with (``track``)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: dict[str, list[Any]] = field(default_factory=dict)  # group -> [semaphore, calls using it]
    _programs: dict[CancelEvent, int] = field(default_factory=dict)  # a call's cancel event -> its threads running
    _cwd_lock: threading.Lock = field(default_factory=threading.Lock)
    _cwd_missing: set[str] = field(default_factory=set)  # the kernel's directories this machine lacks (said once)

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.worker_id, self.session_ttl)

    def track(self, cancelled: CancelEvent) -> _Active:
        """Count one request as active while the block runs, and its thread as running for ``cancelled_running``:
        after its cancel, the call's own thread may go on in code of the program's that is not its run (an error's
        ``__str__`` that never returns, while the error is reported). A recursion limit that a program lowered
        (``sys.setrecursionlimit(50)``) is raised back to the worker's first: it outlived the call and failed
        every later program on the worker with RecursionError (a limit raised stays, as a deep program needs)."""
        return _Active(self, cancelled)

    @contextmanager
    def running(self, cancelled: CancelEvent) -> Iterator[None]:
        """Count a thread running a program of the call that ``cancelled`` (its ``CancelEvent``) cancels as running
        in the block (an item's, or streamify's, which may outlive the call's own)."""
        with self._lock:
            self._programs[cancelled] = self._programs.get(cancelled, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running_ended(cancelled)

    def _running_ended(self, cancelled: CancelEvent) -> None:
        """One thread of the call that ``cancelled`` cancels is no longer running (the lock held)."""
        self._programs[cancelled] -= 1
        if not self._programs[cancelled]:
            del self._programs[cancelled]

    def cancelled_running(self) -> float:
        """Seconds a cancelled call's thread (its own, or one running its program) has gone on running since its
        cancel (the longest; 0: none)."""
        with self._lock:
            cancels = [event.set_at for event in self._programs if event.set_at is not None]
        return time.monotonic() - min(cancels) if cancels else 0.0

    @contextmanager
    def slots(self, group: str, size: int, cancelled: CancelEvent) -> Iterator[Slots]:
        """``size`` slots for the items of a call; calls of the same non-empty ``group`` share them (the
        first one's ``size``). A batch sends a worker its next shard before the current one ends, so no
        slot idles while a shard finishes its last items, and still no more than ``size`` run at once.
        When the call ends, slots its items still hold (a cancelled call's hung item) are given back."""
        with self._lock:
            entry = self._slots.get(group) if group else None
            if entry is None:
                entry = [threading.Semaphore(size), 0]
                if group:
                    self._slots[group] = entry
            entry[1] += 1
        slots = Slots(entry[0], cancelled)
        try:
            yield slots
        finally:
            slots.give_back()
            with self._lock:
                entry[1] -= 1
                if group and not entry[1]:
                    del self._slots[group]

    def enter(self, cwd: str) -> None:
        """Work in the kernel's working directory ``cwd``, which each call brings, as its program works there in the
        kernel: a notebook's ``%cd`` after the pool started reaches the workers, and a program's ``os.chdir`` does
        not outlive its call on the one worker that ran it. The directory is the process's, but the calls of a worker
        all come from one kernel and want the same one: it changes only where it differs. One this machine does not
        have (a Ray node) leaves the worker where it is, said once on the call's stderr."""
        if not cwd:
            return
        with self._cwd_lock:
            with contextlib.suppress(OSError):  # the directory the worker is in was removed
                if os.getcwd() == cwd:
                    return
            try:
                os.chdir(cwd)
            except OSError as exc:
                if cwd not in self._cwd_missing:
                    self._cwd_missing.add(cwd)
                    print(f"dspex: worker {self.worker_id} cannot work in the kernel's directory {cwd} "
                          f"({exc.strerror}); its calls run in {_where()}", file=sys.stderr)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def dspy_settings(self) -> dict[str, Any]:
        """What every request runs under: ``with dspy.context(**state.dspy_settings())``."""
        return {"lm": self.lm, "callbacks": self.callbacks}

    def describe(self) -> dict[str, Any]:
        versions = {"python": platform.python_version()}
        for dist in ("dspy", "grpcio", "protobuf"):
            versions[dist] = metadata.version(dist)
        counters: dict[str, Any] = {"active_requests": self.active, "total_requests": self.total,
                                    "session_objects": self.sessions.count(), **self.counters}
        if self.demo_engine is not None:
            counters["lm_calls"] = self.demo_engine.calls
            counters["lm_rate_limited"] = self.demo_engine.rate_limited
            counters["tokens_streamed"] = self.demo_engine.tokens_streamed
            counters["lm_streams_open"] = self.demo_engine.streaming
        return {"worker_id": self.worker_id, "run_id": self.run_id, "pid": os.getpid(), "rss_bytes": rss_bytes(),
                "uptime": time.time() - self.started, "versions": versions,
                "lm": {"model": self.lm_model, "kwargs": redact.mapping(self.lm_kwargs)}, "rate_limit": self.rate_limit,
                "modules": sorted(self.modules),
                "counters": counters}
