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
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from dspex_nb import programs, redact, typed
from dspex_nb.batch import BatchRun
from dspex_nb.errors import (
    DspexError,
    PoolClosed,
    PoolSaturated,
    QueueTimeout,
    UnknownTool,
    WorkerBusy,
    WorkerStartError,
)
from dspex_nb.journal import Journal
from dspex_nb.pool import settings
from dspex_nb.pool.calls import KEEP_CHUNKS, Chunk, Run, encode_args
from dspex_nb.pool.connection import Backend, ConnectionClosed, WorkerSpec
from dspex_nb.pool.local import LocalBackend
from dspex_nb.pool.session import Session
from dspex_nb.pool.supervision import Supervision
from dspex_nb.pool.telemetry import CallRecord, Telemetry
from dspex_nb.pool.worker import READY, STOPPED, Worker
from dspex_nb.schema import validate

AFFINITIES = ("hint", "strict_queue", "strict_fail_fast")
START_METHODS = ("spawn", "template")  # a new interpreter per worker, or forks of one that imported dspy
DEFAULT_START = "template" if sys.platform == "linux" else "spawn"
BACKENDS = ("local", "ray")


class Pool(Supervision):
    """A pool of DSPy worker processes.

    >>> with Pool(workers=2, lm="demo") as pool:
    ...     pool.execute("echo", {"x": 1})
    {'x': 1}
    """

    def __init__(self, workers: int = 2, *, lm: str = "demo", lm_kwargs: dict[str, Any] | None = None,
                 python: str | None = None, max_message_mb: int = 64, health_interval: float = 0.5,
                 ping_timeout: float = 5.0, start_timeout: float = 60.0, env: dict[str, str] | None = None,
                 concurrency: int = 4, rate_limit: float | None = None,
                 journal: Journal | str | Path | bool = True, otel: bool = False, max_in_flight: int = 8,
                 max_queue: int = 1000, queue_timeout: float = 60.0, session_ttl: float = 3600.0,
                 max_requests: int | None = None, ttl: float | None = None,
                 max_memory_mb: float | None = None, start: str = DEFAULT_START, backend: str = "local",
                 address: str | None = None, resources: dict[str, float] | None = None) -> None:
        check = settings.Checker("Pool")
        check.integer("workers", workers, 1)
        check.integer("max_message_mb", max_message_mb, 1, 2047)  # gRPC's limit is a signed 32-bit byte count
        check.integer("concurrency", concurrency, 1)
        check.integer("max_in_flight", max_in_flight, 1)
        check.integer("max_queue", max_queue, 0)
        check.integer("max_requests", max_requests, 1, optional=True)
        for name, value in (("health_interval", health_interval), ("ping_timeout", ping_timeout),
                            ("start_timeout", start_timeout), ("queue_timeout", queue_timeout),
                            ("session_ttl", session_ttl)):
            check.seconds(name, value)
        check.seconds("ttl", ttl, optional=True)
        check.positive("rate_limit", rate_limit, "LM requests per minute")
        check.positive("max_memory_mb", max_memory_mb, "MB")
        check.choice("start", start, START_METHODS)
        check.choice("backend", backend, BACKENDS)
        check.mapping("resources", resources)
        check.mapping("lm_kwargs", lm_kwargs)
        check.mapping("env", env, values=str)
        if not isinstance(lm, str) or not lm:
            raise ValueError(f"Pool(lm=...) must be 'demo' or a dspy.LM model string, got {lm!r}")
        self.size = workers
        self.lm = lm
        self.lm_kwargs = dict(lm_kwargs or {})
        redact.register(self.lm_kwargs)  # an api_key given here is masked wherever it shows up
        self.max_message_bytes = max_message_mb * 2**20
        self.health_interval = health_interval
        self.ping_timeout = ping_timeout
        self.start_timeout = start_timeout
        self.env = env
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self._journal_setting = journal
        self._journal: Journal | None = None
        self.telemetry = Telemetry(otel)
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.session_ttl = session_ttl
        self.max_requests = max_requests
        self.ttl = ttl
        self.max_memory_mb = max_memory_mb
        self.backend: Backend
        if backend == "ray":
            from dspex_nb.pool.ray_backend import RayBackend  # the ray extra, imported only when asked for

            self.backend = RayBackend(address, resources, env)
        else:
            self.backend = LocalBackend(python, start, env)
        self._queued = 0
        self._restarting: list[threading.Thread] = []  # restart threads, joined by shutdown()
        self.cleaned: list[dict[str, Any]] = []  # what stale cleanup did when this pool started
        self.run_id = uuid.uuid4().hex[:12]
        self.schemas: dict[str, dict[str, Any]] = {}  # tool name -> argument schema, from Describe at start
        self.definitions: dict[str, dict[str, Any]] = {}  # name -> source, kind, inputs; replayed on new workers
        self._shipped: dict[int, tuple[Any, str]] = {}  # id(program) -> (a weak reference to it, its shipped name)
        self.workers: list[Worker] = []
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self._rr = itertools.count()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Pool:
        """Start every worker concurrently and wait until all answer a ping (or raise why not)."""
        if self.workers:
            return self
        self._closing.clear()
        try:
            self.cleaned = self.backend.open()
            self.workers = [self._spawn(f"w{i}", 0) for i in range(self.size)]
            deadline = time.monotonic() + self.start_timeout
            for worker in self.workers:
                self._wait_ready(worker, deadline)
            first = self.workers[0]
            described = first.conn.describe(self.start_timeout, self._death_of(first))
            self.schemas = {t["name"]: t for t in described["tools"]}
        except BaseException:
            self.shutdown()
            raise
        _live_pools.add(self)
        self._monitor = threading.Thread(target=self._watch, name="dspex-health", daemon=True)
        self._monitor.start()
        return self

    def shutdown(self) -> None:
        """Stop every worker process and remove the socket directory. Idempotent."""
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
        for worker in workers:
            worker.process.kill()
        self.backend.close()
        if self._journal is not None and self._journal_setting is not self._journal:
            self._journal.close()
            self._journal = None
        _live_pools.discard(self)

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        return bool(self.workers) and not self._closing.is_set()

    def _spawn(self, worker_id: str, generation: int) -> Worker:
        spec = WorkerSpec(self.run_id, self.lm, self.lm_kwargs, self.max_message_bytes, self.session_ttl,
                          self.rate_limit / self.size if self.rate_limit else None,  # the pool's limit, split evenly
                          self.start_timeout, dict(self.env or {}))
        return Worker(worker_id, self.backend.spawn(worker_id, generation, spec), generation)

    def _wait_ready(self, worker: Worker, deadline: float) -> None:
        while not worker.conn.ready():
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
        return worker.conn.execute(tool, self._args_json(tool, definition["args"]), "", self.start_timeout, 0.0,
                                   self._death_of(worker))

    # -- routing ------------------------------------------------------------------------
    def _choose(self, worker_id: str | None, count: bool, affinity: str = "strict_queue",
                timeout: float | None = None) -> Worker:
        """The least busy ready worker with room (or the slot ``worker_id``, per ``affinity``).

        With ``count`` the call takes one of the worker's ``max_in_flight`` places until ``_release``;
        while no worker has room it waits in the pool's queue (at most ``max_queue`` callers, each for
        at most ``queue_timeout`` seconds, or the call's ``timeout`` if shorter). Without ``count``
        (describe, sessions) room does not matter.
        """
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        wait = self.queue_timeout if timeout is None else min(self.queue_timeout, timeout)
        deadline = time.monotonic() + wait
        queued = False
        with self._lock:
            try:
                while (worker := self._pick(worker_id, count, affinity)) is None:
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
                return worker
            finally:
                if queued:
                    self._queued -= 1

    def _pick(self, worker_id: str | None, count: bool, affinity: str) -> Worker | None:
        """The worker for a call now, or None when it must wait (call with the lock held)."""
        if not self.workers or self._closing.is_set():
            raise PoolClosed("the pool is not running: start it with Pool.start() or `with Pool(...)`")
        if worker_id is not None and worker_id not in {w.id for w in self.workers}:
            raise ValueError(f"no worker {worker_id!r} in this pool: {[w.id for w in self.workers]}")
        free = [w for w in self.workers if w.state == READY and not (count and w.in_flight >= self.max_in_flight)]
        if worker_id is not None:
            mine = [w for w in free if w.id == worker_id]
            if not mine and affinity == "strict_fail_fast":
                raise WorkerBusy(f"worker {worker_id} has no room or is not ready (affinity='strict_fail_fast'); "
                                 f"states: {self._states()}")
            if mine or affinity == "strict_queue":
                free = mine
        if not free:
            return None
        tie = next(self._rr)
        return min(free, key=lambda w: (w.in_flight, (self.workers.index(w) - tie) % self.size))

    def _states(self) -> dict[str, str]:
        return {w.id: f"{w.state}, {w.in_flight} in flight" for w in self.workers}

    def wait_for_change(self, timeout: float) -> None:
        """Wait until a call ends, a worker changes state or ``notify_change()`` is called (or ``timeout``
        passes): for a caller that places work itself, instead of polling."""
        with self._lock:
            self._lock.wait(timeout)

    def notify_change(self) -> None:
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
    def _args_json(self, tool: str, args: dict[str, Any] | None) -> bytes:
        """A call's arguments as JSON, checked against the tool's schema before anything is sent."""
        if self.schemas and tool not in self.schemas:
            raise UnknownTool(tool, "UnknownTool",
                              f"no tool named {tool!r}; available tools: {', '.join(sorted(self.schemas))}")
        if tool in self.schemas:
            validate(self.schemas[tool], {} if args is None else args)
        return encode_args(tool, args, self.max_message_bytes)

    def execute(self, tool: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
                worker: str | None = None, session_id: str = "", affinity: str = "strict_queue") -> Any:
        """Run ``tool`` on a worker and return its result; Ctrl-C cancels the remote work."""
        args_json = self._args_json(tool, args)
        queued, wall = time.monotonic(), time.time_ns()
        chosen = self._choose(worker, count=True, affinity=affinity, timeout=timeout)
        sent = time.monotonic()
        ok, result, outcome = False, None, "failed"
        try:
            try:  # Ctrl-C during the call cancels the remote work
                result = chosen.conn.execute(tool, args_json, session_id, timeout, time.monotonic() - queued,
                                             self._death_of(chosen))
            except ConnectionClosed:  # the worker is being replaced, or the pool shut down
                raise self._gone(chosen) from None
            ok, outcome = True, "done"
            return result
        except KeyboardInterrupt:
            outcome = "cancelled"
            raise
        finally:
            self._release(chosen, outcome)
            tokens_in, tokens_out = typed.tokens(result) if ok else (0, 0)
            self.telemetry.add(CallRecord(tool, chosen.id, ok, sent - queued, time.monotonic() - sent,
                                          started_ns=wall, tokens_in=tokens_in, tokens_out=tokens_out,
                                          cost=typed.cost(result), cancelled=outcome == "cancelled"))

    def execute_stream(self, tool: str, args: dict[str, Any] | None = None, *,
                       on_chunk: Callable[[Chunk], Any] | None = None, timeout: float | None = None,
                       worker: str | None = None, session_id: str = "", affinity: str = "strict_queue",
                       keep_chunks: int | None = KEEP_CHUNKS) -> Run:
        """Start ``tool`` as a stream and return its ``Run`` at once; chunks arrive in order. The Run keeps
        the latest ``keep_chunks`` chunks (None: every one)."""
        args_json = self._args_json(tool, args)
        queued, wall = time.monotonic(), time.time_ns()
        chosen = self._choose(worker, count=True, affinity=affinity, timeout=timeout)
        try:
            source = chosen.conn.stream(tool, args_json, session_id, timeout, time.monotonic() - queued,
                                        self._death_of(chosen))
        except ConnectionClosed:  # the worker is being replaced, or the pool shut down
            self._release(chosen, "failed")
            raise self._gone(chosen) from None

        def done(run: Run) -> None:
            ok = run.status == "done"
            self._release(chosen, run.status, run.items)
            first = None if run.first_chunk_at is None else run.first_chunk_at - run.started
            self.telemetry.add(CallRecord(tool, chosen.id, ok, run.started - queued, run.elapsed, first,
                                          run.received, wall, *run.tokens, run.cost, run.status == "cancelled"))

        return Run(tool, chosen.id, source, on_chunk=on_chunk, on_done=done, keep_chunks=keep_chunks)

    def define(self, name: str, program: Any) -> dict[str, Any]:
        """Define a DSPy program on every worker, now and on any started later; returns its kind and inputs.

        ``program`` is a ``dspy.Module`` class or instance (a compiled one keeps its demos and instructions),
        a ``dspy.Signature`` class (run as ``dspy.Predict``) or a function; it travels by value, with the
        notebook code and classes it uses (see ``dspex_nb.programs``). Or Python ``source`` that defines
        ``name`` on the workers only (``dspy`` is imported there). Run it with ``run(name, ...)``,
        ``map(name, items)`` or the ``run_module`` tool.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {name!r}")
        if programs.is_signature(program):  # "question -> answer": run as dspy.Predict
            program = programs.as_program(program)
        if not isinstance(program, str):
            return self._install(name, programs.ship(program))
        compile(program, f"<dspex define {name}>", "exec", dont_inherit=True)  # a syntax error, with its line
        return self._install(name, {"tool": "define", "args": {"name": name, "source": program}, "key": program},
                             typed.Resolver())

    def _install(self, name: str, definition: dict[str, Any] | programs.Shipped,
                 resolver: typed.Resolver | None = None) -> dict[str, Any]:
        """Define ``name`` on every worker (and for any started later); undone everywhere if one fails."""
        if isinstance(definition, programs.Shipped):
            resolver = typed.Resolver(definition.types)
            definition = {"tool": "define_object", "args": {"name": name, "payload": definition.payload},
                          "key": definition.key}
        previous = self.definitions.get(name)
        self.definitions[name] = definition  # first: a worker starting now replays it
        info: dict[str, Any] = {}
        done: list[str] = []
        try:
            for worker in list(self.workers):
                info = self.execute(definition["tool"], definition["args"], worker=worker.id)
                done.append(worker.id)
        except BaseException:
            if previous is None:
                del self.definitions[name]
                self._try_on(done, "undefine", {"name": name})  # the workers agree again: all old, or none
            else:
                self.definitions[name] = previous
                self._try_on(done, previous["tool"], previous["args"])
            raise
        self.definitions[name] = {**definition, **info, "resolver": resolver}
        return info

    def _try_on(self, workers: list[str], tool: str, args: dict[str, Any]) -> None:
        """Call ``tool`` on each of ``workers``, best effort: a worker going away meanwhile is replaced, and
        its replacement replays the definitions."""
        for worker in workers:
            with contextlib.suppress(DspexError):
                self.execute(tool, args, worker=worker)

    def ensure_defined(self, program: Any) -> str:
        """The name ``program`` runs under: a defined name as it is, else the program is shipped under a name
        of its own (again only when it changed, e.g. after compiling it)."""
        if isinstance(program, str) and not programs.is_signature(program):
            if program not in self.definitions:
                raise ValueError(f"no program named {program!r} on this pool (defined: "
                                 f"{sorted(self.definitions) or 'none'}); pass the program itself or pool.define it")
            return program
        original = program
        program = programs.as_program(program)
        shipped = programs.ship(program)
        name = f"_{type(program).__name__}_{shipped.key[:12]}"
        if name not in self.definitions:
            self._install(name, shipped)
        if not isinstance(original, str):  # the same object shipped before, and changed since: drop that version
            key = id(original)
            ref, old = self._shipped.get(key, (None, None))
            if old is not None and old != name and ref is not None and ref() is original:
                self.definitions.pop(old, None)  # new workers do not replay it; the current ones forget it
                self._try_on([w.id for w in self.workers], "undefine", {"name": old})
            with contextlib.suppress(TypeError):  # an object without weak references is not tracked
                self._shipped[key] = (weakref.ref(original), name)
        return name

    def run(self, program: Any, /, **inputs: Any) -> Any:
        """Run a DSPy program (object, signature, or defined name) on a worker; returns what it returns in the
        kernel: a ``dspy.Prediction`` with the fields' own types (pydantic models, enums, datetimes...)."""
        return self.call(program, inputs)

    async def run_async(self, program: Any, /, **inputs: Any) -> Any:
        """``run`` for asyncio: the same value, awaited without blocking the event loop, so that
        ``asyncio.gather`` runs several at once on the pool."""
        return await self.run_stream(program, **inputs)

    def run_stream(self, program: Any, /, **inputs: Any) -> Run:
        """``run`` as a stream: a ``Run`` whose chunks are the tokens of each field, and whose ``result()`` is
        the same value ``run`` returns."""
        return self.call(program, inputs, stream=True)

    def call(self, program: Any, inputs: dict[str, Any], *, stream: bool = False, timeout: float | None = None,
             on_chunk: Callable[[Chunk], Any] | None = None) -> Any:
        """``run`` (or with ``stream``, ``run_stream``) with options, the inputs given as a dict."""
        name = self.ensure_defined(program)
        return self.call_tool("run_module", {"name": name, "inputs": typed.encode(inputs)},
                              self.definitions[name]["resolver"], stream=stream, timeout=timeout, on_chunk=on_chunk)

    def call_tool(self, tool: str, args: dict[str, Any], resolver: typed.Resolver | None = None, *,
                  stream: bool = False, timeout: float | None = None,
                  on_chunk: Callable[[Chunk], Any] | None = None) -> Any:
        """A DSPy tool (``predict``, ``chain_of_thought``, ``run_module``) whose result is what the program
        returned (rebuilt with ``resolver``'s classes); with ``stream``, a ``Run`` whose ``result()`` is that."""
        decode = partial(programs.to_output, resolve=resolver or typed.Resolver())
        if not stream:
            return decode(self.execute(tool, args, timeout=timeout))
        run = self.execute_stream(tool, args, timeout=timeout, on_chunk=on_chunk)
        run.decode = decode
        return run

    def map(self, program: Any, items: Any, *, concurrency: int | None = None,
            on_item: Callable[[dict[str, Any]], Any] | None = None, timeout: float | None = None,
            item_timeout: float | None = None, max_retries: int = 2, journal: bool = True) -> BatchRun:
        """Run ``program`` on every item over the whole pool; returns a ``BatchRun`` at once, whose ``result()``
        is a list of what the program returned for each item, in input order (None where an item failed, as
        ``Module.batch``; ``records`` say why). Items: strings (one-input programs), dicts, ``dspy.Example``s
        (their ``inputs()``), or a DataFrame."""
        name = self.ensure_defined(program)
        batch = self.batch(items, module=name, concurrency=concurrency, on_item=on_item,
                           timeout=timeout, item_timeout=item_timeout, max_retries=max_retries, journal=journal)
        batch.decode = partial(programs.to_output, resolve=self.definitions[name]["resolver"])
        return batch

    def evaluate(self, program: Any, devset: Sequence[Any], metric: Callable[..., Any], *,
                 display: bool = True, failure_score: float = 0.0, **map_options: Any) -> Any:
        """``dspy.Evaluate(devset=devset, metric=metric)(program)``, with the program run on the pool (``map``);
        the metric runs here and DSPy's Evaluate computes the score, so it is the same as in the kernel."""
        import dspy

        batch = self.map(program, devset, **map_options)
        if display:
            from dspex_nb.ui.render import show_batch

            show_batch(batch, f"evaluate {type(program).__name__}", block=True)
        batch.wait()
        replay = programs.Replay(devset, batch)
        return dspy.Evaluate(devset=list(devset), metric=metric, num_threads=1, display_progress=False,
                             failure_score=failure_score)(replay)

    @property
    def journal(self) -> Journal | None:
        """The batch journal (opened on first use), or None when this pool was made with journal=False."""
        if self._journal is None and self._journal_setting is not False:
            setting = self._journal_setting
            self._journal = setting if isinstance(setting, Journal) else Journal(None if setting is True else setting)
        return self._journal

    def batch(self, items: Sequence[Any], signature: str = "", *, module: str = "predict",
              concurrency: int | None = None, on_item: Callable[[dict[str, Any]], Any] | None = None,
              timeout: float | None = None, item_timeout: float | None = None, shard_size: int | None = None,
              max_retries: int = 2, journal: bool = True) -> BatchRun:
        """Fan ``items`` (input dicts, or strings for a one-input signature) out over every worker.

        ``module`` is "predict", "chain_of_thought" (both need ``signature``) or a defined module;
        ``concurrency`` is items at a time per worker (default: the pool's). Finished items are kept
        in the journal and taken from it when the same batch runs again (``journal=False``: neither).
        A shard that yields no item for ``item_timeout`` seconds is cancelled and its items retried.
        Returns a ``BatchRun`` at once.
        """
        check = settings.Checker("batch")
        check.integer("concurrency", concurrency, 1, optional=True)
        check.integer("shard_size", shard_size, 1, optional=True)
        check.integer("max_retries", max_retries, 0)
        check.seconds("timeout", timeout, optional=True)
        check.seconds("item_timeout", item_timeout, optional=True)
        items = programs.item_inputs(items, "batch")  # strings, dicts, dspy.Examples or a DataFrame, as typed JSON
        program = {"module": module, "signature": signature, "lm": self.lm, "lm_kwargs": self.lm_kwargs,
                   "source": self.definitions.get(module, {}).get("key")}
        return BatchRun(self, items, signature=signature, module=module,
                        concurrency=concurrency or self.concurrency, shard_size=shard_size,
                        max_retries=max_retries, timeout=timeout, item_timeout=item_timeout, on_item=on_item,
                        journal=self.journal if journal else None, program=program)

    def session(self, worker: str | None = None, affinity: str = "hint") -> Session:
        """A Session: calls go to one worker (the least busy now, or ``worker``) and share the objects
        its tools keep. ``affinity``: "hint" (prefer that worker, else another), "strict_queue" (wait for
        it), "strict_fail_fast" (raise WorkerBusy when it has no room)."""
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        return Session(self, worker or self._choose(None, count=False).id, affinity)

    # -- information and control --------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per worker: id, pid, state, in_flight, done, errors, restarts, recycles, rss_mb, uptime, last_error."""
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
        """Switch every worker (and any started later) to ``model`` ("demo" or a dspy.LM model string)."""
        previous = self.lm, self.lm_kwargs
        redact.register(kwargs)
        self.lm, self.lm_kwargs = model, kwargs  # first: a worker starting now starts with it
        try:
            for worker in list(self.workers):
                self.execute("configure_lm", {"model": model, "kwargs": kwargs}, worker=worker.id)
        except BaseException:
            self.lm, self.lm_kwargs = previous
            raise

    def kill_worker(self, worker: str, signal_number: int) -> int:
        """Send a signal to one worker process (for fault tests and demos); returns its pid."""
        chosen = next(w for w in self.workers if w.id == worker)
        chosen.process.signal(signal_number)
        return chosen.process.pid

    def __repr__(self) -> str:
        states = ", ".join(f"{w.id}:{w.state}" for w in self.workers) or "not running"
        return f"<Pool {self.size} workers, lm={self.lm!r}: {states}>"


_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_live_pools):
        pool.shutdown()
