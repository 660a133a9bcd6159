"""``Pool``: N supervised worker processes behind one API.

Start them concurrently, wait until each answers a ping, route each call to the least busy
ready worker (or to a session's worker), check health every ``health_interval`` seconds,
and replace a worker that died or stopped answering; calls in flight on it fail with
``WorkerDied``. ``shutdown()`` (also at interpreter exit) ends every process it started.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from dspex_nb import redact, typed
from dspex_nb.errors import (
    Cancelled,
    DspexError,
    PoolClosed,
    PoolSaturated,
    QueueTimeout,
    UnknownTool,
    WorkerBusy,
    WorkerDied,
    WorkerStartError,
    add_note,
    program_errors_raised_here,
)
from dspex_nb.pool import environment, local, settings
from dspex_nb.pool.calls import KEEP_CHUNKS, Chunk, Run, encode_args
from dspex_nb.pool.connection import Backend, ConnectionClosed, WorkerSpec
from dspex_nb.pool.executor import Placement
from dspex_nb.pool.local import DEFAULT_START
from dspex_nb.pool.process import out_of_files
from dspex_nb.pool.session import Session
from dspex_nb.pool.supervision import CANCEL_GRACE, Supervision
from dspex_nb.pool.telemetry import CallRecord, Telemetry
from dspex_nb.pool.worker import FAILED, READY, STOPPED, Worker
from dspex_nb.schema import validate
from dspex_nb.words import count

AFFINITIES = ("hint", "strict_queue", "strict_fail_fast")
START_METHODS = ("spawn", "template")  # a new interpreter per worker, or forks of one that imported dspy
BACKENDS = ("local", "ray")
# processes a local pool may start: each is an interpreter with DSPy (tens of MB), and more than a few per core
# only share the cores (a worker's ``concurrency`` is what runs many LM calls at once); workers=10**6 forked
# until the machine ran out of processes or memory
MAX_LOCAL_WORKERS = max(64, 8 * (os.cpu_count() or 1))
MIN_HEALTH_INTERVAL = 0.05  # seconds between health rounds: health_interval=1e-6 kept a core of the kernel busy
MIN_PING_TIMEOUT = 0.1  # seconds a ping may take: ping_timeout=1e-4 took every worker for a hung one each second
# and replaced it, failing the calls in flight there with WorkerDied, without end


def _backends_own(backend: str, python: str | None, address: str | None, resources: dict[str, float] | None) -> None:
    """Refuse a setting the chosen backend would not use, rather than run without it: ``python`` is the local
    workers' interpreter (an actor runs its node's), ``address`` and ``resources`` place Ray actors."""
    if backend == "ray" and python is not None:
        raise settings.SettingError(
            f"Pool(python={python!r}) chooses the local workers' Python; a Ray actor runs its node's Python (the one "
            "`ray start` runs there): install ray (pip install 'ray>=2.40') in it, or leave backend='ray' out")
    if backend == "local" and (address is not None or resources):
        given = ", ".join(name for name, value in (("address", address), ("resources", resources)) if value)
        raise settings.SettingError(f"Pool({given}=...) places Ray actors: pass backend='ray' with it")


class WorkerPool(Supervision):
    """The executor: N supervised workers (on a backend) behind calls to their tools. ``dspex_nb.Pool`` adds
    DSPy programs, batches and the journal on top of it."""

    def __init__(self, workers: int = 2, *, lm: str = "demo", lm_kwargs: dict[str, Any] | None = None,
                 python: str | None = None, max_message_mb: int = 64, health_interval: float = 0.5,
                 ping_timeout: float = 5.0, start_timeout: float = 60.0, env: dict[str, str] | None = None,
                 concurrency: int = 4, rate_limit: float | None = None,
                 otel: bool = False, max_in_flight: int = 8,
                 max_queue: int = 1000, queue_timeout: float = 60.0, session_ttl: float = 3600.0,
                 max_requests: int | None = None, ttl: float | None = None,
                 max_memory_mb: float | None = None, cancel_grace: float | None = CANCEL_GRACE,
                 start: str = DEFAULT_START, backend: str = "local",
                 address: str | None = None, resources: dict[str, float] | None = None) -> None:
        check = settings.Checker("Pool")
        check.integer("workers", workers, 1, MAX_LOCAL_WORKERS if backend == "local" else None)
        check.integer("max_message_mb", max_message_mb, 1, 2047)  # gRPC's limit is a signed 32-bit byte count
        check.integer("concurrency", concurrency, 1, settings.MAX_CONCURRENCY)
        check.integer("max_in_flight", max_in_flight, 1)
        check.integer("max_queue", max_queue, 0)
        check.integer("max_requests", max_requests, 1, optional=True)
        for name, value in (("start_timeout", start_timeout), ("queue_timeout", queue_timeout),
                            ("session_ttl", session_ttl)):
            check.seconds(name, value)
        check.seconds("health_interval", health_interval, minimum=MIN_HEALTH_INTERVAL)
        check.seconds("ping_timeout", ping_timeout, minimum=MIN_PING_TIMEOUT)
        check.seconds("ttl", ttl, optional=True)
        check.seconds("cancel_grace", cancel_grace, optional=True)
        check.positive("rate_limit", rate_limit, "LM requests per minute")
        check.positive("max_memory_mb", max_memory_mb, "MB")
        check.choice("start", start, START_METHODS)
        check.choice("backend", backend, BACKENDS)
        check.mapping("resources", resources)
        lm_kwargs = check.lm_kwargs(lm_kwargs, "lm_kwargs", lm)  # its numpy numbers as Python's
        check.mapping("env", env, values=str)
        check.instance("python", python, (str, type(None)), "None or the path of a Python interpreter")
        _backends_own(backend, python, address, resources)
        if not isinstance(lm, str) or not lm:
            raise ValueError(f"Pool(lm=...) must be 'demo' or a dspy.LM model string, got {redact.shown(lm)}")
        self.size = workers
        self.lm = lm
        self.lm_kwargs = lm_kwargs
        redact.register(self.lm_kwargs)  # an api_key given here is masked wherever it shows up
        self.max_message_bytes = max_message_mb * 2**20
        self.health_interval = health_interval
        self.ping_timeout = ping_timeout
        self.start_timeout = start_timeout
        self.env = env
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self.telemetry = Telemetry(otel)
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.session_ttl = session_ttl
        self.max_requests = max_requests
        self.ttl = ttl
        self.max_memory_mb = max_memory_mb
        self.cancel_grace = cancel_grace
        self.backend: Backend
        if backend == "ray":
            from dspex_nb.pool.ray_backend import RayBackend  # the ray extra, imported only when asked for

            self.backend = RayBackend(address, resources, max_in_flight)
        else:
            self.backend = local.LocalBackend(python, start, env)  # start() may swap in a warmed one
        self.run_id = self.backend.run_id
        self._queued = 0
        self._restarting: list[threading.Thread] = []  # restart threads, joined by shutdown()
        self.cleaned: list[dict[str, Any]] = []  # what stale cleanup did when this pool started
        self.stopped_note = ""  # why it is not running, where that is not the user's own shutdown() (the magics')
        self.schemas: dict[str, dict[str, Any]] = {}  # tool name -> argument schema, from Describe at start
        self.definitions: dict[str, dict[str, Any]] = {}  # name -> source, kind, inputs; replayed on new workers
        self.workers: list[Worker] = []
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self._rr = itertools.count()
        self._owner = os.getpid()  # the process whose workers these are (a forked child holds a copy)
        self.env_changes = environment.Changes(self.backend.follows, env or {})  # made again at start()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> WorkerPool:
        """Start every worker concurrently and wait until all answer a ping (or raise why not)."""
        if self.workers:
            return self
        self._owner = os.getpid()
        self._closing.clear()
        self.stopped_note = ""
        self.backend = self.backend.fresh()
        self.run_id = self.backend.run_id
        try:
            self.cleaned = self.backend.open()
            self.env_changes = environment.Changes(self.backend.follows, self.env or {})  # before any worker starts
            for i in range(self.size):  # each kept as it starts: a failure of the next stops those started
                self.workers.append(self._spawn(f"w{i}", 0))
            deadline = time.monotonic() + self.start_timeout
            for worker in self.workers:
                self._wait_ready(worker, deadline)
            first = self.workers[0]
            described = first.conn.describe(self.start_timeout, self._death_of(first))
            self.schemas = {t["name"]: t for t in described["tools"]}
        except BaseException as exc:
            out = out_of_files(exc, self.size)  # before the shutdown frees what this start held
            self.shutdown()
            if out is not None:
                raise out from exc
            raise
        _live_pools.add(self)
        self._monitor = threading.Thread(target=self._watch, name="dspex-health", daemon=True)
        self._monitor.start()
        return self

    def shutdown(self) -> None:
        """Stop every worker process and remove the socket directory. Idempotent.

        In a child forked from the process that started the pool (``os.fork``, multiprocessing's "fork"), the
        pool is a copy: there ``shutdown()`` (also the child's exit, and ``with Pool()`` left in the child) only
        forgets it, and the parent's workers, directory and template go on serving the parent.
        """
        if self.forked:
            self._forget()
            return
        self._closing.set()
        for thread in [self._monitor, *self._restarting]:
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        self._monitor, self._restarting = None, []
        with self._lock:
            workers, self.workers = self.workers, []
            self._lock.notify_all()
        for worker in workers:
            worker.state = STOPPED
            worker.close()
        try:
            for worker in workers:  # all end at once: one after another, 32 workers took 7 s
                worker.process.terminate()
            for worker in workers:
                worker.process.kill()  # up to its grace period for it to end, then SIGKILL
        except BaseException:  # Ctrl-C meanwhile: the others are out of self.workers, so no later call ends them
            for worker in workers:
                if worker.process.exit_code() is None:  # not one that ended (its pid may be another's by now)
                    worker.process.signal(signal.SIGKILL)
            raise
        self.backend.close()
        _live_pools.discard(self)

    @property
    def forked(self) -> bool:
        """True in a child forked from the process that started this pool: its workers are the parent's."""
        return os.getpid() != self._owner

    def _refuse_if_forked(self) -> None:
        """PoolClosed in a child forked from the process that started the pool (checked before any lock is
        taken: one that a thread of the parent held at the fork stays held here, and a call would wait forever)."""
        if self.forked:
            raise PoolClosed(f"this pool belongs to process {self._owner}, and this is a child forked from it "
                             f"(pid {os.getpid()}): gRPC connections do not survive a fork; start a Pool of its "
                             "own here")

    def _forget(self) -> None:
        """Drop a forked child's copy of the pool without touching the parent's processes or files. No lock is
        taken: a thread of the parent may have held one at the fork, and that thread does not exist here."""
        self._closing = threading.Event()
        self._closing.set()
        self.workers, self._monitor, self._restarting = [], None, []
        _live_pools.discard(self)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        """Started and not stopped (a forked child's copy of a pool does not run there)."""
        return bool(self.workers) and not self._closing.is_set() and not self.forked

    def _spawn(self, worker_id: str, generation: int) -> Worker:
        spec = WorkerSpec(self.run_id, self.lm, self.lm_kwargs, self.max_message_bytes, self.session_ttl,
                          self.rate_limit / self.size if self.rate_limit else None,  # the pool's limit, split evenly
                          self.start_timeout, dict(self.env or {}))
        return Worker(worker_id, self.backend.spawn(worker_id, generation, spec), generation)

    def _wait_ready(self, worker: Worker, deadline: float) -> None:
        while not worker.conn.ready():
            worker.process.trim_log()  # before the health thread runs: Pool(python=...) of a program that floods
            if worker.process.exit_code() is not None:
                raise worker.process.start_failure(worker.id)
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"worker {worker.id} (pid {worker.process.pid}) was not ready within "
                    f"{self.start_timeout} s (Pool(start_timeout=...)); its output:\n{worker.process.log_tail()}")
            time.sleep(0.01)
        for definition in list(self.definitions.values()):
            self._define_on(worker, definition)
        with self._lock:
            worker.state, worker.ready_at, worker.failed_pings = READY, time.monotonic(), 0
            self._lock.notify_all()

    def _define_on(self, worker: Worker, definition: dict[str, Any]) -> dict[str, Any]:
        tool = definition["tool"]
        return worker.conn.execute(tool, self._args_json(tool, definition["args"], None), "", self.start_timeout, 0.0,
                                   self._death_of(worker))

    # -- routing ------------------------------------------------------------------------
    def _choose(self, worker_id: str | None, count: bool, affinity: str = "strict_queue",
                timeout: float | None = None, placement: Placement | None = None) -> Worker:
        """The least busy ready worker with room (or the slot ``worker_id``, per ``affinity``).

        With ``count`` the call takes one of the worker's ``max_in_flight`` places until ``_release``;
        while no worker has room it waits in the pool's queue (at most ``max_queue`` callers, each for
        at most ``queue_timeout`` seconds, or the call's ``timeout`` if shorter). Without ``count``
        (describe, sessions) room does not matter. With a ``placement`` (a batch's shard) only the workers it
        accepts are candidates, the one chosen is claimed for it under the lock, and it waits until
        ``placement.stopped()`` rather than in the queue.
        """
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        self._refuse_if_forked()  # before the lock: a thread of the parent may have held it at the fork
        wait = self.queue_timeout if timeout is None else min(self.queue_timeout, timeout)
        deadline = time.monotonic() + wait
        queued = False
        with self._lock:
            try:
                while (worker := self._pick(worker_id, count, affinity, placement)) is None:
                    if placement is not None:
                        if placement.stopped():
                            raise Cancelled("the call was cancelled while it waited for a worker")
                        self._lock.wait(0.5)
                        continue
                    if not queued:
                        if self._queued >= self.max_queue:
                            raise PoolSaturated(
                                f"the pool's queue is full: {self._queued} calls wait for a worker "
                                f"(max_queue={self.max_queue}); raise Pool(max_queue=...) or add workers")
                        queued = True
                        self._queued += 1
                    if time.monotonic() > deadline:
                        raise QueueTimeout(
                            f"no worker had room within {wait} s (queue_timeout={self.queue_timeout}, the call's "
                            f"timeout={timeout}; {self._queued} calls "
                            f"waiting, max_in_flight={self.max_in_flight}); states: {self._states()}")
                    self._lock.wait(0.1)
                worker.in_flight += count
                worker.taken += count
                if placement is not None:
                    placement.claim(worker.id)
                return worker
            finally:
                if queued:
                    self._queued -= 1

    def _pick(self, worker_id: str | None, count: bool, affinity: str,
              placement: Placement | None = None) -> Worker | None:
        """The worker for a call now, or None when it must wait (call with the lock held, after
        ``_refuse_if_forked``)."""
        if not self.workers or self._closing.is_set():
            raise PoolClosed(self.stopped_note or "the pool is not running: start it with Pool.start() or "
                             "`with Pool(...)`")
        if worker_id is not None and worker_id not in {w.id for w in self.workers}:
            raise ValueError(f"no worker {worker_id!r} in this pool: {[w.id for w in self.workers]}")
        free = [w for w in self.workers if w.state == READY and not (count and (
            w.in_flight >= self.max_in_flight or self.max_requests is not None and w.taken >= self.max_requests))]
        if worker_id is not None:
            mine = [w for w in free if w.id == worker_id]
            if not mine and affinity == "strict_fail_fast":
                raise WorkerBusy(f"worker {worker_id} has no room or is not ready (affinity='strict_fail_fast'); "
                                 f"states: {self._states()}")
            if mine or affinity == "strict_queue":
                free = mine
        if placement is not None:
            free = [w for w in free if placement.accept(w.id)]
        if not free:
            return None
        tie = next(self._rr)
        if len(free) == 1:
            return free[0]
        return min(free, key=lambda w: (w.in_flight, (self.workers.index(w) - tie) % self.size))

    def _states(self) -> dict[str, str]:
        return {w.id: f"{w.state}, {w.in_flight} in flight" for w in self.workers}

    def notify_change(self) -> None:
        """Something a ``Placement`` accepts may have changed: the scheduler looks again."""
        with self._lock:
            self._lock.notify_all()

    @property
    def queue_length(self) -> int:
        """Calls waiting for a worker with room."""
        return self._queued

    def _release(self, worker: Worker, outcome: str, items: int = 0) -> None:
        """A call on ``worker`` ended: "done", "failed" or "cancelled" (by its caller: not an error)."""
        with self._lock:
            worker.in_flight -= 1
            worker.served += 1
            worker.done += outcome == "done"
            worker.errors += outcome == "failed"
            worker.cancelled += outcome == "cancelled"
            worker.items += items
            self._lock.notify_all()

    # -- calls --------------------------------------------------------------------------
    def _args_json(self, tool: str, args: dict[str, Any] | None, timeout: float | None) -> bytes:
        """A call's arguments as JSON, checked against the tool's schema (and its timeout) before anything is
        sent."""
        if timeout is not None:
            settings.Checker(tool).seconds("timeout", timeout)
        if self.schemas and tool not in self.schemas:
            raise UnknownTool(tool, "UnknownTool",
                              f"no tool named {tool!r}; available tools: {', '.join(sorted(self.schemas))}")
        if tool in self.schemas:
            validate(self.schemas[tool], {} if args is None else args)
        return encode_args(tool, args, self.max_message_bytes)

    @program_errors_raised_here
    def execute(self, tool: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
                worker: str | None = None, session_id: str = "", affinity: str = "strict_queue") -> Any:
        """Run ``tool`` on a worker and return its result; Ctrl-C cancels the remote work."""
        args_json = self._args_json(tool, args, timeout)
        queued, wall = time.monotonic(), time.time_ns()
        chosen = self._choose(worker, count=True, affinity=affinity, timeout=timeout)
        sent = time.monotonic()
        result, outcome = None, "failed"
        try:
            try:  # Ctrl-C during the call cancels the remote work
                result = chosen.conn.execute(tool, args_json, session_id, timeout, time.monotonic() - queued,
                                             self._death_of(chosen))
            except ConnectionClosed:  # the worker is being replaced, or the pool shut down
                raise self._gone(chosen) from None
            outcome = "done"
            return result
        except KeyboardInterrupt as stop:  # from inside gRPC's blocking call, whose frames tell nothing
            outcome = "cancelled"
            add_note(stop, f"interrupted; '{tool}' on worker {chosen.id} was cancelled")
            raise stop.with_traceback(None) from None
        finally:
            self._release(chosen, outcome)
            ok = outcome == "done"
            tokens_in, tokens_out = typed.tokens(result) if ok else (0, 0)
            self.telemetry.add(CallRecord(tool, chosen.id, ok, sent - queued, time.monotonic() - sent,
                                          started_ns=wall, tokens_in=tokens_in, tokens_out=tokens_out,
                                          cost=typed.cost(result), cancelled=outcome == "cancelled"))

    def execute_stream(self, tool: str, args: dict[str, Any] | None = None, *,
                       on_chunk: Callable[[Chunk], Any] | None = None, timeout: float | None = None,
                       worker: str | None = None, session_id: str = "", affinity: str = "strict_queue",
                       keep_chunks: int | None = KEEP_CHUNKS, placement: Placement | None = None) -> Run:
        """Start ``tool`` as a stream and return its ``Run`` at once; chunks arrive in order. The Run keeps
        the latest ``keep_chunks`` chunks (None: every one)."""
        settings.check_stream_options(tool, on_chunk, keep_chunks)
        args_json = self._args_json(tool, args, timeout)
        queued, wall = time.monotonic(), time.time_ns()
        chosen = self._choose(worker, count=True, affinity=affinity, timeout=timeout, placement=placement)
        try:
            source = chosen.conn.stream(tool, args_json, session_id, timeout, time.monotonic() - queued,
                                        self._death_of(chosen))
        except ConnectionClosed:  # the worker is being replaced, or the pool shut down
            self._release(chosen, "failed")
            raise self._gone(chosen) from None
        except BaseException:
            self._release(chosen, "failed")
            raise

        def done(run: Run) -> None:
            ok = run.status == "done"
            self._release(chosen, run.status, run.items)
            first = None if run.first_chunk_at is None else run.first_chunk_at - run.started
            self.telemetry.add(CallRecord(tool, chosen.id, ok, run.started - queued, run.elapsed, first,
                                          run.received, wall, *run.tokens, run.cost, run.status == "cancelled"))

        return Run(tool, chosen.id, source, on_chunk=on_chunk, on_done=done, keep_chunks=keep_chunks)

    def broadcast(self, name: str, definition: dict[str, Any], **keep: Any) -> dict[str, Any]:
        """Call ``definition["tool"]`` with ``definition["args"]`` on every worker, now and on any started later
        (kept as ``definitions[name]``, with ``keep``); undone everywhere if one fails. Returns the tool's
        answer."""
        previous = self.definitions.get(name)
        self.definitions[name] = definition  # first: a worker starting now replays it
        info: dict[str, Any] = {}
        done: list[str] = []
        try:
            for worker in list(self.workers):
                info = self._define_in(worker.id, f"the definition of '{name}'", definition["tool"], definition["args"])
                done.append(worker.id)
        except BaseException:
            if previous is None:
                del self.definitions[name]
                self._try_on(done, "undefine", {"name": name})  # the workers agree again: all old, or none
            else:
                self.definitions[name] = previous
                self._try_on(done, previous["tool"], previous["args"])
            raise
        self.definitions[name] = {**definition, **info, **keep}
        return info

    def _define_in(self, slot: str, what: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """Call ``tool`` (a definition, the LM: what every worker replays or is given as it starts) on the worker of
        ``slot``. Where that worker dies or hangs meanwhile (a program of another call stopped it), its replacement
        starts with ``what`` (the pool's definitions and LM): once it is ready, the call goes on there. Where the
        replacement could not start with it either (a definition that ends every worker it reaches), the first
        worker's death is the error."""
        try:
            return self.execute(tool, args, worker=slot)
        except WorkerDied as died:
            if not self._slot_ready(slot, self.start_timeout):
                why = next((w.last_error for w in self.workers if w.id == slot and w.state == FAILED), "")
                add_note(died, f"its replacement did not start with {what} either: {what} itself ends the worker "
                               f"it runs on; {why or self._states()}")
                raise
        return self.execute(tool, args, worker=slot)

    def _slot_ready(self, slot: str, timeout: float) -> bool:
        """Wait until the worker of ``slot`` is ready (True), or its restart failed or the pool stopped (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closing.is_set() and time.monotonic() < deadline:
                state = next((w.state for w in self.workers if w.id == slot), FAILED)
                if state in (READY, FAILED):
                    return state == READY
                self._lock.wait(0.1)  # a failed restart notifies no one
        return False

    def _try_on(self, workers: list[str], tool: str, args: dict[str, Any]) -> None:
        """Call ``tool`` on each of ``workers``, best effort: a worker going away meanwhile is replaced, and
        its replacement replays the definitions."""
        for worker in workers:
            with contextlib.suppress(DspexError):
                self.execute(tool, args, worker=worker)

    def session(self, worker: str | None = None, affinity: str = "hint") -> Session:
        """A Session: calls go to one worker (the least busy now, or ``worker``) and share the objects
        its tools keep. ``affinity``: "hint" (prefer that worker, else another), "strict_queue" (wait for
        it), "strict_fail_fast" (raise WorkerBusy when it has no room)."""
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        return Session(self, worker or self._choose(None, count=False).id, affinity)

    # -- information and control --------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per worker (``Worker.status``): worker, pid, state, in_flight, done, errors, cancelled, items, restarts,
        recycles, rss_mb, cancelled_running_s, uptime, last_error."""
        return [w.status() for w in list(self.workers)]

    def stats(self) -> dict[str, Any]:
        """Per tool: calls, errors, chunks, and p50 / p95 / max of queue wait, execution and first chunk."""
        return self.telemetry.summary()

    def describe(self, worker: str | None = None) -> dict[str, Any]:
        """A worker's self-description: tools with argument schemas, versions, LM, counters."""
        chosen = self._choose(worker, count=False)
        try:
            return chosen.conn.describe(self.ping_timeout, self._death_of(chosen))
        except ConnectionClosed:
            raise self._gone(chosen) from None

    def tools(self) -> list[dict[str, Any]]:
        return self.describe()["tools"]

    def configure_lm(self, model: str, **kwargs: Any) -> None:
        """Switch every worker (and any started later) to ``model`` ("demo" or a dspy.LM model string). A worker that
        dies or hangs meanwhile is replaced by one that starts with it; where a worker refuses it (bad settings), the
        workers that took it go back to the previous LM."""
        kwargs = settings.Checker("configure_lm").lm_kwargs(kwargs, model=model)
        previous = self.lm, self.lm_kwargs
        redact.register(kwargs)
        self.lm, self.lm_kwargs = model, kwargs  # first: a worker starting now starts with it
        done: list[str] = []
        try:
            for worker in list(self.workers):
                self._define_in(worker.id, f"the LM {model!r}", "configure_lm", {"model": model, "kwargs": kwargs})
                done.append(worker.id)
        except BaseException:
            self.lm, self.lm_kwargs = previous
            self._try_on(done, "configure_lm", {"model": previous[0], "kwargs": previous[1]})
            raise

    def kill_worker(self, worker: str, signal_number: int) -> int:
        """Send a signal to one worker process (for fault tests and demos); returns its pid."""
        chosen = next((w for w in self.workers if w.id == worker), None)
        if chosen is None:  # not a bare StopIteration, which says nothing (and ends a generator that calls this)
            raise ValueError(f"no worker {worker!r} in this pool: {[w.id for w in self.workers]}")
        if not isinstance(signal_number, int) or isinstance(signal_number, bool) \
                or signal_number not in signal.valid_signals():  # was: a bare OSError "[Errno 22] Invalid argument"
            raise ValueError(f"kill_worker(signal_number=...) must be a signal (signal.SIGKILL...), got "
                             f"{signal_number!r}")
        chosen.process.signal(signal_number)
        return chosen.process.pid

    def __repr__(self) -> str:
        states = ", ".join(f"{w.id}:{w.state}" for w in self.workers) or "not running"
        return f"<Pool {count(self.size, 'worker')}, lm={self.lm!r}: {states}>"


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_live_pools):
        pool.shutdown()
