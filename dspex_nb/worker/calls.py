"""One tool call on a worker, whatever carries it (gRPC here, a Ray actor method there).

``Call.batches`` runs the tool in a producer thread that encodes each chunk as it comes (the JSON array
``[seq, kind, data, is_final]``), puts it on a bounded queue, and hands out whatever has accumulated as one
message: the JSON array of those chunks (the proto's ``ChunkBatch.chunks_json``). A fast producer thus
costs one message, and one JSON decode in the kernel, per batch rather than per chunk. After the first
message, each waits ``LINGER`` (10 ms) for chunks to join it: a fast stream of tokens then costs the worker's
threads, which DSPy's streaming keeps busy, one wake-up per message rather than per token, and the kernel
one decode; a token's way is at most 10 ms longer (none for the first, nor for the end of a stream: the
final chunk cuts the wait short).
Cancelling sets the tool's ``ctx.cancelled``; the producer then closes the tool's generator.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import functools
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from dspex_nb import redact, typed
from dspex_nb.errors import CallTimeout, ResultTooLarge, ToolError, builtin_fields
from dspex_nb.wire import LOGS, WARNINGS, dumps, loads
from dspex_nb.worker import tools
from dspex_nb.worker.output import CALL_OUTPUT, CallOutput, Send, masked
from dspex_nb.worker.state import WorkerState

MAX_CHUNKS_PER_MESSAGE = 2048
LINGER = 0.01  # seconds a stream's message waits for more chunks to join it (not the first message)
MESSAGE_OVERHEAD = 64 * 1024  # bytes kept free in every message for protobuf framing
QUEUE_BYTES = 8 * 2**20  # chunks a stream may have waiting for a slow consumer before its tool waits
MAX_ATTRIBUTES = 64_000  # characters of an error's attributes (as JSON) kept: those that do not fit are left out
MAX_TRACEBACK = 100_000  # characters of an error's traceback kept: one that quotes a huge message must not make
# the error itself too large to send (it was a MessageTooLarge instead of the program's error)
MAX_GROUP = 4 * MAX_ATTRIBUTES  # characters of an exception group's sub-exceptions (as JSON) that come back
MAX_GROUP_DEPTH = 10  # groups nested deeper come back without their sub-exceptions (as traceback's max_group_depth)
_BASE_GROUP: Any = vars(builtins).get("BaseExceptionGroup")  # Python 3.11+
_DONE = object()
OUTPUT_CHUNK = 64 * 1024  # characters of output in one chunk, at most (a longer warning or log record line goes whole):
# JSON escapes may make it 6 times as long


class Output:
    """An "output" chunk still in a stream's queue: the text a call wrote to one stream since its last chunk, which
    later writes to that stream join while it is the queue's last item (``ChunkQueue.put_output``)."""

    __slots__ = ("seq", "stream", "parts", "size")

    def __init__(self, seq: int, stream: str, text: str) -> None:
        self.seq, self.stream, self.parts, self.size = seq, stream, [text], len(text)

    def encode(self) -> bytes:
        text = masked(self.stream, "".join(self.parts))
        return b'[%d,"output",%s,false]' % (self.seq, dumps({"stream": self.stream, "text": text}))


