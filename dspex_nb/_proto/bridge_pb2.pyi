from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("pid", "worker_id", "run_id", "rss_bytes", "cancelled_running_s")
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_RUNNING_S_FIELD_NUMBER: _ClassVar[int]
    pid: int
    worker_id: str
    run_id: str
    rss_bytes: int
    cancelled_running_s: float
    def __init__(self, pid: _Optional[int] = ..., worker_id: _Optional[str] = ..., run_id: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., cancelled_running_s: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("tool", "args_json", "session_id", "timeout_s", "waited_s", "cwd")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    tool: str
    args_json: bytes
    session_id: str
    timeout_s: float
    waited_s: float
    cwd: bytes
    def __init__(self, tool: _Optional[str] = ..., args_json: _Optional[bytes] = ..., session_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., waited_s: _Optional[float] = ..., cwd: _Optional[bytes] = ...) -> None: ...

class ToolError(_message.Message):
    __slots__ = ("type", "message", "traceback", "bases", "attributes_json", "args_json", "group_message", "exceptions", "lm_state_json")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    BASES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_JSON_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXCEPTIONS_FIELD_NUMBER: _ClassVar[int]
    LM_STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    bases: _containers.RepeatedScalarFieldContainer[str]
    attributes_json: str
    args_json: str
    group_message: str
    exceptions: _containers.RepeatedCompositeFieldContainer[ToolError]
    lm_state_json: str
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., bases: _Optional[_Iterable[str]] = ..., attributes_json: _Optional[str] = ..., args_json: _Optional[str] = ..., group_message: _Optional[str] = ..., exceptions: _Optional[_Iterable[_Union[ToolError, _Mapping]]] = ..., lm_state_json: _Optional[str] = ...) -> None: ...

class ExecuteReply(_message.Message):
    __slots__ = ("result_json", "error", "output")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    result_json: bytes
    error: ToolError
    output: _containers.RepeatedCompositeFieldContainer[Output]
    def __init__(self, result_json: _Optional[bytes] = ..., error: _Optional[_Union[ToolError, _Mapping]] = ..., output: _Optional[_Iterable[_Union[Output, _Mapping]]] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("stream", "text")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    stream: str
    text: str
    def __init__(self, stream: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("chunks_json",)
    CHUNKS_JSON_FIELD_NUMBER: _ClassVar[int]
    chunks_json: bytes
    def __init__(self, chunks_json: _Optional[bytes] = ...) -> None: ...
