"""Show a run, a batch or a pool: live widgets in a notebook, deterministic text elsewhere.

Blocking shows wait in short slices (Ctrl-C cancels the remote work), then print or refresh
the final state once; background (``block=False``) shows return at once and the pump keeps
the widgets current.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from dspex_nb.batch import BatchRun
from dspex_nb.pool.calls import Handle, Run
from dspex_nb.pool.executor import Executor
from dspex_nb.ui import live_frontend, noninteractive, progress
from dspex_nb.ui.pump import PUMP, Refreshable
from dspex_nb.words import count

if TYPE_CHECKING:
    from dspex_nb.ui.widgets import PoolDashboard


def _display(view: Any) -> None:
    from IPython.display import display

    view.handle = display(view, display_id=True)  # finish() replaces it with the static rendering


_viewed: weakref.WeakSet[Handle] = weakref.WeakSet()  # the handles a live view shows (or showed)


def show_run(run: Run, title: str, *, mode: str | None = None, block: bool = True, out: TextIO | None = None) -> None:
    """Stream ``run``'s tokens into a StreamView, or print its fields and a summary when it ends.

    Ctrl-C while it blocks (wherever it lands) cancels the run.
    """
    try:
        if live_frontend(mode):
            from dspex_nb.ui.widgets import StreamView

            _viewed.add(run)
            _show_live(StreamView(run, title), run.wait if block else None, run)
        elif block:
            out = out or sys.stdout
            if _terminal(out):
                _tokens_as_they_come(run, out)
                return
            run.wait()
            text = progress.StreamText(run)
            text.update()
            for line in text.lines():
                out.write(line + "\n")
            out.write(text.summary() + "\n")
    except KeyboardInterrupt:
        run.cancel()
        raise


def _terminal(out: TextIO) -> bool:
    """A terminal (terminal IPython, a TTY): live text; elsewhere (CI, nbval, a pipe) plain final lines."""
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not noninteractive()


def _tokens_as_they_come(run: Run, out: TextIO) -> None:
    """Print each field's tokens as they arrive (a ``[step] field:`` line where a new one starts), then the
    fields no step streamed and the summary. Ctrl-C stops the run; what arrived stays on the screen."""
    streamed: set[tuple[str, str]] = set()
    ended: set[tuple[str, str]] = set()  # fields whose stream ended
    current: tuple[str, str] | None = None
    first_step = None
    for chunk in run.arrivals():  # the summary line says how it ended
        if chunk.kind == "output":  # the program's print, which the run wrote: the tokens go on on a line of their own
            current = None
        if chunk.kind == "status" and chunk.data.get("retry") is not None:
            # its predictor's call is made again: what it streamed is not the answer, whose fields come at the end
            out.write(("\n" if current else "") + progress.printable(f"({chunk['message']})") + "\n")
            step = progress.predictor_label(chunk["retry"])
            streamed = {where for where in streamed if where[0] != step}
            current = None
        if chunk.kind != "token":
            continue
        where = (progress.predictor_label(chunk.data.get("predictor") or ""), chunk["field"])
        first_step = where[0] if first_step is None else first_step
        if where != current or where in ended:  # a later step of a multi-step module is named; a predictor called
            # again streams its field on a line of its own
            ended.discard(where)
            label = f"[{where[0]}] " if where[0] != first_step else ""
            out.write(("\n" if current else "") + progress.printable(f"{label}{where[1]}: "))
            current = where
            streamed.add(where)
        out.write(progress.printable(chunk["text"]))
        out.flush()
        if chunk.data.get("last"):
            ended.add(where)
    text = progress.StreamText(run)
    text.update()
    rest = [progress.printable(f"{name}: {value}") for step, group in text.groups.items()
            for name, value in group.items()
            if (step, name) not in streamed and not any(name == field for _, field in streamed)]
    out.write(("\n" if current else "") + "".join(f"{line}\n" for line in rest) + text.summary() + "\n")


def show_batch(batch: BatchRun, title: str, *, mode: str | None = None, block: bool = True,
               out: TextIO | None = None) -> None:
    """A BatchDashboard, or (outside a live notebook) one summary line and the errors when it ends."""
    try:
        if live_frontend(mode):
            from dspex_nb.ui.widgets import BatchDashboard

            _viewed.add(batch)
            _show_live(BatchDashboard(batch, title), batch.wait if block else None, batch)
        elif block:
            out = out or sys.stdout
            if _terminal(out):  # one status line, rewritten in place at most 10 times a second
                width = 0
                while not batch.wait(0.1):
                    line = progress.terminal_batch_line(batch.snapshot(), _columns(out))
                    out.write("\r" + line.ljust(width))
                    out.flush()
                    width = len(line)
                out.write("\r" + " " * width + "\r")
            else:
                batch.wait()
            out.write(progress.batch_summary(batch.snapshot()) + "\n")
            if batch.warning:
                out.write(f"  warning: {progress.printable(batch.warning)}\n")
            for line in progress.error_lines(progress.error_groups(batch.records, sorted(batch.failures))):
                out.write(f"  {line}\n")
    except KeyboardInterrupt:
        batch.cancel()
        raise


def _columns(out: TextIO) -> int:
    """The width of the terminal ``out`` writes to (``COLUMNS``, or 80, where it cannot say)."""
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return shutil.get_terminal_size().columns


def show_handle(handle: Handle) -> None:
    """A ``Run`` or ``BatchRun`` as a cell's value: a new live view of it in a notebook (the cell does not wait),
    its repr elsewhere (as the cell's text/plain)."""
    if live_frontend():
        _show(handle, block=False)
        return
    from IPython.display import display

    display({"text/plain": repr(handle)}, raw=True)


def view_while_waiting(handle: Handle, block: bool = True) -> None:
    """In a live notebook, show ``handle`` while the cell waits for it (``block``: until it ends), unless a view shows
    it already (the magics', one of an earlier cell): Stop and the kernel's interrupt then both cancel it."""
    if handle not in _viewed and live_frontend():
        _show(handle, block=block)


def _show(handle: Handle, *, block: bool) -> None:
    if isinstance(handle, BatchRun):
        show_batch(handle, handle.label, block=block)
    elif isinstance(handle, Run):
        show_run(handle, handle.label, block=block)


def _show_live(view: Refreshable, wait: Callable[[], object] | None, handle: Handle | None = None) -> None:
    """Display ``view``, let the pump refresh it, and (when ``wait`` is given) block until it is final; a view of
    ``handle`` that no cell waits for is stopped by the kernel's interrupt while the kernel is idle."""
    _display(view)
    _end_views_at_shutdown()
    PUMP.add(view)
    if wait is not None:
        wait()
        PUMP.flush(view)
    elif handle is not None:
        _live_views[handle] = weakref.ref(view)  # not the view itself: it holds the handle, which it would keep
        _stop_on_idle_interrupt(handle)


def _end_views_at_shutdown() -> None:
    """Make the kernel's shutdown (Jupyter's shut down or restart of the kernel) stop every live view's work and
    replace its widgets with its final rendering first. ipykernel's other hooks come too late: it ends the pump's
    thread, and the connections that carry a display's update, before ``atexit`` runs, so a view that was still
    running stayed a live widget in the notebook saved after ("model not found" on reopening). Its shutdown request
    calls ``do_shutdown`` first, while the kernel still sends messages (in its control thread, where a cell that
    still runs blocks no handler)."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    shutdown = getattr(kernel, "do_shutdown", None)
    if shutdown is None or getattr(shutdown, "ends_views", False):
        return

    def do_shutdown(restart: bool) -> Any:
        PUMP.end_all()
        return shutdown(restart)

    do_shutdown.ends_views = True  # type: ignore[attr-defined]
    kernel.do_shutdown = do_shutdown


_live_views: weakref.WeakKeyDictionary[Handle, weakref.ref[Refreshable]] = weakref.WeakKeyDictionary()  # views no
# cell waits for, as the pump holds them until they are final


def flush_view(handle: Handle) -> None:
    """Make the view of ``handle`` that no cell waited for final now, if it is shown (a loop over a batch that just
    ended): in the cell, not at the pump's next tick, after it, which a notebook run by nbconvert would not keep."""
    shown = _live_views.get(handle)
    if shown is not None and (view := shown()) is not None:
        PUMP.flush(view)


_background: weakref.WeakSet[Handle] = weakref.WeakSet()  # live views' handles that no cell waits for
_idle_sigint: list[Any] = []  # the kernel's own handler of SIGINT while it is idle, once ours stands in for it


def _stop_on_idle_interrupt(handle: Handle) -> None:
    """Jupyter's interrupt (the toolbar's ■, Kernel > Interrupt) while the kernel is idle stops ``handle``, as it
    would stop a cell that waits for it. ipykernel ignores SIGINT while idle: it sets its own handler only while it
    handles a message, and puts back ``kernel.saved_sigint_handler`` after, so ours stands in for that one."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    if not hasattr(kernel, "saved_sigint_handler") or threading.current_thread() is not threading.main_thread():
        return
    _background.add(handle)
    if kernel.saved_sigint_handler is not _interrupted_while_idle:
        _idle_sigint[:] = [kernel.saved_sigint_handler]
        kernel.saved_sigint_handler = _interrupted_while_idle


def _interrupted_while_idle(signum: int, frame: FrameType | None) -> None:
    """Stop the work of every background view still running (in a thread: a signal handler must not wait on locks
    that the code it interrupted may hold), then do what the kernel did with SIGINT while idle."""
    running = [handle for handle in _background if not handle.done]
    _background.clear()
    if running:
        threading.Thread(target=lambda: [handle.cancel() for handle in running], name="dspex-interrupt",
                         daemon=True).start()
    previous = _idle_sigint[0] if _idle_sigint else None
    if callable(previous):
        previous(signum, frame)


_pool_views: dict[int, PoolDashboard] = {}  # the live dashboard of each running pool (by id), the newest one


def show_pool(pool: Executor, *, mode: str | None = None, out: TextIO | None = None, show_stats: bool = False) -> None:
    """A PoolDashboard that refreshes while the pool runs (the newest one per pool), or text tables:
    the workers, then (``show_stats``) per-tool call timings."""
    if live_frontend(mode):
        from dspex_nb.ui.widgets import PoolDashboard

        for key in [key for key, old in _pool_views.items() if key == id(pool) or not old.pool.running]:
            PUMP.remove(_pool_views.pop(key))
        _pool_views[id(pool)] = view = PoolDashboard(pool)
        _show_live(view, None)
        return
    out = out or sys.stdout
    state = "running" if pool.running else "stopped"
    out.write(f"pool: {count(pool.size, 'worker')}, lm={pool.lm}, {state}\n")
    status = pool.status()
    out.write(progress.text_table(progress.POOL_COLUMNS, progress.pool_rows(status)) + "\n")
    out.writelines(f"{note}\n" for note in progress.pool_notes(status))
    if show_stats:
        rows = progress.stats_rows(pool.stats())
        if rows:
            out.write(progress.text_table(progress.STATS_COLUMNS, rows) + "\n")
