"""One call on one worker, seen from the kernel: ``Chunk`` and the streaming ``Run`` handle.

A Run reads its chunk source (``ChunkSource``: a backend transport's stream) in a background
thread and keeps every chunk, so it can be iterated (even several times), awaited with ``result()``
and cancelled at any point; blocking waits happen in short slices so Ctrl-C cancels the remote work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Protocol

from dspex_nb import typed
from dspex_nb.errors import (
    ArgumentError,
    CallTimeout,
    Cancelled,
    ChunksDropped,
    DspexError,
    MessageTooLarge,
    StopStream,
    ToolError,
    call_error,
    program_errors_raised_here,
)
from dspex_nb.wire import LOGS, WARNINGS, dumps, loads
from dspex_nb.words import count

WAIT_SLICE = 0.1  # seconds a blocking wait sleeps before it lets KeyboardInterrupt through
CANCEL_WAIT = 5.0  # seconds cancel() waits for the remote work to confirm it stopped (it needs milliseconds)
OWN_THREADS = threading.local()  # ``.handle`` is True in the threads that carry handles (readers, feeders)


@dataclass(slots=True)
class Chunk:
    """One chunk of a stream; ``chunk["k"]`` reads ``chunk.data["k"]``. (Not frozen: a stream makes one per
    chunk, and a frozen dataclass takes four times as long to make.)"""

    kind: str  # token | item | started | status | error | final
    seq: int
    data: Any
    is_final: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default) if isinstance(self.data, dict) else default


def decode_chunks(message: bytes) -> list[Chunk]:
    """The chunks of one stream message: a JSON array of [seq, kind, data, is_final] (see the proto's
    ``ChunkBatch``), decoded at once."""
    return [Chunk(kind, seq, data, is_final) for seq, kind, data, is_final in loads(message)]


def encode_args(tool: str, args: dict[str, Any] | None, limit: int) -> bytes:
    """JSON-encode a call's arguments, naming the argument that cannot be encoded."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ArgumentError(tool, "ArgumentError", f"arguments must be a dict, got {type(args).__name__}")
    try:
        data = dumps(args)
    except (TypeError, ValueError, RecursionError) as exc:
        for key, value in args.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError, RecursionError):
                raise ArgumentError(tool, "ArgumentError",
                                    f"argument {key!r} is not JSON-serialisable: {exc}") from None
        raise ArgumentError(tool, "ArgumentError", f"arguments are not JSON-serialisable: {exc}") from None
    if where := _non_str_key(args):
        path, key = where
        inner = "".join(f"[{part!r}]" for part in path[1:])
        held = (f"argument {path[0]!r}" + (f" (at {path[0]}{inner})" if inner else "") + " has") if path else \
            "the arguments have"
        raise ArgumentError(tool, "ArgumentError",
                            f"{held} the key {key!r} ({type(key).__name__}): arguments travel as JSON, whose keys are "
                            f"str, so it would arrive as {next(iter(loads(dumps({key: 0}))))!r}; use str keys")
    if len(data) > limit:
        raise MessageTooLarge(f"the arguments of '{tool}' are {len(data) / 2**20:.1f} MiB, over the "
                              f"{limit / 2**20:.0f} MiB message limit; raise it with Pool(max_message_mb=...)")
    return data


def _non_str_key(args: dict[str, Any]) -> tuple[tuple[Any, ...], Any] | None:
    """The first key that is not a str in the dicts of ``args``, with the path to its dict; None where every key is
    a str. JSON writes an int, float, bool or None key as a str, so ``{1: "a"}`` arrived as ``{"1": "a"}``, and
    ``{1: "a", "1": "b"}`` as ``{"1": "b"}``, a value lost without a word."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), args)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return path, key
                if isinstance(item, (dict, list, tuple)):
                    stack.append(((*path, key), item))
        else:
            stack.extend(((*path, index), item) for index, item in enumerate(value)
                         if isinstance(item, (dict, list, tuple)))
    return None


@contextlib.contextmanager
def interrupt_calls(on_interrupt: Callable[[], None]) -> Iterator[None]:
    """On KeyboardInterrupt in the block, call ``on_interrupt`` (after the block let go of its locks) and re-raise.

    A second Ctrl-C that lands while a ``Condition.wait`` takes its lock back after the first one makes it fail
    with "release unlocked lock": that is an interrupt too."""
    try:
        yield
    except KeyboardInterrupt:
        on_interrupt()
        raise
    except RuntimeError as exc:
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        on_interrupt()
        raise KeyboardInterrupt from None


class Latch:
    """A ``threading.Event`` that Ctrl-C cannot break. ``Event.wait`` takes its condition's lock in Python code, and
    a KeyboardInterrupt that lands just after the lock's acquire leaves it held: then ``set()`` (in the reader
    thread) and the cancel's own wait hang for good. Here a wait is one call that holds nothing when interrupted."""

    def __init__(self) -> None:
        self._set = False
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()  # put never waits

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        self._wake.put(None)

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        try:
            self._wake.get(timeout=timeout)
        except queue.Empty:
            return self._set
        self._wake.put(None)  # for the next waiter (one interrupted before this line: _set tells the next)
        return True


