"""Objects that live across calls inside a session: a tool keeps one and hands back a handle.

A handle is ``h:<worker id>:<pid>:<n>``, so the error for a handle that is not here can say what
happened: made by another worker or by an earlier process of this one (replaced since), its
session closed or expired (``session_ttl`` seconds unused), or it belongs to another session.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from dspex_nb.errors import ArgumentError

FORGET_AFTER = 1000  # ended sessions remembered for error messages
FORGET_HANDLES = 100_000  # and handles of ended sessions (a handle used after its session ended, in another one)


@dataclass
class _Session:
    objects: dict[str, Any] = field(default_factory=dict)
    used: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, worker_id: str, ttl: float) -> None:
        self.worker_id = worker_id
        self.ttl = ttl
        self._live: dict[str, _Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # session id -> why it ended
        self._ended_handles: OrderedDict[str, str] = OrderedDict()  # handle -> the id of its ended session
        self._count = 0
        self._lock = threading.Lock()

    def keep(self, tool: str, session_id: str, obj: Any) -> str:
        """Keep ``obj`` in the session; return its handle."""
        if not session_id:
            raise ArgumentError(tool, "ArgumentError", "handles live in a session: call this through pool.session()")
        with self._lock:
            self._sweep()
            session = self._live.setdefault(session_id, _Session())
            session.used = time.monotonic()
            self._count += 1
            handle = f"h:{self.worker_id}:{os.getpid()}:{self._count}"
            session.objects[handle] = obj
            return handle

    def resolve(self, tool: str, session_id: str, handle: str) -> Any:
        """The object behind ``handle`` in this session, or an ArgumentError saying why it is not here."""
        with self._lock:
            self._sweep()
            session = self._live.get(session_id)
            if session is not None and handle in session.objects:
                session.used = time.monotonic()
                return session.objects[handle]
            raise ArgumentError(tool, "ArgumentError", self._why_missing(session_id, handle))

    def close(self, session_id: str) -> int:
        """End a session; return how many objects it held."""
        with self._lock:
            session = self._live.pop(session_id, None)
            self._end(session_id, session, "it was closed")
            return len(session.objects) if session else 0

    def count(self) -> int:
        with self._lock:
            self._sweep()
            return sum(len(s.objects) for s in self._live.values())

    def _why_missing(self, session_id: str, handle: str) -> str:
        parts = handle.split(":")
        if len(parts) != 4 or parts[0] != "h":
            return f"{handle!r} is not a handle (handles look like 'h:w0:1234:1')"
        worker, pid = parts[1], parts[2]
        if worker != self.worker_id:
            return (f"handle {handle} was made on worker {worker}, but this call ran on {self.worker_id}: use a "
                    "session with affinity 'strict_queue' or 'strict_fail_fast' to stay on one worker")
        if pid != str(os.getpid()):
            return (f"handle {handle} was made by an earlier process of worker {worker} (pid {pid}); that process was "
                    "replaced and its objects are gone")
        ended = session_id if session_id in self._ended else self._ended_handles.get(handle)
        if ended in self._ended:
            return f"handle {handle} is gone: its session {ended} ended ({self._ended[ended]})"
        owner = next((sid for sid, s in self._live.items() if handle in s.objects), None)
        if owner is not None:
            return f"handle {handle} belongs to session {owner}, not to this call's session {session_id or '(none)'}"
        return f"no object with handle {handle} on worker {worker}"

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._live.items() if now - s.used > self.ttl]:
            self._end(sid, self._live.pop(sid), f"it expired after {self.ttl:g} s unused")

    def _end(self, session_id: str, session: _Session | None, why: str) -> None:
        """Remember why the session ended, and which session its handles were of (for a call of another)."""
        self._ended[session_id] = why
        while len(self._ended) > FORGET_AFTER:
            self._ended.popitem(last=False)
        for handle in session.objects if session else ():
            self._ended_handles[handle] = session_id
        while len(self._ended_handles) > FORGET_HANDLES:
            self._ended_handles.popitem(last=False)
