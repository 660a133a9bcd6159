"""``Pool``: DSPy programs on a pool of workers, the user's API. The executor it builds on
(``pool.pool.WorkerPool``: workers on a backend, calls to their tools) knows nothing of programs, batches or
the journal; this layer ships programs (``programs``), fans batches out (``batch.BatchRun``) and keeps the
journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sqlite3
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from dspex_nb import programs, redact, typed
from dspex_nb.batch import BatchRun
from dspex_nb.errors import PoolLMDiffers, ToolError, program_errors_raised_here
from dspex_nb.journal import Journal
from dspex_nb.pool import settings
from dspex_nb.pool.calls import Chunk, Run
from dspex_nb.pool.pool import WorkerPool
from dspex_nb.wire import definition_version

EVALUATE_OPTIONS = frozenset({"display_table", "max_errors", "provide_traceback", "save_as_csv", "save_as_json",
                              "callback_metadata"})  # dspy.Evaluate's, passed on to it as they are
MAP_OPTIONS = frozenset({"concurrency", "on_item", "timeout", "item_timeout", "max_retries", "journal"})

_SHIPPED_KEY = 12  # hex digits of a shipped program's key in the name it runs under
_SHIPPED_NAME = re.compile(rf"_\w+_[0-9a-f]{{{_SHIPPED_KEY}}}")


class Pool(WorkerPool):
    """A pool of DSPy workers: local processes, or Ray actors with ``backend="ray"``.

    >>> with Pool(workers=2, lm="demo") as pool:
    ...     pool.execute("echo", {"x": 1})
    {'x': 1}
    """

    def __init__(self, workers: int = 2, *, lm: str | None = None, lm_kwargs: dict[str, Any] | None = None,
                 journal: Journal | str | Path | bool = True, **options: Any) -> None:
        settings.Checker("Pool").instance("journal", journal, (Journal, str, Path, bool),
                                          "True, False, a path or a Journal")
        settings.Checker("Pool").path("journal", journal)
        if lm is None:  # the kernel's DSPy LM, as a program run here would use; without one, the demo LM
            lm, kernel_kwargs = programs.kernel_lm() or ("demo", {})
            if lm_kwargs is None or isinstance(lm_kwargs, dict):  # another value: refused below, named
                lm_kwargs = {**kernel_kwargs, **(lm_kwargs or {})}
        super().__init__(workers, lm=lm, lm_kwargs=lm_kwargs, **options)
        self._lms_warned: set[str] = set()
        self._states_warned: set[str] = set()  # the programs whose StateNotKept was shown (programs.to_output)
        self._journal_setting = journal
        self._journal: Journal | None = None
        self._shipped: dict[int, tuple[Any, str]] = {}  # id(program) -> (a weak reference to it, its shipped name)
        self._installing = threading.Lock()  # a program's first calls at once: one ships it, the others wait

    def start(self) -> Pool:
        super().start()
        return self

    def __copy__(self) -> Pool:
        return self  # one set of workers: a copy of a module that holds the pool (Module.deepcopy) shares it

    def __deepcopy__(self, memo: dict[int, Any]) -> Pool:
        return self

    def __reduce__(self) -> Any:
        raise programs.KernelOnly(
            "it uses a dspex_nb Pool (a forward that calls pool.run(...)), which stays in the kernel: run that "
            "program in the kernel (dspy.Evaluate, Module.batch), or give the pool the predictors it calls")

    def __enter__(self) -> Pool:
        return self.start()

    def shutdown(self) -> None:
        forked = self.forked  # a forked child's copy: the journal's connection is the parent's too
        super().shutdown()
        if not forked and self._journal is not None and self._journal_setting is not self._journal:
            self._journal.close()
            self._journal = None

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
        return self.broadcast(name, {"tool": "define", "args": {"name": name, "source": program}, "key": program,
                                     "version": definition_version(program)}, resolver=typed.Resolver())

    def _install(self, name: str, shipped: programs.Shipped) -> dict[str, Any]:
        """A shipped program defined under ``name`` on every worker, and on any started later."""
        return self.broadcast(name, {"tool": "define_object", "args": {"name": name, "payload": shipped.payload},
                                     "key": shipped.key, "version": definition_version(shipped.payload)},
                              resolver=typed.Resolver(shipped.types))

    def defined_names(self) -> list[str]:
        """The names defined with ``define`` (``%%dspex define``), without those ``ensure_defined`` ships a
        program under, which no one wrote."""
        return sorted(name for name in self.definitions if not _SHIPPED_NAME.fullmatch(name))

    def ensure_defined(self, program: Any) -> str:
        """The name ``program`` runs under: a defined name as it is, else the program is shipped under a name
        of its own (again only when it changed, e.g. after compiling it)."""
        if isinstance(program, str) and not programs.is_signature(program):
            if program not in self.definitions:
                raise ValueError(f"no program named {program!r} on this pool (defined: "
                                 f"{self.defined_names() or 'none'}); pass the program itself or pool.define it")
            return program
        original = program
        program = programs.as_program(program)
        if not callable(program):
            raise TypeError("the program must be a dspy.Module (class or instance), a signature (class or string), "
                            f"a function or a defined name; got {type(program).__name__}")
        shipped = programs.ship(program)
        name = f"_{type(program).__name__}_{shipped.key[:_SHIPPED_KEY]}"
        if "resolver" not in self.definitions.get(name, {}):  # not defined yet, or still being defined
            self._refuse_if_forked()  # before the lock, which a thread of the parent may have held at a fork
            with self._installing:
                if "resolver" not in self.definitions.get(name, {}):
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

    @program_errors_raised_here
    def run(self, program: Any, /, *args: Any, **inputs: Any) -> Any:
        """Run a DSPy program (object, signature, or defined name) on a worker; returns what it returns in the
        kernel: a ``dspy.Prediction`` with the fields' own types (pydantic models, enums, datetimes...)."""
        _by_keyword("run", args)
        return self.call(program, inputs)

    @program_errors_raised_here
    async def run_async(self, program: Any, /, **inputs: Any) -> Any:
        """``run`` for asyncio: the same value, awaited without blocking the event loop, so that
        ``asyncio.gather`` runs several at once on the pool."""
        started: list[Run] = []  # the call, once a worker took it
        abandoned = threading.Event()  # the awaiting task was cancelled

        def start() -> Run:  # in a thread: shipping, waiting for a free slot
            run = self.run_stream(program, **inputs)
            started.append(run)
            if abandoned.is_set():  # its caller gave up while it started: nobody awaits it, so it stops
                run.cancel()
            return run

        try:
            run = await asyncio.to_thread(start)
        except asyncio.CancelledError:
            abandoned.set()
            for run in started:  # started as the task was cancelled (it did not take the Run): it stops
                run._cancel()  # not cancel(), which waits for the remote work to stop, here in the loop
            raise
        return await run

    def run_stream(self, program: Any, /, *args: Any, **inputs: Any) -> Run:
        """``run`` as a stream: a ``Run`` whose chunks are the tokens of each field, and whose ``result()`` is
        the same value ``run`` returns."""
        _by_keyword("run_stream", args)
        return self.call(program, inputs, stream=True)

    @program_errors_raised_here
    def call(self, program: Any, inputs: dict[str, Any], *, stream: bool = False, timeout: float | None = None,
             on_chunk: Callable[[Chunk], Any] | None = None, tokens: bool = True) -> Any:
        """``run`` (or with ``stream``, ``run_stream``) with options, the inputs given as a dict. A stream without
        ``tokens`` runs the program as ``run`` does (without DSPy's streaming) and streams only its status and end:
        a view of it still has Stop."""
        settings.check_stream_options("call", on_chunk, None)  # before the program is sent to every worker
        name = self.ensure_defined(program)
        ship = typed.Shipment()
        args = {"name": name, "inputs": programs.sendable(inputs, ship, "run_module", "inputs", "the inputs are"),
                **({} if tokens else {"tokens": False})}
        shipped, resolver = programs.shipment(ship, self.definitions[name]["resolver"])
        if shipped:
            args["shipped"] = shipped
        trace = programs.open_trace()  # e.g. BootstrapFewShot's: the program's predictor calls join it, as here
        if trace is not None:
            args["trace"] = True
        run = self.call_tool("run_module", args, resolver, stream=stream, timeout=timeout, on_chunk=on_chunk,
                             trace=None if trace is None else (trace, program), program=program)
        if stream:
            run.label = f"run {programs.title(program)}"
        return run

    @program_errors_raised_here
    def call_tool(self, tool: str, args: dict[str, Any], resolver: typed.Resolver | None = None, *,
                  stream: bool = False, timeout: float | None = None, on_chunk: Callable[[Chunk], Any] | None = None,
                  trace: tuple[list[Any], Any] | None = None, program: Any = None) -> Any:
        """A DSPy tool (``predict``, ``chain_of_thought``, ``run_module``) whose result is what the program
        returned (rebuilt with ``resolver``'s classes); with ``stream``, a ``Run`` whose ``result()`` is that.
        ``trace``: the DSPy trace that its predictor calls join, and the kernel's program (``programs.to_output``).
        Its LM calls join the kernel's DSPy history (``dspy.inspect_history()``; ``program``'s modules' and the kernel
        LM's own histories too, see ``programs.record_history``)."""
        lm, shipped_lm = self._call_lm()
        resolver, held = resolver or typed.Resolver(), programs.lms_held(program)
        decode = partial(programs.to_output, resolve=resolver, trace=trace, program=program,
                         fill_usage=not programs.usage_tracked(), lm=lm, held=held, warned=self._states_warned,
                         tracker=programs.open_usage_tracker())  # with dspy.track_usage() as usage: its calls count
        failed = partial(programs.keep_failed_lm_state, held=held, lm=lm, resolve=resolver)
        if programs.wants_history():
            args = {**args, "history": True}
        settings = programs.kernel_settings(shipped_lm, self.env_changes.now())  # e.g. dspy.configure(adapter=...)
        if settings:
            args = {**args, "settings": settings}
        if not stream:
            try:
                result = self.execute(tool, args, timeout=timeout)
            except ToolError as error:
                failed(error)
                raise
            return decode(result)
        run = self.execute_stream(tool, args, timeout=timeout, on_chunk=on_chunk)
        run.decode, run.on_error = decode, failed
        return run

    def map(self, program: Any, items: Any, *, concurrency: int | None = None,
            on_item: Callable[[dict[str, Any]], Any] | None = None, timeout: float | None = None,
            item_timeout: float | None = None, max_retries: int = 2, journal: bool = True,
            max_errors: int | None = None) -> BatchRun:
        """Run ``program`` on every item over the whole pool; returns a ``BatchRun`` at once, whose ``result()``
        is a list of what the program returned for each item, in input order (None where an item failed, as
        ``Module.batch``, or where its output cannot be rebuilt in the kernel; ``records`` say why). Items:
        strings (one-input programs), dicts, ``dspy.Example``s (their ``inputs()``), or a DataFrame.

        As ``Module.batch``, the batch stops once ``max_errors`` items failed (None: ``dspy.settings.max_errors``,
        the kernel's, 10 unless set), and ``result()`` raises DSPy's "Execution cancelled" error."""
        import dspy

        if max_errors is None:
            max_errors = dspy.settings.max_errors
        settings.Checker("map").integer("max_errors", max_errors, 0)
        name = self.ensure_defined(program)
        trace = programs.open_trace()  # as Module.batch's items, they add their predictor calls there
        batch = self.batch(items, module=name, concurrency=concurrency, on_item=on_item, timeout=timeout,
                           item_timeout=item_timeout, max_retries=max_retries, journal=journal, max_errors=max_errors,
                           trace=trace is not None, on_history=programs.history_recorder(program))
        batch.decode = partial(programs.to_output, batch=True, resolve=batch.resolver, warned=self._states_warned,
                               fill_usage=not programs.usage_tracked(),
                               trace=None if trace is None else (trace, program))
        batch.label = f"map {programs.title(program)}"
        batch.caller, batch.kept_in = "pool.map(...)", "batch = pool.map(...); batch.records"
        return batch

    def evaluate(self, program: Any, devset: Sequence[Any], metric: Callable[..., Any], *,
                 failure_score: float = 0.0, num_threads: int | None = None, display_progress: bool = False,
                 **options: Any) -> Any:
        """``dspy.Evaluate(devset=devset, metric=metric, ...)(program)``, with the program run on the pool
        (``map``); the metric runs here and DSPy's Evaluate computes the score, so it is the same as in the
        kernel.

        Evaluate's own options act as there, with its defaults (``display_table``, ``max_errors``,
        ``provide_traceback``, ``save_as_csv``, ``save_as_json``, ``callback_metadata``); ``num_threads`` is the
        items in flight over the whole pool; ``display_progress`` shows the batch's view where DSPy shows its
        progress bar (a live dashboard with Stop in a notebook, the batch's summary line elsewhere), off by
        default as there; the others are ``map``'s (``concurrency``, ``timeout``, ``item_timeout``,
        ``max_retries``, ``journal``).
        """
        import dspy

        evaluate = {k: options.pop(k) for k in EVALUATE_OPTIONS if k in options}
        unknown = sorted(set(options) - MAP_OPTIONS)
        if unknown:
            raise TypeError(f"Pool.evaluate() got unexpected keyword argument(s) {unknown}; it takes "
                            f"dspy.Evaluate's options {sorted(EVALUATE_OPTIONS | {'num_threads', 'display_progress'})}"
                            f" and Pool.map's {sorted(MAP_OPTIONS)}")
        if num_threads is not None and "concurrency" not in options:
            settings.Checker("evaluate").integer("num_threads", num_threads, 1, settings.MAX_CONCURRENCY * self.size)
            options["concurrency"] = -(-num_threads // self.size)  # per worker
        batch = self.map(program, devset, max_errors=evaluate.get("max_errors"), **options)
        batch.caller, batch.kept_in = "pool.evaluate(...)", ""  # it returns a score, never the batch
        if display_progress:
            from dspex_nb.ui.render import show_batch

            show_batch(batch, f"evaluate {programs.title(program)}", block=True)
        batch.wait()
        if batch.status != "done":  # stopped (the view's Stop) or failed: no score of the examples that never ran
            batch.result()  # raises Cancelled, or the batch's error
        replay = programs.Replay(devset, batch)
        metadata = evaluate.pop("callback_metadata", None)
        return dspy.Evaluate(devset=list(devset), metric=metric, num_threads=1, display_progress=False,
                             failure_score=failure_score, **evaluate)(replay, callback_metadata=metadata)

    @property
    def journal(self) -> Journal | None:
        """The batch journal (opened on first use), or None when this pool was made with journal=False. One that
        cannot be opened (an unwritable directory, a full disk, a place other users could read) costs no batch:
        a journal in memory stands in for it, and the batches say why."""
        if self._journal is None and self._journal_setting is not False:
            setting = self._journal_setting
            if isinstance(setting, Journal):
                self._journal = setting
            else:
                path = None if setting is True else setting
                try:
                    self._journal = Journal(path)
                except (OSError, sqlite3.Error) as exc:
                    self._journal = Journal.in_memory(path, exc)
        return self._journal

    def batch(self, items: Sequence[Any], signature: str = "", *, module: str = "predict",
              concurrency: int | None = None, on_item: Callable[[dict[str, Any]], Any] | None = None,
              timeout: float | None = None, item_timeout: float | None = None, shard_size: int | None = None,
              max_retries: int = 2, journal: bool = True, max_errors: int | None = None,
              trace: bool = False,
              on_history: Callable[..., Any] | None = None) -> BatchRun:
        """Fan ``items`` (input dicts, or strings for a one-input signature) out over every worker.

        ``module`` is "predict", "chain_of_thought" (both need ``signature``) or a defined module;
        ``concurrency`` is items at a time per worker (default: the pool's). Finished items are kept
        in the journal and taken from it when the same batch runs again (``journal=False``: neither).
        An item that runs for ``item_timeout`` seconds is retried (or fails with ``ItemTimeout``). With
        ``max_errors``, the batch stops once that many items failed (``result()`` raises); without, it runs them all.
        With ``trace``, each item's result also holds the predictor calls it made (``Pool.map`` asks for them inside
        a DSPy trace, to add them there); ``on_history`` is given its LM calls' DSPy history entries (and the batch's
        resolver, ``resolve=``, and the kernel's LM that stands for the one they ran on, ``lm=``) as each item arrives
        (they are not kept in the journal). Returns a ``BatchRun`` at once.
        """
        check = settings.Checker("batch")
        check.integer("concurrency", concurrency, 1, settings.MAX_CONCURRENCY, optional=True)
        check.integer("shard_size", shard_size, 1, optional=True)
        check.integer("max_retries", max_retries, 0)
        check.integer("max_errors", max_errors, 0, optional=True)
        check.seconds("timeout", timeout, optional=True)
        check.seconds("item_timeout", item_timeout, optional=True)
        if on_item is not None and not callable(on_item):
            check.instance("on_item", on_item, (), "None or a function of an item record")
        ship = typed.Shipment()
        items = programs.item_inputs(items, "batch", ship)  # strings, dicts, dspy.Examples or a DataFrame
        defined = self.definitions.get(module, {})
        shipped, resolver = programs.shipment(ship, defined.get("resolver") or typed.Resolver())
        program = {"module": module, "signature": signature, "lm": self.lm, "lm_kwargs": self.lm_kwargs,
                   "source": defined.get("key"), "format": typed.FORMAT,
                   **({"shipped": hashlib.sha256(shipped.encode()).hexdigest()} if shipped else {})}
        history_lm, lm = self._call_lm()
        kernel = programs.kernel_settings(lm)
        if kernel:  # another adapter or LM is another program: the journal keeps their results apart
            program["settings"] = kernel
        if env := self.env_changes.now():  # not in the batch's key: a key set after the start gives the same answers
            kernel = programs.kernel_settings(lm, env)
        if trace:  # results with their predictor calls are kept apart from those without
            program["trace"] = True
        return BatchRun(self, items, signature=signature, module=module, settings=kernel,
                        concurrency=concurrency or self.concurrency, shard_size=shard_size,
                        max_retries=max_retries, max_errors=max_errors, timeout=timeout, item_timeout=item_timeout,
                        on_item=on_item,
                        journal=self.journal if journal else None, program=program, shipped=shipped, resolver=resolver,
                        version=defined.get("version", ""), trace=trace,
                        on_history=None if on_history is None else partial(on_history, resolve=resolver, lm=history_lm))


    def _call_lm(self) -> tuple[Any, Any]:
        """The LM a call made now runs on, as DSPy picks it: the one ``dspy.context(lm=...)`` sets around it where
        that is not the pool's (it wins over the configured one, here the pool's), which then travels with the
        call; else the pool's. Returns ``(the kernel's LM object that stands for it, for its history, or None;
        the LM to send with the call, or None)``. Where the kernel's configured LM (``dspy.configure``) is another
        than the pool's, the call runs on the pool's, and a ``PoolLMDiffers`` warning says so, once per LM."""
        try:
            kernel = programs.kernel_lm()
        except ValueError:  # an LM a model string does not make (not a dspy.LM, or with an engine of its own)
            kernel, which = ("", {}), "the kernel's DSPy LM, which a pool cannot start from a model string"
        else:
            which = f"the kernel's DSPy LM {_lm_named(*kernel, self.lm)} (dspy.configure)" if kernel else ""
        if kernel == (self.lm, self.lm_kwargs):  # DSPy is imported: the kernel has an LM
            return sys.modules["dspy"].settings.lm, None
        if (context := programs.context_lm()) is not None:
            return context, context
        if kernel is None:
            return None, None
        seen = repr(sorted(kernel[1].items(), key=str)) + kernel[0]
        if seen not in self._lms_warned:
            self._lms_warned.add(seen)
            warnings.warn(f"this call runs on the pool's LM {_lm_named(self.lm, self.lm_kwargs, kernel[0])}, not on "
                          f"{which}: pool.configure_lm(model, **settings) (%dspex lm ...) switches the pool's "
                          "workers", PoolLMDiffers, stacklevel=programs.callers_level())
        return None, None


def _lm_named(model: str, settings: dict[str, Any], other: str) -> str:
    """An LM as a warning names it: its model, and its settings (masked) where ``other`` is the same model."""
    return f"{model!r} with {redact.mapping(settings)}" if model == other else repr(model)


def _by_keyword(method: str, args: tuple[Any, ...]) -> None:
    if args:
        raise TypeError(f"Pool.{method}() takes the program's inputs by keyword, as dspy.Predict does: "
                        f"pool.{method}(program, question=...), not {len(args)} positional input(s)")
