"""The gRPC servicer: thin over the tool registry.

``ExecuteStream`` runs the tool in a producer thread that puts chunks on a queue;
the RPC handler sends whatever has accumulated as one ``ChunkBatch``, so a fast
producer costs one message per batch rather than per chunk. Cancellation is gRPC's
own: the call's callback sets the tool's ``ctx.cancelled`` and the producer closes
the tool's generator.
"""

from __future__ import annotations

import json
import os
import queue
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
_DONE = object()


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
        if len(data) > self.state.max_message_bytes:
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
            except Exception as exc:
                return bridge_pb2.ExecuteReply(error=bridge_pb2.ToolError(**error_info(exc)))

    def ExecuteStream(self, request: bridge_pb2.ExecuteRequest,
                      context: grpc.ServicerContext) -> Iterator[bridge_pb2.ChunkBatch]:
        chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        seq = iter(range(2**63))

        def chunk(kind: str, value: Any, is_final: bool = False) -> bridge_pb2.Chunk:
            try:
                data = self._encode(value, f"a {kind} chunk")
            except (TypeError, ResultTooLarge) as exc:
                kind, is_final = "error", True
                data = json.dumps(error_info(exc)).encode()
            return bridge_pb2.Chunk(seq=next(seq), kind=kind, data_json=data, is_final=is_final)

        def produce() -> None:
            with self.state.track():
                try:
                    gen, ctx = self._start(request, context, streaming=True)
                    final = drive(gen, ctx, lambda emit: chunks.put(chunk(emit.kind, emit.data)))
                    if not ctx.cancelled.is_set():
                        chunks.put(chunk("final", final, is_final=True))
                except Exception as exc:
                    chunks.put(chunk("error", error_info(exc), is_final=True))
                finally:
                    chunks.put(_DONE)

        threading.Thread(target=produce, name=f"tool-{request.tool}", daemon=True).start()
        while True:
            try:
                first = chunks.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            batch = [first]
            while batch[-1] is not _DONE and len(batch) < MAX_CHUNKS_PER_MESSAGE:
                try:
                    batch.append(chunks.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is _DONE
            if done:
                batch.pop()
            if batch:
                yield bridge_pb2.ChunkBatch(chunks=batch)
            if done:
                return