class ChunkQueue:
    """The chunks of one stream between the tool (producer) and the RPC (consumer), bounded in bytes.

    When the consumer is slower than the tool (a client that does not read, or reads slowly), ``put``
    waits once ``limit`` bytes are queued, so the tool pauses instead of the worker's memory growing;
    ``take`` hands out what fits in one message (by count and by bytes).
    """

    def __init__(self, limit: int, on_wait: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self._on_wait = on_wait  # called each time the producer has to wait (counted in Describe)
        self._items: collections.deque[Any] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition(threading.Lock())  # not re-entered: a Lock is cheaper than an RLock
        self._ended = threading.Event()  # the last item is queued: a lingering ``take`` goes at once

    @staticmethod
    def _size(item: Any) -> int:
        if type(item) is bytes:
            return len(item) + 1  # its comma in the message
        return 0 if item is _DONE else item.size + 1

    def _wait_for_room(self, ended: threading.Event) -> None:
        """Wait (holding the condition) while the queue is full, until it has room or the RPC has ended."""
        if self._bytes >= self.limit:
            self._on_wait()
        while self._bytes >= self.limit and not ended.is_set():
            self._cond.wait(0.2)

    def put(self, item: Any, ended: threading.Event) -> None:
        """Queue ``item``, waiting while the queue is full (until it has room, or the RPC has ended)."""
        with self._cond:
            if self._bytes >= self.limit and item is not _DONE:
                self._wait_for_room(ended)
            self._items.append(item)
            self._bytes += self._size(item)
            self._cond.notify_all()
        if item is _DONE:
            self._ended.set()

    def end_with(self, item: bytes) -> None:
        """Queue ``item`` and the stream's end at once, without waiting for room (the consumer calls it): a chunk
        the producer queues after them is never taken."""
        with self._cond:
            self._items.extend((item, _DONE))
            self._bytes += self._size(item)
            self._cond.notify_all()
        self._ended.set()

    def put_output(self, stream: str, text: str, ended: threading.Event, seq: Iterator[int]) -> None:
        """Queue text the call wrote to ``stream``: it joins the queue's last item where that is output of the same
        stream not yet taken (many prints, one chunk), up to ``OUTPUT_CHUNK`` characters a chunk. Text cut across
        chunks is masked before it is cut (``Output.encode`` masks a chunk's own text: a secret cut in two would
        be masked in neither). The warnings and log records streams, JSON a line, are cut at lines' ends only: a
        line cut in two is JSON in neither chunk, and the kernel could show it as text only."""
        lines = stream in (WARNINGS, LOGS)
        with self._cond:
            tail = self._items[-1] if self._items else None
            room = OUTPUT_CHUNK - tail.size if isinstance(tail, Output) and tail.stream == stream else OUTPUT_CHUNK
            if len(text) > max(room, 0) and not lines:
                text = redact.text(text, limit=None)
            while text:
                tail = self._items[-1] if self._items else None
                if isinstance(tail, Output) and tail.stream == stream and tail.size < OUTPUT_CHUNK and \
                        (end := _cut(text, OUTPUT_CHUNK - tail.size, lines)):
                    part, text = text[:end], text[end:]
                    tail.parts.append(part)
                    tail.size += len(part)
                    self._bytes += len(part)
                    continue
                self._wait_for_room(ended)
                end = _cut(text, OUTPUT_CHUNK, lines) or text.find("\n") + 1 or len(text)  # a longer line: whole
                item = Output(next(seq), stream, text[:end])
                text = text[end:]
                self._items.append(item)
                self._bytes += self._size(item)
            self._cond.notify_all()

    def _head(self) -> Any:
        """The queue's first item, made bytes where it is output (no more text joins it then)."""
        head = self._items[0]
        if type(head) is Output:
            self._items[0] = head.encode()
            self._bytes += self._size(self._items[0]) - self._size(head)
        return self._items[0]

    def take(self, count: int, budget: int, timeout: float, linger: float = 0.0) -> list[Any]:
        """Up to ``count`` chunks whose sizes add up to at most ``budget`` (at least one); [] after ``timeout``.
        Having found fewer than ``count``, it first waits ``linger`` seconds for more to join them, or until the
        stream's end is queued."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: self._items, timeout):
                return []
            more = linger and len(self._items) < count and self._items[-1] is not _DONE
        if more:  # not a wait on the condition: the producer's puts do not wake this thread each time
            self._ended.wait(linger)
        with self._cond:
            head = self._items[0]
            size = self._size(head if type(head) is not Output else self._head())
            batch = [self._items.popleft()]
            while self._items and len(batch) < count and batch[-1] is not _DONE:
                head = self._items[0]
                nxt = self._size(head if type(head) is not Output else self._head())
                if size + nxt > budget:
                    break
                batch.append(self._items.popleft())
                size += nxt
            self._bytes -= size
            self._cond.notify_all()
            return batch


def _cut(text: str, room: int, lines: bool) -> int:
    """How much of ``text`` goes into a chunk with ``room`` characters left: what fits, or, of a stream of ``lines``,
    the whole lines that fit."""
    if not lines or len(text) <= room:
        return min(len(text), room)
    return text.rfind("\n", 0, room) + 1


def message_of(exc: BaseException) -> str:
    """``str(exc)``, masked and shortened; where user code's ``__str__`` fails, a line that says so (as a
    traceback does), so that the error is still reported with its type."""
    try:
        message = str(exc)
    except BaseException as failure:  # anything user code raises there
        message = f"<the exception's str() failed: {type(failure).__name__}>"
    return redact.text(message)


def error_info(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """type / message / traceback of an exception, as the client will see them, its classes (``bases``: the
    kernel raises it as the first of them it has, see ``errors.remote_error``), its plain ``attributes`` and, for
    an exception group, its ``group`` (``_group``). ``depth``: how deep in a group it is; one inside a group has no
    traceback of its own, as the group's shows it."""
    if issubclass(type(exc), ToolError):  # not isinstance: that reads the exception's __class__, user code
        return {"type": exc.type, "message": redact.text(exc.message), "traceback": ""}
    exc = _as_raised(exc)
    info: dict[str, Any] = {"type": type(exc).__name__, "message": message_of(exc),
                            "traceback": "" if depth else _traceback_of(exc)}
    for key, part in (("bases", _bases), ("attributes", _attributes), ("args", _args),
                      ("group", functools.partial(_group, depth=depth))):
        try:  # the program's classes' code runs there (a __dict__ or __module__ that raises, SystemExit too): it
            value = part(exc)  # goes without them
        except BaseException:
            continue
        if value is not None and value != {}:  # no args is [], which is kept: the kernel's error then has none
            info[key] = value
    return info


