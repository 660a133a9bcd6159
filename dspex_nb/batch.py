"""``BatchRun``: a batch fanned out over the whole pool that loses nothing.

The items are cut into shards; two feeder threads per worker slot take the next shard and run it
as a ``batch_inference`` stream (the worker runs ``concurrency`` items of it at a time and streams
one item chunk per item, waiting out LM rate limits). A worker holds up to two shards of a batch, which
share its ``concurrency`` (their ``group``): the next shard is there when the current one runs its last
items, so no slot waits for a round trip. Finished items go to the journal as they
arrive, and a batch that ran before takes them from there instead of calling the LM again.

When a worker dies, the items it had not finished go back in the queue one by one (so does an item that
ran for ``item_timeout`` seconds, and one whose LM call failed in a way that may pass,
``TRANSIENT_LM_ERRORS``), so an item that kills every worker it touches ("poison") only takes itself
down; after ``max_retries`` retries an item fails with the reason. Items of a cancelled shard that are
not to blame (not started when another item timed out) go back as a shard, without spending a try.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_nb import typed
from dspex_nb.errors import (
    ArgumentError,
    Cancelled,
    DspexError,
    ItemTimeout,
    MessageTooLarge,
    PoolClosed,
    WorkerDied,
    add_note,
)
from dspex_nb.journal import Journal, digest
from dspex_nb.pool.calls import (
    OWN_THREADS,
    WAIT_SLICE,
    Chunk,
    Handle,
    Run,
    interrupt_calls,
    loop_stopped_by_sigint,
)
from dspex_nb.pool.executor import Executor, Placement
from dspex_nb.words import count

SHARDS_PER_WORKER = 2  # shards of one batch a worker holds at once: the one running and the next
CLAIM_LEASE = 30.0  # seconds a run's claim on its items lasts without renewal (a dead kernel's lapse)
CLAIM_POLL = 0.5  # seconds between looks at the journal for items another run computes

# LM errors that may pass (a dropped connection, a 5xx, a timeout, a 429): after dspy.LM's own retries,
# the batch tries such an item again later, up to max_retries times.
TRANSIENT_LM_ERRORS = frozenset({"LMTransportError", "LMTimeoutError", "LMServerError", "LMRateLimitError"})


class BatchRun(Handle):
    """A running batch: ``result()``, ``cancel()``, ``snapshot()`` for progress, ``records`` as they arrive."""

    def __init__(self, pool: Executor, items: Sequence[Any], *, signature: str, module: str, settings: str,
                 concurrency: int, shard_size: int | None, max_retries: int, timeout: float | None,
                 item_timeout: float | None, max_errors: int | None = None,
                 on_item: Callable[[dict[str, Any]], Any] | None, journal: Journal | None,
                 program: dict[str, Any], shipped: str = "", resolver: typed.Resolver | None = None,
                 version: str = "", trace: bool = False,
                 on_history: Callable[[list[dict[str, Any]]], Any] | None = None) -> None:
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise ArgumentError("batch", "ArgumentError",
                                f"items must be a list of input dicts or strings, got {type(items).__name__}")
        super().__init__()
        self.pool = pool
        self.label = f"batch {module} {signature}".strip()
        self.caller = "pool.batch(...)"  # what the user called, as its notes name it (pool.map(...), %dspex batch)
        self.kept_in = "batch = pool.batch(...); batch.records"  # where its finished items are, "" where nowhere
        self.total = len(items)
        self.records: list[dict[str, Any] | None] = [None] * self.total
        self.arrived: list[int] = []  # indices of records in the order they arrived
        self.failures: list[int] = []  # those of the failed items, in the same order
        self._by_worker: dict[str, int] = {}  # worker -> items it computed (kept as they arrive: a view's refresh
        # must not go through a million records)
        self._owner = uuid.uuid4().hex
        self._args = {"signature": signature, "module": module, "concurrency": concurrency, "group": self._owner,
                      **({"settings": settings} if settings else {}),
                      **({"shipped": shipped} if shipped else {}),  # the items' classes and code, by value
                      **({"trace": True} if trace else {}),  # each item's predictor calls, for the kernel's trace
                      **({"history": True} if on_history else {})}  # its LM calls, for the kernel's DSPy history
        self.resolver = resolver or typed.Resolver()  # the classes of the program and of its items
        self._items = list(items)
        self._timeout = timeout
        self._item_timeout = item_timeout
        self._on_item = on_item
        self._calling_back = threading.local()  # .active in a thread while it runs on_item
        self._on_history = on_history  # given each item's LM calls' history entries as it arrives
        self.watched = on_item is not None
        self._max_retries = max_retries
        self._max_errors = max_errors  # failed items that stop the batch, as DSPy's ParallelExecutor; None: never
        self._tries = [0] * self.total
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # notified as each record arrives (and at the end)
        self._runs: dict[Run, _Shard] = {}  # running shards
        self._placed: dict[str, int] = {}  # worker -> shards of this batch it runs (at most SHARDS_PER_WORKER)
        self._alone: set[str] = set()  # workers running a retried item, which runs alone
        self._progress: dict[str, float] = {}  # worker -> when a shard of this batch was placed, or an item
        # of it started or came back there, last
        self.retries = self.from_journal = self.ok = self.failed = 0
        self.from_cache = 0  # items of this run whose every LM call DSPy answered from its cache
        self.tokens_in = self.tokens_out = 0  # LM tokens of the items computed in this run (not the journal's)
        self.cost: float | None = None  # their USD cost, where an LM reported one
        self._restarts_before = self._restarts()
        self.decode: Callable[[Any], Any] | None = None  # set by Pool.map: each item's output as the program's value
        self._stopping = False  # set by cancel() and by a fatal error: no further shard starts
        self._changed = threading.Event()  # the last item was recorded, or the batch is stopping

        self._journal = journal
        self._version = version  # of the defined module the batch is keyed by (wire.definition_version), or ""
        self.other_version = 0  # items a redefinition of the module computed while the batch ran: not journaled
        self.key = digest(program)
        self._item_keys = [digest(item) for item in self._items] if journal is not None else []  # journal rows
        self._shard_size = shard_size
        try:
            self._start(journal, f"{module} {signature}".strip())
        except BaseException:  # Ctrl-C meanwhile (a thread's start waits): the caller never gets the handle that
            self._cancel()  # would stop the batch, and the items it claimed would keep a rerun waiting for the lease
            if journal is not None:
                journal.release(self.key, self._owner)
            raise

    def _start(self, journal: Journal | None, title: str) -> None:
        """Take the items the journal has, claim the others, and start the feeders (and the claims' watcher)."""
        todo = list(range(self.total))
        if journal is not None:
            kept = journal.open_batch(self.key, title)
            for index in todo:
                if self._item_keys[index] in kept:
                    self._record(index, {"index": index, "ok": True, "result": kept[self._item_keys[index]],
                                         "journal": True})
            todo = [i for i in todo if self.records[i] is None]
        waiting: list[int] = []  # items another run of this batch (another kernel) is computing now
        if journal is not None and todo:
            mine = journal.claim(self.key, [self._item_keys[i] for i in todo], self._owner, CLAIM_LEASE)
            waiting = [i for i in todo if self._item_keys[i] not in mine]
            todo = [i for i in todo if self._item_keys[i] in mine]
        self._queue: deque[tuple[list[int], bool]] = deque((shard, False) for shard in self._shards(todo))
        self._feeding = min(SHARDS_PER_WORKER * self.pool.size, len(self._queue))  # feeders that may take a shard
        feeders = [threading.Thread(target=self._feed, name=f"dspex-batch-{i}", daemon=True)
                   for i in range(self._feeding)]
        if journal is not None and (todo or waiting):
            feeders.append(threading.Thread(target=self._watch, args=(waiting,), name="dspex-batch-claims",
                                            daemon=True))
        self._live = len(feeders)
        for feeder in feeders:
            feeder.start()
        if not feeders:
            self._finish()

    # -- feeders --------------------------------------------------------------------------
    def _feed(self) -> None:
        OWN_THREADS.handle = True
        idle = False  # found the queue empty: no longer counted in _feeding
        try:
            while not self._stopping:
                with self._lock:
                    if not self._queue:
                        idle = True
                        self._feeding -= 1
                        return
                    shard, alone = self._queue.popleft()
                self._run_shard(shard, alone)
        except Cancelled:
            pass
        except BaseException as exc:  # the pool closed under us, or a bad argument for every shard
            self._fail(exc)
        finally:
            with self._lock:
                self._feeding -= not idle
                self._live -= 1
                last = self._live == 0
            if last:
                self._finish()

    def _add_feeders(self) -> None:
        """Start feeders for shards queued after the first ones ended (up to SHARDS_PER_WORKER per worker, with
        those still running): items that another kernel's run had claimed and left run over the whole pool, as
        the batch's own do. Called by a thread of the batch that is live, so the batch cannot finish meanwhile."""
        with self._lock:
            more = max(0, min(SHARDS_PER_WORKER * self.pool.size, self._feeding + len(self._queue)) - self._feeding)
            self._feeding += more
            self._live += more
        for _ in range(more):
            threading.Thread(target=self._feed, name="dspex-batch-feeder", daemon=True).start()

    def _shards(self, indices: list[int]) -> list[list[int]]:
        """``indices`` cut into shards: ``shard_size`` items each, else about four shards per worker (at most 50
        items each)."""
        size = self._shard_size or max(1, min(50, math.ceil(len(indices) / (self.pool.size * 4))))
        return [indices[start:start + size] for start in range(0, len(indices), size)]

    def _watch(self, waiting: list[int]) -> None:
        """Keep this run's claims on its items alive, take the items another run computes from the journal
        as they arrive, and compute those whose claim lapsed (that run ended); ends with the batch."""
        assert self._journal is not None
        OWN_THREADS.handle = True
        renewed = time.monotonic()
        try:
            while not self._stopping and len(self.arrived) < self.total:  # not a scan of the records (each
                # round held the GIL for milliseconds in a batch of 100,000 items)
                self._changed.wait(CLAIM_POLL)
                self._changed.clear()
                if time.monotonic() - renewed > CLAIM_LEASE / 3:
                    pending = [self._item_keys[i] for i, r in enumerate(self.records) if r is None]
                    self._journal.claim(self.key, pending, self._owner, CLAIM_LEASE)
                    renewed = time.monotonic()
                if not waiting:
                    continue
                keys = {self._item_keys[i] for i in waiting}
                found = self._journal.results(self.key, keys)
                for index in [i for i in waiting if self._item_keys[i] in found]:
                    self._record(index, {"index": index, "ok": True, "result": found[self._item_keys[index]],
                                         "journal": True})
                waiting = [i for i in waiting if self.records[i] is None]
                mine = self._journal.claim(self.key, [self._item_keys[i] for i in waiting], self._owner, CLAIM_LEASE)
                lapsed = [i for i in waiting if self._item_keys[i] in mine]
                if lapsed:  # that run is gone: compute them here, over the whole pool
                    waiting = [i for i in waiting if self._item_keys[i] not in mine]
                    with self._lock:
                        self._queue.extend((shard, False) for shard in self._shards(lapsed))
                    self._add_feeders()
        except Cancelled:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._journal.release(self.key, self._owner)
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                self._finish()

    def _placement(self, placed: list[str], alone: bool) -> Placement:
        """Where a shard may run, for the pool's scheduler: on a worker with fewer than SHARDS_PER_WORKER
        shards of this batch, so the shards spread; a retried item runs ``alone``, on a worker with no other
        shard of this batch: an item that kills its worker ("poison") takes no other item down with it.
        ``placed`` receives the worker the scheduler gives it."""
        def accept(worker: str) -> bool:
            with self._lock:
                held = self._placed.get(worker, 0)
                return held == 0 if alone else held < SHARDS_PER_WORKER and worker not in self._alone

        def claim(worker: str) -> None:
            with self._lock:
                self._progress[worker] = time.monotonic()  # its item timeout counts from here at the latest
                self._placed[worker] = self._placed.get(worker, 0) + 1
                if alone:
                    self._alone.add(worker)
            placed.append(worker)

        return Placement(accept, claim, lambda: self._stopping)

    def _run_shard(self, shard: list[int], alone: bool = False) -> None:
        placed: list[str] = []
        try:
            self._run_shard_on(shard, self._placement(placed, alone), placed)
        finally:
            if placed:
                with self._lock:
                    self._placed[placed[0]] -= 1
                    if not self._placed[placed[0]]:
                        del self._placed[placed[0]]
                    if alone:
                        self._alone.discard(placed[0])
                self.pool.notify_change()  # a shard waiting for this worker may go

    def _run_shard_on(self, shard: list[int], placement: Placement, placed: list[str]) -> None:
        state = _Shard(set(shard))

        def on_chunk(chunk: Chunk) -> None:
            if chunk.kind == "started":  # the item took one of the worker's slots: its LM calls begin
                with self._lock:
                    state.started[shard[chunk["index"]]] = self._progress[placed[0]] = time.monotonic()
            elif chunk.kind == "item":
                index = shard[chunk["index"]]
                with self._lock:
                    state.pending.discard(index)
                    state.started.pop(index, None)
                    self._progress[placed[0]] = time.monotonic()
                if (not chunk["ok"] and chunk["error"]["type"] in TRANSIENT_LM_ERRORS
                        and self._tries[index] < self._max_retries):
                    self._requeue([index], None, retriable=True)  # dspy.LM's own retries did not get through
                    return
                self._record(index, dict(chunk.data, index=index, tries=self._tries[index] + 1))

        args = dict(self._args, batch_items=[self._items[i] for i in shard])
        try:
            run = self.pool.execute_stream("batch_inference", args, on_chunk=on_chunk, timeout=self._timeout,
                                           placement=placement)
        except MessageTooLarge as exc:  # its items together, or one of them alone: that one fails, not the batch
            self._too_large(shard, exc)
            return
        except (PoolClosed, ArgumentError, Cancelled):  # the same for every try: the batch fails
            raise
        except DspexError as exc:  # the worker went away before the shard reached it
            self._requeue(shard, WorkerDied(f"the shard could not be sent to its worker: {exc}"))
            return
        with self._lock:
            self._runs[run] = state
        if self._stopping:  # cancelled while the shard was being sent
            run.cancel()
        timed_out: list[int] | None = None  # the items that ran past item_timeout
        try:
            while not run.wait(1.0 if self._item_timeout is None else min(1.0, self._item_timeout)):
                if self._item_timeout is not None and (timed_out := self._timed_out(placed[0], state)) is not None:
                    run.cancel()
                    run.wait()
        finally:
            with self._lock:
                del self._runs[run]
        if not state.pending or (run.cancelled and timed_out is None):
            return
        if timed_out is not None:
            error: BaseException | None = ItemTimeout(
                f"the item ran past item_timeout={self._item_timeout} s on worker {run.worker}")
            self.pool.check_worker(run.worker, "an item timeout")  # a hung worker is replaced, not fed again
            suspects = timed_out
        else:  # the worker died: any item not back may have done it (a "started" chunk may die with it)
            error = run.error
            suspects = list(state.pending)
        if isinstance(error, ArgumentError):
            raise _named_as_input(error, shard)
        if isinstance(error, PoolClosed):
            raise error
        self._put_back(sorted(state.pending - set(suspects)))  # not to blame: back in the queue, no try spent
        self._requeue(sorted(suspects), error)

    def _too_large(self, shard: list[int], error: MessageTooLarge) -> None:
        """A shard whose arguments are over the message limit goes back as two halves (no try spent), each sent on
        its own; an item over the limit alone fails, named by its index, and the other items go on."""
        if len(shard) > 1:
            self._put_back(shard[:len(shard) // 2])
            self._put_back(shard[len(shard) // 2:])
            return
        self._tries[shard[0]] += 1
        self._record(shard[0], {"index": shard[0], "ok": False, "tries": self._tries[shard[0]],
                                "error": {"type": "MessageTooLarge", "message": f"items[{shard[0]}]: {error}"}})

    def _timed_out(self, worker: str, shard: _Shard) -> list[int] | None:
        """The items of ``shard`` that ran for ``item_timeout`` seconds (all its running ones, maybe none, when
        nothing of this batch started or came back on ``worker`` for that long: a hung worker); None if the
        shard goes on."""
        now = time.monotonic()
        limit = self._item_timeout
        assert limit is not None
        with self._lock:
            if now - self._progress.get(worker, 0.0) > limit:
                return list(shard.started)
            late = [index for index, since in shard.started.items() if now - since > limit]
            return late or None

    def _put_back(self, indices: list[int]) -> None:
        """Items a failed shard had not started: back in the queue as a shard of their own, no try spent."""
        if indices:
            with self._lock:
                self._queue.append((indices, False))

    def _requeue(self, indices: list[int], error: BaseException | None, retriable: bool = False) -> None:
        """Send the unfinished items of a failed shard back one by one, or fail those out of retries."""
        retriable = retriable or isinstance(error, (WorkerDied, ItemTimeout))
        again = []
        for index in indices:
            self._tries[index] += 1
            if retriable and self._tries[index] <= self._max_retries:
                again.append([index])
            else:
                reason = str(error) if error else "the shard ended without this item"
                if retriable:
                    reason += f" (tried {self._tries[index]} times)"
                self._record(index, {"index": index, "ok": False, "tries": self._tries[index],
                                     "error": {"type": type(error).__name__, "message": reason}})
        if again:
            with self._lock:
                self.retries += len(again)
                self._queue.extend((shard, True) for shard in again)

    def _record(self, index: int, record: dict[str, Any]) -> None:
        if self.records[index] is not None:  # it came back before (again under the lock below)
            return
        ours = record.get("version", self._version) == self._version  # not another definition's, under our key
        history = record["result"].pop(typed.HISTORY, None) if record["ok"] else None  # not kept in the journal
        if record["ok"] and ours and self._journal is not None and not record.get("journal"):  # first: an item
            self._journal.record(self.key, self._item_keys[index], record["result"])  # counted as finished is kept
        with self._lock:
            if self.records[index] is not None:
                return
            self.records[index] = record
            self.arrived.append(index)
            self._arrival.notify_all()
            last = len(self.arrived) == self.total
            if worker := record.get("worker"):
                self._by_worker[worker] = self._by_worker.get(worker, 0) + 1
            if record["ok"]:
                self.ok += 1
                self.other_version += not ours
            else:
                self.failed += 1
                self.failures.append(index)
            too_many = self._max_errors is not None and self.failed >= self._max_errors
            if record.get("journal"):
                self.from_journal += 1
            elif record["ok"]:
                tokens_in, tokens_out = typed.tokens(record["result"])
                self.tokens_in += tokens_in
                self.tokens_out += tokens_out
                self.cost = typed.add_cost(self.cost, typed.cost(record["result"]))
                hits, calls = typed.cached(record["result"])
                self.from_cache += hits == calls > 0
        if too_many and not record["ok"]:  # DSPy's error, as Module.batch raises it, with what it does not say
            self._fail(Exception("Execution cancelled due to errors or interruption: "
                                 f"{count(self.failed, 'item')} failed (max_errors={self._max_errors}), the last "
                                 f"with {error_line(record)}; for the "
                                 f"{self.ok} of {self.total} items that finished, {self._kept()}"))
        if last:  # the claims' watcher ends now, not at its next poll; it does nothing for each item: woken for
            self._changed.set()  # every one, it renewed every claim and re-read the journal per item (12x slower)
        if history and self._on_history is not None:  # as it comes, as Module.batch's threads record theirs
            try:
                self._on_history(history)
            except Exception as exc:  # an entry the kernel's DSPy cannot take: the batch stops, saying why
                self._fail(exc)
        if self._on_item is not None:
            self._calling_back.active = True
            try:
                self._on_item(record)
            except BaseException as exc:  # the caller's callback broke (SystemExit too): stop the batch, keep
                self._fail(exc)  # what arrived; result() raises it
            finally:
                self._calling_back.active = False

    def _fail(self, error: BaseException) -> None:
        """Stop the batch because of ``error`` (``result()`` raises it; finished records are kept)."""
        self._error = self._error or error
        self._stop_runs()

    def _stop_runs(self) -> None:
        self._stopping = True
        self._changed.set()
        with self._lock:
            runs = list(self._runs)
        for run in runs:  # all at once first: a callback that hangs in each is waited for once, not once per run
            run._cancel()
        for run in runs:
            run.cancel()

    def _finish(self) -> None:
        self.finished = time.monotonic()
        self._settle()
        with self._arrival:
            self._arrival.notify_all()

    def _restarts(self) -> int:
        return sum(row["restarts"] for row in self.pool.status())

    # -- caller side ----------------------------------------------------------------------
    def _cancel(self) -> None:
        """Stop the batch: running shards are cancelled on their workers, queued ones never start."""
        self._cancelled = True
        self._stop_runs()

    callback = "on_item"

    def _in_own_callback(self) -> bool:
        return getattr(self._calling_back, "active", False)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the batch ends; Ctrl-C (Stop) cancels it, and the KeyboardInterrupt says where its finished
        items are: ``pool.map(...).result()`` keeps no handle to them."""
        try:
            return super().wait(timeout)
        except KeyboardInterrupt as stop:
            add_note(stop, self._stopped_note())
            raise

    def _stopped_note(self) -> str:
        return f"the batch was stopped after {self.ok + self.failed} of {self.total} items; {self._kept()}"

    def _kept(self) -> str:
        """Where the finished items of a stopped batch are (``pool.map(...).result()`` and ``pool.evaluate`` keep
        no handle), in the words of what the user called."""
        if self._journal is not None and not self._journal.problem:
            return f"run the same {self.caller} again: they come from the journal, only the rest is computed"
        where = f"its handle keeps them ({self.kept_in}), or" if self.kept_in else f"{self.caller} keeps no handle:"
        return f"{where} run it with the journal on"

    def __iter__(self) -> Iterator[Any]:
        """``result()``'s outputs in input order, each as soon as it and those before it have arrived (as
        ipyparallel's ``AsyncMapResult``), not once the whole batch has: ``for p in pool.map(...)`` shows the batch's
        view meanwhile, whose Stop, as Ctrl-C in the wait or in the loop's body, cancels it. Where the batch stops
        short (an error, max_errors, a cancel), it raises as ``result()`` does, after the outputs before."""
        self._view_while_waiting(None, block=False)  # the loop's body runs while the view goes on
        try:
            yield from loop_stopped_by_sigint(self, self._outputs())  # also where Ctrl-C lands in the loop's body
            self.wait()  # the last item has arrived: the batch ends at once, and says whether it stopped short
        except KeyboardInterrupt as stop:
            add_note(stop, self._stopped_note())
            raise
        finally:
            if self._done.is_set():  # not where the loop was left early (break): the batch goes on, and its view
                self._final_view()
        self._raise_if_stopped()

    def _outputs(self) -> Iterator[Any]:
        """The outputs in input order, each once it and those before it have arrived, until one never does."""
        for index in range(self.total):
            record = self._arrived_at(index)
            if record is None:
                return
            yield self._output(record)

    def _arrived_at(self, index: int) -> dict[str, Any] | None:
        """Item ``index``'s record once it has arrived, or None where the batch ended without it."""
        with interrupt_calls(self.cancel), self._arrival:
            while self.records[index] is None and not self._done.is_set():
                self._not_in_own_callback("an iteration")
                self._arrival.wait(WAIT_SLICE)
            return self.records[index]

    def result(self, timeout: float | None = None) -> list[Any]:
        """Outputs in input order: each item's output fields, or {"error": "Type: message"} if it failed
        (from ``Pool.map``: what the program returned, or None if it failed)."""
        self._view_while_waiting(timeout)
        if not self.wait(timeout):
            raise TimeoutError(f"the batch is still running after {timeout} s (it goes on)")
        self._raise_if_stopped()
        return [self._output(r) for r in self.records]  # type: ignore[arg-type]

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise Cancelled(f"the batch was cancelled after {self.ok + self.failed} of {self.total} items; "
                            f"{self._kept()}")

    def _output(self, record: dict[str, Any]) -> Any:
        return self._decoded(record) if self.decode is not None else outputs(record)

    def _decoded(self, record: dict[str, Any] | None) -> Any:
        """An item's output as the program's own value; None if the item failed, or if its output cannot be
        rebuilt here: its record then says why, as for an item that failed, and the other items keep theirs."""
        if not (record and record["ok"]):
            return None
        assert self.decode is not None
        try:
            return self.decode(record["result"])
        except Exception as exc:  # NotPortable, or a damaged journal row of another shape
            with self._lock:
                record.update(ok=False, error={"type": "NotPortable", "message": str(exc) if isinstance(
                    exc, typed.NotPortable) else f"its result cannot be read: {type(exc).__name__}: {exc}"})
                self.ok -= 1
                self.failed += 1
                self.failures.append(record["index"])
            return None

    @property
    def warning(self) -> str | None:
        """What went wrong beside the items (the journal could not be written, the module was redefined while the
        batch ran), or None."""
        problems = [self._journal.problem] if self._journal is not None and self._journal.problem else []
        if self.other_version:
            problems.append(f"{self._args['module']} was redefined while the batch ran: "
                            f"{count(self.other_version, 'item')} ran the new definition (their "
                            "\"version\" in batch.records), not kept in the journal under the old one")
        return "; ".join(problems) or None

    def snapshot(self) -> dict[str, Any]:
        """Counts and rates for a progress view (one model, several renderers)."""
        replaced = self._restarts() - self._restarts_before
        with self._lock:
            finished = self.ok + self.failed
            active: dict[str, int] = {}
            for run, shard in self._runs.items():
                active[run.worker] = active.get(run.worker, 0) + len(shard.started)
            by_worker = dict(self._by_worker)
            running = sum(active.values())
            elapsed = self.elapsed
            computed = finished - self.from_journal
            rate = computed / elapsed if elapsed > 0 else 0.0
            return {"total": self.total, "ok": self.ok, "failed": self.failed, "running": running,
                    "queued": self.total - finished - running, "retries": self.retries,
                    "from_journal": self.from_journal, "from_cache": self.from_cache, "replaced": replaced,
                    "elapsed": elapsed, "rate": rate,
                    "eta": (self.total - finished) / rate if rate and not self.done else 0.0,
                    "status": self.status, "by_worker": by_worker, "active": active,
                    "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "cost": self.cost,
                    "warning": self.warning}

    def __repr__(self) -> str:
        return f"<BatchRun {self.ok + self.failed}/{self.total} ({self.failed} failed): {self.status}>"


_SHARD_ITEM = re.compile(r"\bbatch_items\[(\d+)\]")  # how a worker names an item: by its place in the shard


def _named_as_input(error: ArgumentError, shard: list[int]) -> ArgumentError:
    """A shard's ArgumentError with each item it names called as the caller knows it, by its index in the batch's
    input (``items[7]``), not by its place in the shard the worker got (``batch_items[0]``, the same for every
    shard's first item)."""
    def as_input(match: re.Match[str]) -> str:
        place = int(match.group(1))
        return f"items[{shard[place]}]" if place < len(shard) else match.group(0)

    return ArgumentError(error.tool, error.type, _SHARD_ITEM.sub(as_input, error.message), error.remote_traceback,
                         error.worker)


@dataclass
class _Shard:
    """A shard as it runs: its items not yet back, and those running on the worker, since when."""

    pending: set[int]
    started: dict[int, float] = field(default_factory=dict)


def outputs(record: dict[str, Any]) -> dict[str, Any]:
    """A tool-level item's output fields (its LM usage, cost and further completions stay in its record), or its
    error."""
    if record["ok"]:
        result = record["result"]
        if isinstance(result, dict):
            return {k: v for k, v in result.items() if k not in typed.RESERVED}
        return result
    return {"error": error_line(record)}


def error_line(record: dict[str, Any]) -> str:
    """The error of a failed item record, as one line."""
    return f"{record['error']['type']}: {record['error']['message']}"
