"""One UI pump thread: refreshes every live view at most ``1 / interval`` times a second.

However fast chunks arrive, a view costs at most one update per tick, so a 5,000-token stream
sends a few dozen widget messages, not thousands (jupyter_server drops iopub output beyond
about 1,000 messages/s). The thread runs only while there are views to refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)
SHUTDOWN_WAIT = 2.0  # seconds the kernel's shutdown waits for its live views' work to confirm it stopped


class Refreshable(Protocol):
    def refresh(self) -> bool: ...


class Pump:
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._views: list[Refreshable] = []
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # one refresh at a time: views are not thread-safe
        self._thread: threading.Thread | None = None

    def add(self, view: Refreshable) -> None:
        """Refresh ``view`` now and on every tick until its ``refresh()`` returns False. It is tracked first, so
        that a Ctrl-C landing in this first refresh still leaves it to the pump, which makes it final."""
        with self._lock:
            self._views.append(view)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dspex-ui-pump", daemon=True)
                self._thread.start()
        self.flush(view)

    def remove(self, view: Refreshable) -> None:
        with self._lock:
            if view in self._views:
                self._views.remove(view)

    def flush(self, view: Refreshable) -> None:
        """Refresh ``view`` once more now (e.g. when its run just ended) and stop tracking it if final."""
        if not self._refresh(view):
            self.remove(view)

    def end_all(self) -> None:
        """Stop the work of every live view and make each one final now: the kernel is shutting down, and a view
        the pump would have finished at its next tick stayed a widget in the saved notebook ("model not found").
        Every view's work is asked to stop first, then all are waited for together, up to ``SHUTDOWN_WAIT``: Jupyter
        kills a kernel that has not ended 5 s after asking, and a hung worker's call never confirms its cancel."""
        with self._lock:
            views = [view for view in self._views if hasattr(view, "end")]  # not a pool's dashboard: HTML already
        for view in views:
            self._ending(view, lambda view: view.work.cancel(wait=False))
        deadline = time.monotonic() + SHUTDOWN_WAIT
        for view in views:
            self._ending(view, lambda view: view.end(deadline))
            self.remove(view)

    def _ending(self, view: Any, step: Callable[[Any], object]) -> None:
        try:
            with self._refreshing:
                step(view)
        except Exception:  # the other views, and the kernel's shutdown itself, must go on
            log.exception("dspex_nb: a view could not be ended at the kernel's shutdown")

    def _refresh(self, view: Refreshable) -> bool:
        try:
            with self._refreshing:
                live = view.refresh()
                if not live:
                    finish = getattr(view, "finish", None)
                    if finish is not None:
                        finish()  # the final, static rendering (a view makes it once)
                return live
        except Exception:  # a broken view must not stop the others
            log.exception("dspex_nb: a view failed to refresh and was dropped")
            return False

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                views = list(self._views)
                if not views:
                    self._thread = None
                    return
            for view in views:
                if not self._refresh(view):
                    self.remove(view)


PUMP = Pump()
