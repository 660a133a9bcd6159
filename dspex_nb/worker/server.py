"""The gRPC servicer: thin over the tool registry.

``ExecuteStream`` runs the tool in a producer thread that puts chunks on a queue;
the RPC handler sends whatever has accumulated as one ``ChunkBatch``, so a fast
producer costs one message per batch rather than per chunk. Cancellation is gRPC's
own: the call's callback sets the tool's ``ctx.cancelled`` and the producer closes
the tool's generator.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from dspex_nb import redact
from dspex_nb._proto import bridge_pb2, bridge_pb2_grpc
from dspex_nb.errors import ResultTooLarge, ToolError
from dspex_nb.worker import tools
from dspex_nb.worker.state import WorkerState, rss_bytes

MAX_CHUNKS_PER_MESSAGE = 512
MESSAGE_OVERHEAD = 64 * 1024  # bytes kept free in every message for protobuf framing
QUEUE_BYTES = 8 * 2**20  # chunks a stream may have waiting for a slow consumer before its tool waits
_DONE = object()


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
        self._cond = threading.Condition()

    @staticmethod
    def _size(item: Any) -> int:
        return 0 if item is _DONE else len(item.data_json) + 32

    def put(self, item: Any, ended: threading.Event) -> None:
        """Queue ``item``, waiting while the queue is full (until it has room, or the RPC has ended)."""
        with self._cond:
            if self._bytes >= self.limit and item is not _DONE:
                self._on_wait()
            while self._bytes >= self.limit and item is not _DONE and not ended.is_set():
                self._cond.wait(0.2)
            self._items.append(item)
            self._bytes += self._size(item)
            self._cond.notify_all()

    def take(self, count: int, budget: int, timeout: float) -> list[Any]:
        """Up to ``count`` chunks whose sizes add up to at most ``budget`` (at least one); [] after ``timeout``."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: self._items, timeout):
                return []
            batch = [self._items.popleft()]
            size = self._size(batch[0])
            while self._items and len(batch) < count and batch[-1] is not _DONE:
                nxt = self._size(self._items[0])
                if size + nxt > budget:
                    break
                batch.append(self._items.popleft())
                size += nxt
            self._bytes -= size
            self._cond.notify_all()
            return batch


def error_info(exc: BaseException) -> dict[str, str]:
    """type / message / traceback of an exception, as the client will see them."""
    if isinstance(exc, ToolError):
        return {"type": exc.type, "message": redact.text(exc.message), "traceback": ""}
    return {"type": type(exc).__name__, "message": redact.text(str(exc)),
            "traceback": redact.text("".join(traceback.format_exception(exc)), limit=None)}


def drive(gen: Iterator[tools.Emit], ctx: tools.ToolContext, on_emit: Callable[[tools.Emit], None]) -> Any:
    """Run a tool generator to its end (or until cancelled); return its final result."""
    try:
        while True:
            try:
                emit = next(gen)
            except StopIteration as stop:
                return stop.value
            if ctx.cancelled.is_set():
                return None
            on_emit(emit)
    finally:
        gen.close()


class Bridge(bridge_pb2_grpc.BridgeServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def Ping(self, request: bridge_pb2.PingRequest, context: grpc.ServicerContext) -> bridge_pb2.PingReply:
        return bridge_pb2.PingReply(pid=os.getpid(), worker_id=self.state.worker_id, run_id=self.state.run_id,
                                    rss_bytes=rss_bytes())

    def Describe(self, request: bridge_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> bridge_pb2.DescribeReply:
        info = self.state.describe()
        info["tools"] = [t.schema() for t in sorted(tools.REGISTRY.values(), key=lambda t: t.name)]
        return bridge_pb2.DescribeReply(json=json.dumps(info).encode())

    def _start(self, request: bridge_pb2.ExecuteRequest, context: grpc.ServicerContext,
               streaming: bool) -> tuple[Iterator[tools.Emit], tools.ToolContext]:
        ctx = tools.ToolContext(streaming=streaming, session_id=request.session_id, worker=self.state)
        if not context.add_callback(ctx.cancelled.set):  # the call ended (cancelled) before it got here
            ctx.cancelled.set()
        tool = tools.get_tool(request.tool)
        try:
            args = json.loads(request.args_json) if request.args_json else {}
        except ValueError as exc:
            raise ToolError(request.tool, "ArgumentError", f"arguments are not valid JSON: {exc}") from None
        return tool.run(args, ctx), ctx

    def _encode(self, value: Any, what: str) -> bytes:
        try:
            data = json.dumps(value).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None
        if len(data) > self.state.max_message_bytes - MESSAGE_OVERHEAD:
            raise ResultTooLarge("", "ResultTooLarge", f"{what} is {len(data) / 2**20:.1f} MiB, over the "
                             f"{self.state.max_message_bytes / 2**20:.0f} MiB message limit; raise it "
                             "with Pool(max_message_mb=...)")
        return data

    def Execute(self, request: bridge_pb2.ExecuteRequest,
                context: grpc.ServicerContext) -> bridge_pb2.ExecuteReply:
        with self.state.track():
            try:
                gen, ctx = self._start(request, context, streaming=False)
                final = drive(gen, ctx, lambda emit: None)
                return bridge_pb2.ExecuteReply(result_json=self._encode(final, "the result"))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt... from user code: an error, not our end
                return bridge_pb2.ExecuteReply(error=bridge_pb2.ToolError(**error_info(exc)))

    def ExecuteStream(self, request: bridge_pb2.ExecuteRequest,
                      context: grpc.ServicerContext) -> Iterator[bridge_pb2.ChunkBatch]:
        chunks = ChunkQueue(QUEUE_BYTES, lambda: self.state.count("stream_producer_waits"))
        seq = iter(range(2**63))

        def chunk(kind: str, value: Any, is_final: bool = False) -> bridge_pb2.Chunk:
            try:
                data = self._encode(value, f"a {kind} chunk")
            except (TypeError, ResultTooLarge) as exc:
                kind, is_final = "error", True
                data = json.dumps(error_info(exc)).encode()
            return bridge_pb2.Chunk(seq=next(seq), kind=kind, data_json=data, is_final=is_final)

        ended = threading.Event()  # the RPC is over (read to the end, cancelled, or the client went away)
        context.add_callback(ended.set)

        def produce() -> None:
            with self.state.track():
                try:
                    gen, ctx = self._start(request, context, streaming=True)
                    final = drive(gen, ctx, lambda emit: chunks.put(chunk(emit.kind, emit.data), ended))
                    if not ctx.cancelled.is_set():
                        chunks.put(chunk("final", final, is_final=True), ended)
                except BaseException as exc:  # SystemExit, GeneratorExit... from user code: an error chunk
                    chunks.put(chunk("error", error_info(exc), is_final=True), ended)
                finally:
                    chunks.put(_DONE, ended)

        threading.Thread(target=produce, name=f"tool-{request.tool}", daemon=True).start()
        budget = self.state.max_message_bytes - MESSAGE_OVERHEAD
        while True:
            batch = chunks.take(MAX_CHUNKS_PER_MESSAGE, budget, timeout=0.5)
            if not batch:
                if not context.is_active():
                    return
                continue
            done = batch[-1] is _DONE
            if done:
                batch.pop()
            if batch:
                yield bridge_pb2.ChunkBatch(chunks=batch)
            if done:
                return