def wait_interruptibly(event: Latch, timeout: float | None, on_interrupt: Callable[[], None]) -> bool:
    """Wait for ``event`` in short slices; on KeyboardInterrupt call ``on_interrupt`` and re-raise."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with interrupt_calls(on_interrupt):
        while not event.wait(WAIT_SLICE):
            if deadline is not None and time.monotonic() >= deadline:
                return False
    return True


def show_output(output: Iterable[tuple[str, str]]) -> None:
    """Write what a call wrote on its worker, (stream, text) pairs, to the kernel's own ``sys.stdout`` /
    ``sys.stderr``, as the program's prints in the kernel go there (a notebook shows them in the cell's output)."""
    for stream, text in output:
        if stream in (WARNINGS, LOGS):
            (warn_here if stream == WARNINGS else log_here)(text)
            continue
        target = sys.stderr if stream == "stderr" else sys.stdout
        with contextlib.suppress(Exception):  # a kernel's stream that fails (closed) costs no result
            target.write(text)
            target.flush()


def warn_here(text: str) -> None:
    """Warn here the warnings a call's program made on its worker (``worker.output.forward_warnings``: one JSON
    object a line), as ``warnings.warn`` in its code would in the kernel: of its category (where the kernel has that
    class, else the nearest it has, ``UserWarning`` at least), at its file and line, and under the kernel's filters
    and the registry of its module, so one shows once per place as in the kernel, and a filter that ignores it ignores
    it. One that a filter of the kernel makes an error is written to ``sys.stderr``: its call has its result."""
    for line in text.splitlines():
        try:
            made = json.loads(line)
            category = next((cls for path in made["category"]
                             if (cls := typed.class_at(path)) is not None and issubclass(cls, Warning)), UserWarning)
            message, filename, lineno, module = made["message"], made["filename"], made["lineno"], made["module"]
        except (ValueError, KeyError, TypeError):
            _as_text(line)
            continue
        registry = vars(sys.modules[module]).setdefault("__warningregistry__", {}) \
            if module in sys.modules else _REGISTRIES.setdefault(module, {})
        try:
            warnings.warn_explicit(message, category, filename, lineno, module, registry)
        except Exception:
            with contextlib.suppress(Exception):
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno))


_REGISTRIES: dict[str | None, dict[Any, Any]] = {}  # the warnings registries of modules the kernel has not imported


def log_here(text: str) -> None:
    """Handle here the records a call logged on its worker (``worker.output.forward_log_records``: one JSON object a
    line) with the kernel's logger of their name, as a record logged in the kernel is: its level there, its
    handlers (DSPy's, which ``dspy.disable_logging()`` silences), filters and formatters decide."""
    for line in text.splitlines():
        try:
            record = logging.makeLogRecord(json.loads(line))
            logger = logging.getLogger(record.name)
        except (ValueError, TypeError, AttributeError):
            _as_text(line)
            continue
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _as_text(line: str) -> None:
    """A line of a call's warnings or log records that is not one (cut by the call's output limit): shown as it is,
    not lost."""
    with contextlib.suppress(Exception):
        sys.stderr.write(line + "\n")


class ChunkSource(Protocol):
    """A streamed call's chunks as they arrive, a batch at a time, from a backend's transport (see
    ``connection.Connection.stream``); raises a ``DspexError`` if it fails."""

    def __iter__(self) -> Iterator[list[Chunk]]: ...

    def cancel(self) -> None:
        """Stop the remote work (the iteration then ends)."""


class Flag:
    """A bool that can also be called, so ``run.done`` and a Future's ``run.done()`` both read it."""

    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def __bool__(self) -> bool:
        return self.value

    def __call__(self) -> bool:
        return self.value

    def __eq__(self, other: object) -> bool:
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


class Handle(concurrent.futures.Future):
    """What a streaming ``Run`` and a ``BatchRun`` share: done, status, error, elapsed, wait; and, as a
    ``concurrent.futures.Future``, ``concurrent.futures.wait`` / ``as_completed``, ``add_done_callback``
    and ``await`` (``asyncio.wrap_future``). ``cancel()`` stops the remote work.

    A subclass sets ``finished``, then calls ``_settle()`` when it ends, and implements ``_cancel()``.
    """

    label = ""  # what its view is titled: the program it runs
    watched = False  # a callback of the caller's takes what arrives: result() shows no view of its own

    def __init__(self) -> None:
        super().__init__()
        self._done = Latch()
        self._cancelled = False
        self._error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None

    @property  # type: ignore[override]
    def done(self) -> Flag:
        return Flag(self._done.is_set())

    @property  # type: ignore[override]
    def cancelled(self) -> Flag:
        """Whether it was cancelled (it may still be ending)."""
        return Flag(self._cancelled)

    def running(self) -> bool:
        return not self._done.is_set()

    def _settle(self) -> None:
        """It has ended: wake its waiters, then settle the Future (callbacks, ``wait``, ``as_completed``).
        An error wins over a cancel, as in ``status``."""
        self._done.set()
        if self._error is not None:
            self.set_exception(self._error)
        elif self._cancelled:
            concurrent.futures.Future.cancel(self)
            self.set_running_or_notify_cancel()
        else:
            self.set_result(None)  # the value is this handle's own ``result()``

    def cancel(self, wait: bool = True) -> bool:
        """Stop the remote work; False when it had already ended. As with a ``concurrent.futures.Future``,
        once it returns True the handle is ``done()`` and ``cancelled()`` (it waits the few milliseconds the
        remote work takes to stop, except in a thread that carries handles, such as an ``on_chunk`` callback,
        which must not wait for itself; ``wait=False``: it only asks, as for several handles at once)."""
        if self._done.is_set():
            return False
        self._cancel()
        if wait and not getattr(OWN_THREADS, "handle", False):
            self._done.wait(CANCEL_WAIT)
        return True

    def _cancel(self) -> None:
        raise NotImplementedError

    def _ipython_display_(self) -> None:
        """A handle as a cell's value: in a live notebook, a live view of it (its answer or progress as it
        comes, a Stop button) that the pump keeps current; elsewhere its repr."""
        from dspex_nb.ui.render import show_handle

        show_handle(self)

    def _view_while_waiting(self, timeout: float | None, block: bool = True) -> None:
        """Before ``result()`` blocks the notebook's main thread on a handle that no view shows yet, show one,
        so the wait has a Stop button and shows what arrives (as ``Module.batch``'s progress bar does there);
        without ``block``, show it and return (an iteration waits for each result itself)."""
        if (timeout is None and not self.watched and not self._done.is_set()
                and threading.current_thread() is threading.main_thread()):
            from dspex_nb.ui.render import view_while_waiting

            try:
                view_while_waiting(self, block)
            except KeyboardInterrupt:  # Ctrl-C before the wait began (a view takes a moment): it cancels all the same
                self.cancel()
                raise

    def _final_view(self) -> None:
        """The view that ``_view_while_waiting(block=False)`` showed, made final now that this handle has ended."""
        from dspex_nb.ui.render import flush_view

        flush_view(self)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.wait(timeout):
            raise TimeoutError(f"still running after {timeout} s")
        return self._error

    def __await__(self) -> Generator[Any, None, Any]:
        """``await run`` (or ``await batch``): its ``result()`` (or its error), without blocking the event loop."""
        return self._awaited().__await__()

    @program_errors_raised_here
    async def _awaited(self) -> Any:
        ended = self._ended_in(asyncio.get_running_loop())
        try:
            with stopped_by_sigint(self):
                # shielded: a cancel of the awaiting task leaves ``ended`` pending, and the remote work is cancelled
                # below without ``cancel()``, which would wait for it in the loop (the task raised Cancelled, not
                # CancelledError)
                await asyncio.shield(ended)
        except asyncio.CancelledError:
            if not ended.done():  # the awaiting task was cancelled (not the handle): so is the remote work
                self._cancel()
                raise
        return self.result()  # it has ended: this does not block

    def _ended_in(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of ``loop`` done when this handle ends, its value unread (``asyncio.wrap_future`` copies
        ``result()``, which decodes, in a callback of the loop, where an error left the future pending for ever)."""
        ended: asyncio.Future[None] = loop.create_future()

        def done_in_loop(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody awaits it
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))

        self.add_done_callback(done_in_loop)
        return ended

    @property
    def status(self) -> str:
        """running, done, failed or cancelled (a failure by the caller's callback counts as failed)."""
        if not self.done:
            return "running"
        if self._error is not None:
            return "failed"
        return "cancelled" if self._cancelled else "done"

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it ends; Ctrl-C cancels it. False when ``timeout`` passed first."""
        if timeout is None or timeout > 0:
            self._not_in_own_callback("wait() or result()")
        return wait_interruptibly(self._done, timeout, self.cancel)

    callback = ""  # the caller's callback it runs: on_chunk, on_item

    def _in_own_callback(self) -> bool:
        return False

    def _not_in_own_callback(self, what: str) -> None:
        """Refuse a wait for this handle in its own callback, which holds up what it would wait for: it would never
        end (a cancel() does not wait there either)."""
        if self._in_own_callback() and not self._done.is_set():
            raise RuntimeError(f"{self!r}: {what} in its own {self.callback} callback would wait for what the "
                               "callback holds up; wait once the callback has returned")


Where = tuple[int, CodeType]  # a frame running (its id, with its code: an id alone may be a later frame's)
_awaiting: dict[Handle, Where | None] = {}  # handles awaited in the main thread now: Ctrl-C cancels them (one a
# loop goes over, where it lands in that loop's frame: ``loop_stopped_by_sigint``)
_sigint_before: Any = None  # the SIGINT handler while none is


@contextlib.contextmanager
def stopped_by_sigint(handle: Handle, where: Where | None = None) -> Iterator[None]:
    """While the main thread awaits ``handle``, Ctrl-C (a kernel interrupt) cancels it at once, then goes on to
    the handler there was; with ``where``, only where it lands while that frame runs. ipykernel's handler cancels an
    async cell only once the cell has ended by itself (ipython/ipykernel#881), so ``await pool.run_async(...)``
    would run to its end."""
    global _sigint_before
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not _cancel_awaited:
        _sigint_before = signal.signal(signal.SIGINT, _cancel_awaited)
    _awaiting[handle] = where
    try:
        yield
    finally:
        _awaiting.pop(handle, None)
        if not _awaiting and signal.getsignal(signal.SIGINT) is _cancel_awaited:  # not one installed since: kept
            signal.signal(signal.SIGINT, _sigint_before)


def loop_stopped_by_sigint(handle: Handle, items: Iterator[Any]) -> Iterator[Any]:
    """``items``, for a loop over ``handle``: Ctrl-C cancels it where it lands in the loop, in the wait for the next
    item or in the loop's body, as in ``wait()``. A loop left suspended (``next(it)`` in one cell, then other
    cells) is not awaited: Ctrl-C in code that runs meanwhile, outside the frame that runs the loop, is the
    KeyboardInterrupt it is without dspex_nb, and the loop's call goes on."""
    with stopped_by_sigint(handle, _loop_frame(sys._getframe(1))):
        for item in items:
            yield item
            if handle in _awaiting:  # resumed: by the frame that runs the loop now
                _awaiting[handle] = _loop_frame(sys._getframe(1))


def _loop_frame(frame: FrameType | None) -> Where | None:
    """The frame that runs a loop over one of dspex_nb's generators, ``frame`` or a frame that called it: the first
    that is not a generator, dspex_nb's (``Run.__iter__`` goes over ``Run.arrivals``) or one between it and the loop
    (``tqdm(run)``, the notebook's own), which is suspended while the loop's body runs; None for none."""
    while frame is not None and frame.f_code.co_flags & inspect.CO_GENERATOR:
        frame = frame.f_back
    return None if frame is None else (id(frame), frame.f_code)


def _cancel_awaited(signum: int, frame: FrameType | None) -> None:
    running: set[Where] = set()  # the frames Ctrl-C landed in and those that called them
    while frame is not None:
        running.add((id(frame), frame.f_code))
        frame = frame.f_back
    for handle, where in list(_awaiting.items()):  # in a thread: this handler may run while the main thread holds a
        if where is None or where in running:  # lock
            threading.Thread(target=handle.cancel, name="dspex-sigint", daemon=True).start()
    if callable(_sigint_before):
        _sigint_before(signum, frame)


KEEP_CHUNKS = 100_000  # chunks a Run keeps by default (the latest); Run.received counts them all


class Run(Handle):
    """A streaming call in progress: iterate it, ``result()`` it, ``cancel()`` it.

    ``on_chunk`` runs in the reader thread for every chunk; returning False (or raising StopStream)
    cancels the call, like ``cancel()``.

    ``chunks`` holds the latest ``keep_chunks`` chunks (None: all of them), so memory stays flat however
    long a stream runs; ``received`` counts every chunk, and ``read(since)`` / iteration go by that count.
    """

    def __init__(self, tool: str, worker: str, source: ChunkSource, *, on_chunk: Callable[[Chunk], Any] | None,
                 on_done: Callable[[Run], None], keep_chunks: int | None = KEEP_CHUNKS) -> None:
        super().__init__()
        self.tool = tool
        self.label = tool
        self.worker = worker
        self.chunks: list[Chunk] = []
        self.keep_chunks = keep_chunks
        self.dropped = 0  # chunks no longer in ``chunks`` (the oldest, beyond keep_chunks)
        self.items = 0  # "item" chunks (batch items) received
        self._items_used: tuple[int, int, float | None] = (0, 0, None)  # their LM tokens in and out, and cost: what a
        # call that ends without its final result (cancelled, failed) used, which that result would have said
        self._source = source  # the transport's chunks (a gRPC stream, a Ray generator), errors translated
        self._on_chunk = on_chunk
        self.watched = on_chunk is not None
        self._on_done = on_done
        self._final: Any = None
        self._ended = False  # a final chunk (result or error) arrived: a stream that ends without one failed
        self.decode: Callable[[Any], Any] | None = None  # turns the final result into the caller's value
        self.on_error: Callable[[BaseException], Any] | None = None  # given its error before result() raises it
        self._outcome: tuple[bool, Any] | None = None  # decode's, once: (True, the value) or (False, its error)
        self._decoding = threading.Lock()
        self._cond = threading.Condition()
        self.first_chunk_at: float | None = None
        self._stop_by: float | None = None  # when a cancel() stops waiting for the reader (see ``cancel``)
        self._in_callback = False  # the reader is in the caller's on_chunk
        self._ending = threading.Lock()
        self._over = False  # it has ended (``_end`` ran), by its reader or by a cancel that did not wait for it
        self._reader = threading.Thread(target=self._read, name=f"run-{tool}", daemon=True)
        try:
            self._reader.start()
        except BaseException:  # Ctrl-C while it starts (start() waits for the thread): the caller never gets the
            self._cancel()  # handle that would stop the remote work, so it stops here
            raise

    # -- reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        OWN_THREADS.handle = True
        try:
            for chunks in self._source:
                self._add(chunks)
                if not self._called_back(chunks) or self._over:  # or a cancel() ended it while the callback ran:
                    return  # what comes after is not its
            if not self._ended and self._error is None:
                raise DspexError(f"the stream of tool '{self.tool}' on worker {self.worker} ended without its "
                                 "result or error")
        except DspexError as err:  # the transport failed (the worker died, a timeout...)
            if not self._cancelled:
                self._error = err
        finally:
            self._end()

    def _called_back(self, chunks: list[Chunk]) -> bool:
        """Give the chunks to ``on_chunk``; False where the reading ends: it raised StopStream (a cancel), or it
        failed (anything, a dspex error of a pool call it made included, SystemExit and asyncio.CancelledError
        too), when the remote work is stopped and its error kept for ``result()``."""
        for chunk in chunks if self._on_chunk is not None else ():
            if self._cancelled:
                break
            self._in_callback = True
            try:
                stop = self._on_chunk(chunk) is False
            except StopStream:
                self.cancel()
                return False
            except BaseException as exc:
                if not self._over:
                    self._error = exc
                self._source.cancel()
                return False
            finally:
                self._in_callback = False
            if stop:
                self.cancel()
        return True

    def _end(self) -> None:
        """It has ended: free its worker's place (``on_done``) and wake its waiters; once, whoever comes first."""
        with self._ending:
            if self._over:
                return
            self._over = True
        self.finished = time.monotonic()
        with self._cond:
            self._done.set()
            self._cond.notify_all()
        self._on_done(self)
        self._settle()

    def _add(self, chunks: list[Chunk]) -> None:
        """Keep the chunks of one message (one lock, one wake-up); note the final result or error."""
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        for chunk in chunks:
            if chunk.kind == "item":
                self.items += 1
                self._count_item(chunk.data.get("result") if chunk.data.get("ok") else None)
        show_output((chunk.data["stream"], chunk.data["text"]) for chunk in chunks if chunk.kind == "output")
        last = chunks[-1]
        if last.kind == "final":
            self._final, self._ended = last.data, True
        elif last.kind == "error" and last.is_final:
            self._error = call_error(self.tool, last.data, self.worker)
            self._ended = not isinstance(self._error, CallTimeout)  # the worker cut it short: a loop over it raises
        with self._cond:
            self.chunks.extend(chunks)
            if self.keep_chunks is not None and len(self.chunks) > 2 * self.keep_chunks:  # trim now and then
                drop = len(self.chunks) - self.keep_chunks
                del self.chunks[:drop]
                self.dropped += drop
            self._cond.notify_all()

    def _count_item(self, result: Any) -> None:
        tokens_in, tokens_out, cost = self._items_used
        item_in, item_out = typed.tokens(result)
        item_cost = typed.cost(result)
        if item_cost is not None:
            cost = (cost or 0.0) + item_cost
        self._items_used = (tokens_in + item_in, tokens_out + item_out, cost)

    @property
    def received(self) -> int:
        """Chunks received so far (kept or not)."""
        return self.dropped + len(self.chunks)

    def read(self, since: int) -> tuple[list[Chunk], int]:
        """The chunks received after the first ``since`` (those still kept) and the count to read from next."""
        with self._cond:
            start = max(since - self.dropped, 0)
            return self.chunks[start:], self.received

    # -- caller side -----------------------------------------------------------------
    callback = "on_chunk"

    def _in_own_callback(self) -> bool:
        return threading.current_thread() is self._reader

    def _cancel(self) -> None:
        """Cancel the call; the worker stops the tool (no further LM calls for it)."""
        self._cancelled = True
        if self._stop_by is None:
            self._stop_by = time.monotonic() + CANCEL_WAIT
        self._source.cancel()

    def cancel(self, wait: bool = True) -> bool:
        """As ``Handle.cancel``; where the caller's ``on_chunk`` is still running after ``CANCEL_WAIT`` seconds
        (a callback that waits for something that never comes), the run ends as cancelled without it: the remote
        work has stopped, its worker's place is free for other calls, and ``wait()`` and ``result()`` return.
        Runs cancelled together (``_cancel`` on each first, as a batch does) wait those seconds once, not each."""
        if self._done.is_set():
            return False
        self._cancel()
        if not wait or getattr(OWN_THREADS, "handle", False):  # a thread that carries handles must not wait for itself
            return True
        assert self._stop_by is not None
        if not self._done.wait(max(0.0, self._stop_by - time.monotonic())) and self._in_callback:
            self._end()
        return True

    @property
    def tokens(self) -> tuple[int, int]:
        """LM (prompt, completion) tokens the call used, once it has finished (0, 0 before, or without LM); for one
        that ended without its final result (a cancelled batch), those of the items that came back."""
        return typed.tokens(self._final) if self._final is not None else self._items_used[:2]

    @property
    def cost(self) -> float | None:
        """USD cost of the call's LM calls, once it has finished; None where no LM reported one (as ``tokens`` for a
        call that ended without its final result)."""
        return typed.cost(self._final) if self._final is not None else self._items_used[2]

    @property
    def cached(self) -> tuple[int, int]:
        """(LM calls DSPy answered from its cache, all LM calls) of the call, once it has finished; (0, 0) where
        none was a cache hit (a hit reports no tokens: nothing was billed)."""
        return typed.cached(self._final)

    @program_errors_raised_here
    def result(self, timeout: float | None = None) -> Any:
        """The final result (the data of the ``final`` chunk); raises the call's error."""
        self._view_while_waiting(timeout)
        if not self.wait(timeout):
            raise TimeoutError(f"'{self.tool}' is still running after {timeout} s (the call goes on)")
        if self._cancelled:
            raise Cancelled(f"tool '{self.tool}' on worker {self.worker} was cancelled")
        if self._error is not None:
            if self.on_error is not None:
                self.on_error(self._error)
            raise self._error
        return self.decoded()

    def decoded(self) -> Any:
        """The final result as ``decode`` makes it (the program's own value), made once: decoding also does in the
        kernel what the call did there (its LM calls join DSPy's history, the changes of its LMs are set on the
        kernel's), which must happen once, whoever asks first (``result()``, the view, the end of a loop over the
        run). Raises what decoding raised."""
        with self._decoding:
            if self._outcome is None:
                try:
                    self._outcome = True, self._final if self.decode is None else self.decode(self._final)
                except Exception as exc:  # NotPortable...: each asker gets it
                    self._outcome = False, exc
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def _settle_effects(self) -> None:
        """At the end of a loop over the run: what ``result()`` does in the kernel besides giving the value, so that
        a stream read to its end and never asked for its result leaves DSPy's history and the LMs as the call left
        them, as the same call does in the kernel (a DummyLM given a list gives its next answer next); an error
        decoding is kept for ``result()``."""
        if self._cancelled or not self._ended:
            return
        if self._error is not None:
            if self.on_error is not None:
                self.on_error(self._error)
        elif self.decode is not None:
            with contextlib.suppress(Exception):
                self.decoded()

    def _raise_if_cut(self) -> None:
        """Raise the error that ended the stream before its final chunk (its worker died, a timeout, the
        ``on_chunk`` callback failed), so an iteration does not end quietly on a truncated answer; a stream
        that ended with its result or error chunk, or was cancelled, ends the iteration as it is."""
        if self._error is not None and not self._ended and not self._cancelled:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        """``async for chunk in run``: every chunk, from the first, without blocking the event loop; raises the
        call's error where the stream was cut short (``WorkerDied``...)."""
        index = 0
        while True:
            done = self.done  # read before the chunks, so the last ones are always seen
            chunks, index = self.read(index)
            for chunk in chunks:
                yield chunk
            if done and not chunks:
                self._raise_if_cut()
                self._settle_effects()
                return
            if not chunks:
                await asyncio.to_thread(self._wait_for, index)

    def _wait_for(self, index: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.received > index or self.done, timeout=WAIT_SLICE * 5)

    def __iter__(self) -> Iterator[Chunk]:
        """Every chunk, from the first, as it arrives; ends with the stream, raising the call's error where the
        stream was cut short (``WorkerDied``...). Ctrl-C cancels."""
        yield from self.arrivals(stacklevel=3)
        self._raise_if_cut()
        self._settle_effects()

    def arrivals(self, stacklevel: int = 2) -> Iterator[Chunk]:
        """Every chunk, from the first, as it arrives; ends quietly with the stream, however it ended
        (``result()`` says how). Ctrl-C cancels."""
        yield from loop_stopped_by_sigint(self, self._arrivals(stacklevel + 2))

    def _arrivals(self, stacklevel: int) -> Iterator[Chunk]:
        index, warned = 0, False
        while True:
            # cancel() outside the lock: it waits for the stream's end, which the stream's reader marks under it
            # (Ctrl-C kept the cell busy for the 5 s cancel() gives a callback, and left the call running)
            with interrupt_calls(self.cancel), self._cond:
                while index >= self.received and not self.done:
                    self._not_in_own_callback("an iteration")
                    self._cond.wait(WAIT_SLICE)
                if index >= self.received:
                    return
                if index < self.dropped:  # a reader slower than keep_chunks skips what was dropped: says so, once
                    if not warned:
                        warnings.warn(f"this iteration of {self!r} fell {self.dropped - index} chunks behind; they "
                                      f"were dropped (keep_chunks={self.keep_chunks}: execute_stream(..., "
                                      "keep_chunks=None) keeps all)", ChunksDropped, stacklevel=stacklevel)
                    index, warned = self.dropped, True
                chunk = self.chunks[index - self.dropped]
            index += 1
            yield chunk

    def __repr__(self) -> str:
        return f"<Run {self.tool!r} on {self.worker}: {self.status}, {count(self.received, 'chunk')}>"


__all__ = ["Chunk", "Run", "ToolError", "encode_args", "wait_interruptibly"]
