"""Supervision of a pool's workers: health checks, replacement of the dead, hung and failed, and
recycling (``max_requests``, ``ttl``, ``max_memory_mb``). A mixin of ``Pool``: it uses the pool's
workers, lock and settings, and its ``_spawn`` / ``_wait_ready``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from dspex_nb.errors import DspexError, PoolClosed, WorkerDied
from dspex_nb.pool.connection import ConnectionClosed
from dspex_nb.pool.worker import DRAINING, FAILED, READY, RESTARTING, Worker
from dspex_nb.words import count

HUNG_AFTER_FAILED_PINGS = 2
EXIT_WAIT = 1.0  # seconds a worker that missed its pings is given to be seen exiting (one being killed), before it is
# called hung
CANCEL_GRACE = 600.0  # Pool(cancel_grace=...)'s default: seconds a cancelled call's program may go on running (it
# stops at its next LM call; one in flight (a long generation, an LM's retries) runs to its end; a recycle loses the
# worker's session objects) before its worker is recycled: a loop or a blocking tool of the program would otherwise
# keep a core or a thread forever
RETRY_FAILED_AFTER = 5.0  # seconds before the health thread tries a slot that failed to restart again
log = logging.getLogger(__name__)


class Supervision:
    """The health thread (``_watch``) and everything it does to a pool's workers."""

    def _watch(self) -> None:
        while not self._closing.wait(self.health_interval):
            try:
                self._check_all()
            except Exception:  # the health thread must outlive any one bad check
                log.exception("dspex_nb: health check failed")

    def _check_all(self) -> None:
        """One health round: replace the dead, hung and failed, recycle the due, finish draining."""
        pings = []
        for worker in list(self.workers):
            worker.process.trim_log()  # a program printing without end fills no disk (nor the tmpfs it may be)
            if worker.state == FAILED and time.monotonic() - worker.ready_at > RETRY_FAILED_AFTER:
                self._replace(worker, worker.last_error, expected=FAILED)
            if worker.state == DRAINING and worker.in_flight == 0:
                self._replace(worker, worker.last_error, expected=DRAINING, recycle=True)
            if worker.state not in (READY, DRAINING):
                continue
            if worker.process.exit_code() is not None:
                self._replace(worker, f"died ({worker.process.ended()})", expected=worker.state)
            else:
                with contextlib.suppress(ConnectionClosed):  # replaced meanwhile
                    pings.append((worker, worker.conn.ping(self.ping_timeout)))
        for worker, ping in pings:
            try:
                worker.rss, worker.cancelled_running = ping.result()
                worker.start_rss = worker.start_rss or worker.rss
                worker.failed_pings = 0
            except ConnectionClosed:
                worker.failed_pings += 1
                if worker.failed_pings >= HUNG_AFTER_FAILED_PINGS:
                    self._replace(worker, self._why_unanswered(worker), expected=worker.state)
                continue
            reason = self._recycle_reason(worker) if worker.state == READY else ""
            if reason:
                self._drain(worker, reason)

    @staticmethod
    def _why_unanswered(worker: Worker) -> str:
        """Why ``worker`` missed its pings: it died (a process killed mid-call closes its socket before it has
        exited, which a large one under load takes longer to do than the pings took: it was reported hung, not
        killed), or it hangs."""
        with contextlib.suppress(TimeoutError):
            worker.process.wait(EXIT_WAIT)
            return f"died ({worker.process.ended()})"
        return f"stopped answering pings ({worker.failed_pings} missed)"

    def _recycle_reason(self, worker: Worker) -> str:
        """Why ``worker`` is due to be replaced on purpose (empty when it is not)."""
        if self.cancel_grace is not None and worker.cancelled_running >= self.cancel_grace:
            return (f"a cancelled call's program went on running {worker.cancelled_running:.0f} s after its cancel "
                    f"(cancel_grace={self.cancel_grace:g} s; a cancelled program stops at its next LM call, and this "
                    "one made none: a loop or a blocking call of its own, or one LM call that long): recycled to "
                    "end it, with the worker's session objects")
        if self.max_requests is not None and worker.served >= self.max_requests:
            return f"served {count(worker.served, 'call')} (max_requests={self.max_requests})"
        if self.ttl is not None and time.monotonic() - worker.ready_at >= self.ttl:
            return f"lived {time.monotonic() - worker.ready_at:.0f} s (ttl={self.ttl:g} s)"
        if self.max_memory_mb is not None and worker.rss / 2**20 >= self.max_memory_mb:
            if worker.start_rss / 2**20 >= self.max_memory_mb:  # a new worker would be over it too: say so, once
                note = (f"{worker.id} needs {worker.start_rss / 2**20:.0f} MB when it starts, more than "
                        f"max_memory_mb={self.max_memory_mb:g}: not recycled for memory (raise max_memory_mb)")
                if worker.last_error != note:
                    worker.last_error = note
                    log.warning("dspex_nb: %s", note)
                return ""
            return f"resident memory {worker.rss / 2**20:.0f} MB passed max_memory_mb={self.max_memory_mb:g}"
        return ""

    def _drain(self, worker: Worker, reason: str) -> None:
        """Route no new call to ``worker``; the health thread recycles it once its calls have finished."""
        with self._lock:
            if worker.state == READY:
                worker.state = DRAINING
                worker.recycles += 1
                worker.last_error = f"{worker.id} (pid {worker.process.pid}) recycled: {reason}"

    def check_worker(self, worker_id: str, why: str) -> bool:
        """Ping one worker now; replace it when it does not answer within ``ping_timeout``."""
        worker = next((w for w in self.workers if w.id == worker_id), None)
        if worker is None or worker.state != READY:
            return False
        try:
            worker.conn.ping(self.ping_timeout).result()
            return True
        except ConnectionClosed:
            self._replace(worker, f"did not answer a ping after {why}")
            return False

    def _replace(self, worker: Worker, reason: str, expected: str = READY, recycle: bool = False) -> None:
        """Kill ``worker``'s process and start a new one in its slot, in a background thread.

        A recycled worker (drained on purpose) gets SIGTERM and a moment to exit; a dead, hung or
        failed one counts as a restart, with ``reason`` as its last error, and is killed at once.
        """
        with self._lock:
            if worker.state != expected or self._closing.is_set():
                return
            worker.state = RESTARTING
            if not recycle:
                worker.restarts += 1  # counted now, so a caller sees the replacement as soon as it is decided
                worker.last_error = reason if expected == FAILED else f"{worker.id} (pid {worker.process.pid}) {reason}"
            thread = threading.Thread(target=self._restart, args=(worker, 2.0 if recycle else 0.0),
                                      name=f"dspex-restart-{worker.id}", daemon=True)
            self._restarting = [t for t in self._restarting if t.is_alive()] + [thread]
        thread.start()

    def _restart(self, old: Worker, grace: float) -> None:
        old.close()
        old.process.kill(grace=grace)
        old.process.trim_log()  # what it printed since the last health round: its log stays, for the reader
        if self._closing.is_set():
            return
        try:
            new = self._spawn(old.id, old.generation + 1)
        except Exception as exc:  # the health thread tries the slot again later
            self._failed(old, exc)
            return
        for counter in ("restarts", "recycles", "done", "errors", "cancelled", "items"):
            setattr(new, counter, getattr(old, counter))
        new.last_error = old.last_error
        with self._lock:
            if self._closing.is_set() or old not in self.workers:
                new.close()
                new.process.kill(grace=0)
                return
            self.workers[self.workers.index(old)] = new
        try:
            self._wait_ready(new, time.monotonic() + self.start_timeout)
        except Exception as exc:
            self._failed(new, exc)
            new.process.kill(grace=0)

    @staticmethod
    def _failed(worker: Worker, exc: Exception) -> None:
        """Mark a slot whose restart failed; ``ready_at`` times the health thread's next try."""
        worker.state = FAILED
        worker.last_error = f"{worker.id} could not be restarted: {exc}"
        worker.ready_at = time.monotonic()

    def _death_of(self, worker: Worker) -> Callable[[], DspexError | None]:
        """A check, for a failed call, of whether ``worker`` died (waiting briefly for its exit).

        A dead worker is taken out of routing at once, not at the next health check.
        """
        def check() -> DspexError | None:
            if self._closing.is_set():
                return PoolClosed("the pool was shut down during the call")
            if worker.state == READY:
                try:
                    worker.process.wait(2.0)
                except Exception:
                    return None
                self._replace(worker, f"died ({worker.process.ended()})")
            what = worker.last_error or f"{worker.id} (pid {worker.process.pid}) was replaced"
            return WorkerDied(f"worker {what} during the call; the pool is replacing it")
        return check

    def _gone(self, worker: Worker) -> DspexError:
        """The error for a call on a worker whose channel is already closed."""
        return self._death_of(worker)() or WorkerDied(f"worker {worker.id} is being replaced")
