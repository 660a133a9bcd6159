"""The gRPC servicer: thin over ``calls.Call`` and the tool registry.

Cancellation is gRPC's own: the call's callback sets the tool's ``ctx.cancelled``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from dspex_nb._proto import bridge_pb2, bridge_pb2_grpc
from dspex_nb.wire import valid_text
from dspex_nb.worker import tools
from dspex_nb.worker.calls import Call, Deadline
from dspex_nb.worker.state import WorkerState, rss_bytes


class Bridge(bridge_pb2_grpc.BridgeServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def Ping(self, request: bridge_pb2.PingRequest, context: grpc.ServicerContext) -> bridge_pb2.PingReply:
        return bridge_pb2.PingReply(pid=os.getpid(), worker_id=self.state.worker_id, run_id=self.state.run_id,
                                    rss_bytes=rss_bytes(), cancelled_running_s=self.state.cancelled_running())

    def Describe(self, request: bridge_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> bridge_pb2.DescribeReply:
        return bridge_pb2.DescribeReply(json=json.dumps(describe(self.state)).encode())

    def _call(self, request: bridge_pb2.ExecuteRequest, context: grpc.ServicerContext, streaming: bool) -> Call:
        deadline = Deadline(request.timeout_s or None, request.waited_s)
        call = Call(self.state, request.tool, request.args_json, request.session_id, streaming, deadline,
                    os.fsdecode(request.cwd))
        if not context.add_callback(call.ctx.cancelled.set):  # the call ended (cancelled) before it got here
            call.ctx.cancelled.set()
        return call

    def Execute(self, request: bridge_pb2.ExecuteRequest,
                context: grpc.ServicerContext) -> bridge_pb2.ExecuteReply:
        result, error, output = self._call(request, context, streaming=False).unary()
        written = [bridge_pb2.Output(stream=stream, text=text) for stream, text in output]
        if error is not None:
            return bridge_pb2.ExecuteReply(error=tool_error(error), output=written)
        return bridge_pb2.ExecuteReply(result_json=result, output=written)

    def ExecuteStream(self, request: bridge_pb2.ExecuteRequest,
                      context: grpc.ServicerContext) -> Iterator[bridge_pb2.ChunkBatch]:
        call = self._call(request, context, streaming=True)
        ended = threading.Event()  # the RPC is over (read to the end, cancelled, or the client went away)
        context.add_callback(ended.set)
        for message in call.batches(ended, context.is_active):
            yield bridge_pb2.ChunkBatch(chunks_json=message)


def tool_error(info: dict[str, Any]) -> bridge_pb2.ToolError:
    """An ``error_info`` as the proto's ToolError (an exception group's sub-exceptions as nested ones); its texts
    valid Unicode, as a proto string must be (its ``args``, JSON, keep a lone surrogate as it is)."""
    attributes, args, group = info.get("attributes"), info.get("args"), info.get("group") or {}
    return bridge_pb2.ToolError(
        type=info["type"], message=valid_text(info["message"]), traceback=valid_text(info["traceback"]),
        bases=info.get("bases", ()),
        attributes_json=json.dumps(attributes) if attributes else "",
        args_json=json.dumps(args) if args is not None else "",
        group_message=valid_text(group.get("message", "")),
        exceptions=[tool_error(sub) for sub in group.get("exceptions", ())],
        lm_state_json=json.dumps(info["lm_state"]) if info.get("lm_state") else "")


def describe(state: WorkerState) -> dict:
    """The worker's self-description: its state and every tool with its argument schema."""
    info = state.describe()
    info["tools"] = [t.schema() for t in sorted(tools.REGISTRY.values(), key=lambda t: t.name)]
    return info