def _as_raised(exc: BaseException) -> BaseException:
    """The ``StopIteration`` the program raised where Python made it a RuntimeError ("generator raised
    StopIteration", PEP 479) as it left one of the worker's own generators, which a call runs the program in: the
    kernel sees it as the program's call raises it there. One that left the program's own generator stays the
    RuntimeError, as it is in the kernel too."""
    try:
        cause, tb = exc.__cause__, exc.__traceback__  # a property of the program's class may stand there
    except BaseException:
        return exc
    if type(exc) is not RuntimeError or not isinstance(cause, StopIteration) or tb is None:
        return exc
    while tb.tb_next is not None:  # the generator it left is the traceback's last frame
        tb = tb.tb_next
    return cause if tb.tb_frame.f_code.co_filename.startswith(_PACKAGE) else exc


def _group(exc: BaseException, depth: int) -> dict[str, Any] | None:
    """An exception group's ``message`` and its ``exceptions`` (their ``error_info``), read as Python's own
    fields (not a subclass's properties); None for another exception, one nested deeper than ``MAX_GROUP_DEPTH``,
    or one whose sub-exceptions do not fit in ``MAX_GROUP`` characters even without their attributes and args
    (the kernel's error is then not a group; the traceback still lists them)."""
    if _BASE_GROUP is None or not issubclass(type(exc), _BASE_GROUP) or depth >= MAX_GROUP_DEPTH:
        return None
    group = {"message": redact.text(vars(_BASE_GROUP)["message"].__get__(exc)),
             "exceptions": [error_info(sub, depth + 1) for sub in vars(_BASE_GROUP)["exceptions"].__get__(exc)]}
    if len(dumps(group)) > MAX_GROUP:
        group = _without_attributes(group)
    return group if len(dumps(group)) <= MAX_GROUP else None


