"""A cell sent to the kernel again stops the work that its earlier run started, as that run's output is gone.

JupyterLab clears a cell's output as it sends the cell again (Shift+Enter on a cell that still runs, Run All) and
drops whatever the earlier run sends after: its view and its Stop are gone for good. A blocking ``%%dspex`` cell went
on for its whole answer (tokens paid for, the new run queued behind it) with nothing on the page, and an ``-a`` cell's
work went on unseen until the kernel's idle interrupt. ipykernel 7 reads every shell message first in its
shell-channel thread, while the main thread may still be blocked in the earlier run: there, a request for a cell
whose earlier run's work is still going asks that work to stop. The earlier run, a magic, then ends with its Stop
note, not an error, so ipykernel's stop-on-error does not abort the request that follows it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

from dspex_nb.pool.calls import Handle

_lock = threading.Lock()
_started: dict[str, weakref.WeakSet[Handle]] = {}  # cell id -> the work its runs started, while it goes on
_latest: dict[str, str] = {}  # cell id -> the msg_id of the newest request to run it that has arrived


def listen(kernel: Any) -> None:
    """Read each shell message as it arrives (in ipykernel's shell-channel thread), before ipykernel routes it on;
    once per kernel. Nothing where the kernel has no such thread."""
    thread = getattr(kernel, "shell_channel_thread", None)
    stream = getattr(kernel, "shell_stream", None)
    route = getattr(kernel, "shell_channel_thread_main", None)
    if thread is None or stream is None or route is None or getattr(kernel, "_dspex_rerun", False):
        return
    kernel._dspex_rerun = True

    def on_recv(msg: list[Any]) -> Any:
        with contextlib.suppress(Exception):  # never at the cost of the message, which ipykernel routes on here
            _arrived(kernel.session, msg)
        return route(msg)

    thread.io_loop.add_callback(stream.on_recv, on_recv, copy=False)  # in the thread the stream belongs to


def stop_when_rerun(handle: Handle) -> None:
    """Stop ``handle`` when the cell running now (its frontend's cell id) is sent to the kernel again, or at once
    where it already was."""
    from IPython import get_ipython

    parent = _parent(getattr(get_ipython(), "kernel", None))
    cell = (parent.get("metadata") or {}).get("cellId")
    if not isinstance(cell, str):
        return
    with _lock:
        again = _latest.get(cell) not in (None, parent["header"].get("msg_id"))
        if not again:
            for key in [key for key, handles in _started.items() if all(h.done for h in handles)]:
                del _started[key]
            _started.setdefault(cell, weakref.WeakSet()).add(handle)
    if again:
        handle.cancel(wait=False)


def _parent(kernel: Any) -> dict[str, Any]:
    get_parent = getattr(kernel, "get_parent", None)
    return (get_parent("shell") if get_parent is not None else None) or {}


def _arrived(session: Any, msg: list[Any]) -> None:
    """Stop the work of the earlier runs of the cell that ``msg`` (a request to run it) runs again."""
    try:
        _, frames = session.feed_identities(msg, copy=False)
        message = session.deserialize(frames, content=False, copy=False)  # as ipykernel reads it there
    except Exception:  # ipykernel says what is wrong with it
        return
    cell = (message.get("metadata") or {}).get("cellId")
    if message["header"].get("msg_type") != "execute_request" or not isinstance(cell, str):
        return
    with _lock:
        _latest[cell] = message["header"].get("msg_id")
        started = list(_started.pop(cell, ()))
    for handle in started:
        handle.cancel(wait=False)
