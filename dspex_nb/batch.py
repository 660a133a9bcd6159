"""``BatchRun``: a batch fanned out over the whole pool, results kept in input order.

The items are cut into shards; one feeder thread per worker slot takes the next shard and runs it
as a ``batch_inference`` stream (the worker runs ``concurrency`` items of it at a time and streams
one item chunk per item). When a worker dies mid-shard, the items it had not finished go back in
the queue, up to ``max_retries`` times each; then they fail with the reason.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dspex_nb.errors import ArgumentError, Cancelled, PoolClosed, WorkerDied
from dspex_nb.pool.calls import Chunk, Run, wait_interruptibly

if TYPE_CHECKING:
    from dspex_nb.pool.pool import Pool


class BatchRun:
    """A running batch: ``result()``, ``cancel()``, ``snapshot()`` for progress, ``items`` as they arrive."""

    def __init__(self, pool: Pool, items: Sequence[Any], *, signature: str = "", module: str = "predict",
                 concurrency: int = 4, shard_size: int | None = None, max_retries: int = 2,
                 timeout: float | None = None, on_item: Callable[[dict[str, Any]], Any] | None = None) -> None:
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise ArgumentError("batch", "ArgumentError",
                                f"items must be a list of input dicts or strings, got {type(items).__name__}")
        self.pool = pool
        self.total = len(items)
        self.records: list[dict[str, Any] | None] = [None] * self.total
        self.arrived: list[int] = []  # indices of records in the order they arrived
        self._args = {"signature": signature, "module": module, "concurrency": concurrency}
        self._items = list(items)
        self._timeout = timeout
        self._on_item = on_item
        self._max_retries = max_retries
        self._tries = [0] * self.total
        size = shard_size or max(1, min(50, math.ceil(self.total / (pool.size * 4))))
        self._queue: deque[list[int]] = deque(
            list(range(start, min(start + size, self.total))) for start in range(0, self.total, size))
        self._lock = threading.Lock()
        self._runs: dict[Run, set[int]] = {}  # running shard -> its items not yet back
        self._done_by: dict[str, int] = {}
        self.retries = 0
        self.ok = self.failed = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self._cancelled = False
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._feeders = [threading.Thread(target=self._feed, name=f"dspex-batch-{i}", daemon=True)
                         for i in range(min(pool.size, len(self._queue)))]
        self._live = len(self._feeders)
        for feeder in self._feeders:
            feeder.start()
        if not self._feeders:
            self._finish()

    # -- feeders --------------------------------------------------------------------------
    def _feed(self) -> None:
        try:
            while not self._cancelled:
                with self._lock:
                    if not self._queue:
                        return
                    shard = self._queue.popleft()
                self._run_shard(shard)
        except BaseException as exc:  # the pool closed under us, or a bad argument for every shard
            self._error = self._error or exc
            self.cancel()
        finally:
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                self._finish()

    def _run_shard(self, shard: list[int]) -> None:
        pending = set(shard)

        def on_chunk(chunk: Chunk) -> None:
            if chunk.kind == "item":
                index = shard[chunk["index"]]
                with self._lock:
                    pending.discard(index)
                self._record(index, dict(chunk.data, index=index, tries=self._tries[index] + 1))

        args = dict(self._args, batch_items=[self._items[i] for i in shard])
        run = self.pool.execute_stream("batch_inference", args, on_chunk=on_chunk, timeout=self._timeout)
        with self._lock:
            self._runs[run] = pending
        try:
            run.wait()
        finally:
            with self._lock:
                del self._runs[run]
        if run.cancelled or not pending:
            return
        error = run.error
        if isinstance(error, (ArgumentError, PoolClosed)):
            raise error
        self._requeue(sorted(pending), error)

    def _requeue(self, indices: list[int], error: BaseException | None) -> None:
        """Send unfinished items of a failed shard back to the queue, or fail them when out of retries."""
        again = []
        for index in indices:
            self._tries[index] += 1
            if isinstance(error, WorkerDied) and self._tries[index] <= self._max_retries:
                again.append(index)
            else:
                reason = f"{type(error).__name__}: {error}" if error else "the shard ended without this item"
                self._record(index, {"index": index, "ok": False, "tries": self._tries[index],
                                     "error": {"type": type(error).__name__, "message": reason}})
        if again:
            with self._lock:
                self.retries += len(again)
                self._queue.append(again)

    def _record(self, index: int, record: dict[str, Any]) -> None:
        with self._lock:
            if self.records[index] is not None:
                return
            self.records[index] = record
            self.arrived.append(index)
            if record["ok"]:
                self.ok += 1
            else:
                self.failed += 1
            worker = record.get("worker")
            if worker:
                self._done_by[worker] = self._done_by.get(worker, 0) + 1
        if self._on_item is not None:
            self._on_item(record)

    def _finish(self) -> None:
        self.finished = time.monotonic()
        self._done.set()

    # -- caller side ----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def status(self) -> str:
        if not self.done:
            return "running"
        if self._cancelled:
            return "cancelled"
        return "failed" if self._error is not None else "done"

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def cancel(self) -> None:
        """Stop the batch: running shards are cancelled on their workers, queued ones never start."""
        self._cancelled = True
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            run.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return wait_interruptibly(self._done, timeout, self.cancel)

    def result(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Outputs in input order: each item's output fields, or {"error": "Type: message"} if it failed."""
        if not self.wait(timeout):
            raise TimeoutError(f"the batch is still running after {timeout} s (it goes on)")
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise Cancelled(f"the batch was cancelled after {self.ok + self.failed} of {self.total} items "
                            "(batch.records keeps them)")
        return [outputs(r) for r in self.records]  # type: ignore[arg-type]

    def snapshot(self) -> dict[str, Any]:
        """Counts and rates for a progress view (one model, several renderers)."""
        with self._lock:
            finished = self.ok + self.failed
            active: dict[str, int] = {}
            for run, pending in self._runs.items():
                active[run.worker] = active.get(run.worker, 0) + len(pending)
            running = sum(active.values())
            elapsed = self.elapsed
            rate = finished / elapsed if elapsed > 0 else 0.0
            return {"total": self.total, "ok": self.ok, "failed": self.failed, "running": running,
                    "queued": self.total - finished - running, "retries": self.retries,
                    "elapsed": elapsed, "rate": rate,
                    "eta": (self.total - finished) / rate if rate and not self.done else 0.0,
                    "status": self.status, "by_worker": dict(self._done_by), "active": active}

    def __repr__(self) -> str:
        return f"<BatchRun {self.ok + self.failed}/{self.total} ({self.failed} failed): {self.status}>"


def outputs(record: dict[str, Any]) -> dict[str, Any]:
    if record["ok"]:
        return record["result"]
    return {"error": error_line(record)}


def error_line(record: dict[str, Any]) -> str:
    """The error of a failed item record, as one line."""
    return f"{record['error']['type']}: {record['error']['message']}"