def _without_attributes(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with no attributes or args in its sub-exceptions' infos, nested groups' included."""
    exceptions = [{key: _without_attributes(value) if key == "group" else value for key, value in sub.items()
                   if key not in ("attributes", "args")} for sub in group["exceptions"]]
    return {**group, "exceptions": exceptions}


def _traceback_of(exc: BaseException) -> str:
    """The exception's traceback as Python prints it, from the program's call on, masked and shortened; where
    user code makes formatting it fail (a ``__notes__`` or ``__cause__`` property that raises), a line that says
    so, as ``message_of`` does for its str() (whatever it raises: a SystemExit there left the call unanswered)."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, _from_the_program(exc)))
    except BaseException as failure:
        text = f"<the exception's traceback could not be formatted: {type(failure).__name__}>\n"
    return redact.text(text, limit=MAX_TRACEBACK)


def _bases(exc: BaseException) -> list[str]:
    """The exception's classes as "module:qualname", its own first, up to BaseException (not included)."""
    return [f"{cls.__module__}:{cls.__qualname__}" for cls in type(exc).__mro__[:-2]]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # dspex_nb's own directory


def _from_the_program(exc: BaseException) -> TracebackType | None:
    """The exception's traceback from its first frame outside dspex_nb (the program's call, as a traceback in the
    kernel starts there); all of it where every frame is dspex_nb's (an error of a tool itself)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return exc.__traceback__ if tb is None or tb.tb_frame.f_code.co_filename.startswith(_PACKAGE) else tb


def _args(exc: BaseException) -> list[Any] | None:
    """The exception's ``args`` where its str() shows them (``_shows_its_args``), each is a plain JSON value
    (``typed.plain``), masked, and they fit in ``MAX_ATTRIBUTES`` characters; None otherwise (the kernel's error
    then has the message as its one arg)."""
    if not _shows_its_args(exc):
        return None
    args = list(exc.args)
    if not typed.plain(args) or len(dumps(args)) > MAX_ATTRIBUTES:  # measured first: masking 50 MB takes seconds
        return None
    masked = redact.mapping(args)
    return masked if len(dumps(masked)) <= MAX_ATTRIBUTES else None


_SHOW_EVERY_ARG = (KeyError, OSError, ImportError)  # Python's classes whose own str() shows all args, reworded


def _shows_its_args(exc: BaseException) -> bool:
    """Whether ``str(exc)`` shows all of ``exc.args``, as ``BaseException.__str__`` does; not where a class of the
    program's words them otherwise (``AuthError("sk-...")`` showing "auth failed"): args it keeps from str() must
    not reach the kernel's repr, where the worker showed only str()."""
    if type(exc).args is not BaseException.args:  # a property of its own
        return False
    shows = next(cls for cls in type(exc).__mro__ if "__str__" in vars(cls))
    if shows in _SHOW_EVERY_ARG:
        return True
    try:
        return str(exc) == BaseException.__str__(exc)
    except BaseException:  # its __str__ failed
        return False


def _attributes(exc: BaseException) -> dict[str, Any]:
    """The exception's own attributes (its built-in classes' fields, ``builtin_fields``, then its ``__dict__``'s)
    that are plain JSON values (``typed.plain``), public names only, masked as its message is (an LM's error may
    quote a key); in order, as many as fit in ``MAX_ATTRIBUTES`` characters. One named as a secret
    (``api_key``, but also a ``key`` of a lookup) is left out: in the kernel it is missing (AttributeError),
    never there with another value."""
    items = [(name, getattr(exc, name, None)) for name in builtin_fields(type(exc))]
    with contextlib.suppress(TypeError):  # no __dict__
        items += vars(exc).items()
    kept: dict[str, Any] = {}
    budget = MAX_ATTRIBUTES
    for name, value in items:
        if not isinstance(name, str) or name.startswith("_") or redact.is_secret_name(name) or not typed.plain(value):
            continue
        if len(dumps(value)) > budget:  # measured first: masking 50 MB takes seconds
            continue
        masked = {name: redact.mapping(value)}
        size = len(dumps(masked))
        if size <= budget:
            kept.update(masked)
            budget -= size
    return kept


def drive(gen: Iterator[tools.Emit], ctx: tools.ToolContext, on_emit: Callable[[tools.Emit], None]) -> Any:
    """Run a tool generator to its end (or until cancelled); return its final result. A call cancelled before it
    got here (it waited for a thread of the worker, its caller cancelled at once) never starts the tool."""
    try:
        while not ctx.cancelled.is_set():
            try:
                emit = next(gen)
            except StopIteration as stop:
                return stop.value
            if ctx.cancelled.is_set():
                return None
            on_emit(emit)
        return None
    finally:
        gen.close()


class capturing:  # noqa: N801  (a class, as ``WorkerState.track``: a generator's context manager costs more)
    """The block's output, and that of the threads it starts (``dspy_tools._threads_see_the_calls_settings``),
    given to ``send`` (``CallOutput``) until the block ends."""

    __slots__ = ("_output", "_token")

    def __init__(self, send: Send) -> None:
        self._output = CallOutput(send)

    def __enter__(self) -> None:
        self._token = CALL_OUTPUT.set(self._output)

    def __exit__(self, *exc: object) -> None:
        self._output.close()
        CALL_OUTPUT.reset(self._token)


class Collected:
    """A unary call's output: the writes to one stream in a row joined."""

    def __init__(self) -> None:
        self._runs: list[tuple[str, list[str]]] = []

    def add(self, stream: str, text: str) -> None:
        if not self._runs or self._runs[-1][0] != stream:
            self._runs.append((stream, []))
        self._runs[-1][1].append(text)

    def pairs(self) -> list[tuple[str, str]]:
        return [(stream, masked(stream, "".join(parts))) for stream, parts in self._runs]


class Deadline:
    """A call's ``timeout``, kept where its work runs: from the call's arrival, less what it ``waited`` in the pool's
    queue. It expires the call only while its tool still runs: a result made in time is the call's, however long its
    reader takes to read it."""

    def __init__(self, timeout: float | None, waited: float = 0.0) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + max(0.0, timeout - waited)
        self._lock = threading.Lock()
        self._outcome = ""  # "ended" (the tool ended first) or "expired"

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def end(self) -> bool:
        """The tool ended: True where that was in time (its result or error is the call's)."""
        with self._lock:
            self._outcome = self._outcome or "ended"
            return self._outcome == "ended"

    def expire(self) -> bool:
        """The timeout passed: True where the tool was still running (the call ends with ``CallTimeout``)."""
        with self._lock:
            self._outcome = self._outcome or "expired"
            return self._outcome == "expired"

    def error(self, tool: str) -> dict[str, Any]:
        """The call's ``CallTimeout``, as ``error_info`` (the kernel raises it as it is: ``errors.call_error``)."""
        return error_info(CallTimeout(f"tool '{tool}' did not finish within its timeout of {self.timeout:g} s; "
                                      "the remote work was cancelled"))


class Call:
    """A tool call: its context (``ctx.cancelled``) and how to run it unary or as batches of chunks, in the kernel's
    working directory ``cwd``, within its ``deadline``."""

    def __init__(self, state: WorkerState, tool: str, args_json: bytes, session_id: str, streaming: bool,
                 deadline: Deadline | None = None, cwd: str = "") -> None:
        self.state = state
        self.tool = tool
        self.args_json = args_json
        self.ctx = tools.ToolContext(streaming=streaming, session_id=session_id, worker=state)
        self.deadline = deadline or Deadline(None)
        self.cwd = cwd

    def _args(self) -> tuple[tools.Tool, Any]:
        tool = tools.get_tool(self.tool)
        try:
            return tool, loads(self.args_json) if self.args_json else {}
        except ValueError as exc:
            raise ToolError(self.tool, "ArgumentError", f"arguments are not valid JSON: {exc}") from None

    def _start(self) -> Iterator[tools.Emit]:
        tool, args = self._args()
        return tool.run(args, self.ctx)

    def error_info(self, exc: BaseException) -> dict[str, Any]:
        """``error_info`` of the call's error, with the changes its LMs made before it (``lm_state``), which the
        kernel sets on its LMs as it sets a result's."""
        info = error_info(exc)
        return {**info, "lm_state": self.ctx.lm_state} if self.ctx.lm_state else info

    def encode(self, value: Any, what: str) -> bytes:
        try:
            data = dumps(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None
        if len(data) > self.state.max_message_bytes - MESSAGE_OVERHEAD:
            raise ResultTooLarge("", "ResultTooLarge", f"{what} is {len(data) / 2**20:.1f} MiB, over the "
                                 f"{self.state.max_message_bytes / 2**20:.0f} MiB message limit; raise it "
                                 "with Pool(max_message_mb=...)")
        return data

    def unary(self) -> tuple[bytes | None, dict[str, Any] | None, list[tuple[str, str]]]:
        """(the result as JSON, None, output), or (None, the error's type / message / traceback, output); output:
        what the call wrote, as (stream, text) pairs, masked. With a deadline, the tool runs in a thread of its own, so
        that the call answers ``CallTimeout`` when it passes, also while the program is in a call that does not see
        its cancel (a ``time.sleep``), and the program, cancelled, goes on there as a cancelled program does."""
        if self.deadline.at is None:
            return self._unary()
        replies: list[tuple[bytes | None, dict[str, Any] | None, list[tuple[str, str]]]] = []

        def run() -> None:
            reply = self._unary()
            if self.deadline.end():
                replies.append(reply)

        thread = threading.Thread(target=run, name=f"tool-{self.tool}", daemon=True)
        thread.start()
        while thread.is_alive() and not self.ctx.cancelled.is_set() and (left := self.deadline.remaining()):
            thread.join(min(left, 0.2))  # a caller that went away (Ctrl-C) frees this thread at once
        if not self.deadline.expire():  # it ended in time: its reply is being kept, or is
            thread.join()
            return replies[0]
        self.ctx.cancelled.set()
        return None, self.deadline.error(self.tool), []

    def _unary(self) -> tuple[bytes | None, dict[str, Any] | None, list[tuple[str, str]]]:
        output = Collected()
        with self.state.track(self.ctx.cancelled):
            with capturing(output.add):  # its end sends the text of a line not ended
                try:
                    self.state.enter(self.cwd)
                    tool, args = self._args()
                    result = drive(tool.run(args, self.ctx), self.ctx, lambda emit: None) if tool.streaming \
                        else tool.call(args, self.ctx)  # a plain function: no generator to drive
                    reply: tuple[bytes | None, dict[str, Any] | None] = self.encode(result, "the result"), None
                except BaseException as exc:  # SystemExit, KeyboardInterrupt... from user code: an error
                    reply = None, self.error_info(exc)
            return *reply, output.pairs()

    def batches(self, ended: threading.Event, active: Callable[[], bool]) -> Iterator[bytes]:
        """The chunks, a message (a JSON array of chunks) at a time, until the final (or error) chunk;
        ``ended`` is set by the carrier when the call is over on its side (read to the end, cancelled, or the
        caller went away), and ``active()`` says whether the caller is still there."""
        chunks = ChunkQueue(QUEUE_BYTES, lambda: self.state.count("stream_producer_waits"))
        seq = iter(range(2**63))

        def chunk(kind: str, value: Any, is_final: bool = False) -> bytes:
            try:
                data = self.encode(value, f"a {kind} chunk")
            except (TypeError, ResultTooLarge) as exc:
                kind, is_final = "error", True
                data = dumps(error_info(exc))
            return b'[%d,"%s",%s,%s]' % (next(seq), kind.encode(), data, b"true" if is_final else b"false")

        def output(stream: str, text: str) -> None:
            chunks.put_output(stream, text, ended, seq)

        def produce() -> None:
            with self.state.track(self.ctx.cancelled):
                try:
                    with capturing(output):
                        self.state.enter(self.cwd)
                        final = drive(self._start(), self.ctx,
                                      lambda emit: chunks.put(chunk(emit.kind, emit.data), ended))
                    if self.deadline.end() and not self.ctx.cancelled.is_set():
                        chunks.put(chunk("final", final, is_final=True), ended)
                except BaseException as exc:  # SystemExit, GeneratorExit... from user code: an error chunk
                    if self.deadline.end():
                        chunks.put(chunk("error", self.error_info(exc), is_final=True), ended)
                finally:
                    chunks.put(_DONE, ended)

        def expire() -> None:
            """The deadline passed: a tool still running is cancelled, and the stream ends with its CallTimeout
            after the chunks it made in time."""
            if self.deadline.passed() and self.deadline.expire():
                self.ctx.cancelled.set()
                chunks.end_with(chunk("error", self.deadline.error(self.tool), is_final=True))

        threading.Thread(target=produce, name=f"tool-{self.tool}", daemon=True).start()
        budget = self.state.max_message_bytes - MESSAGE_OVERHEAD
        linger = 0.0  # the first chunk (a first token) goes at once
        while True:
            expire()
            remaining = self.deadline.remaining()  # None, or 0 once passed (the stream's end is queued, or coming)
            batch = chunks.take(MAX_CHUNKS_PER_MESSAGE, budget, timeout=min(0.5, remaining or 0.5), linger=linger)
            if not batch:
                if not active():
                    return
                continue
            done = batch[-1] is _DONE
            if done:
                batch.pop()
            if batch:
                yield b"[" + b",".join(batch) + b"]"
                linger = LINGER
            if done:
                return
