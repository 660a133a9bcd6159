"""The local backend: worker processes on this machine, reached over gRPC on Unix sockets.

Workers are forked by a template process that imported DSPy once (``start="template"``) or started as
interpreters of their own (``"spawn"``), in a private 0700 directory that holds their sockets, logs and
``pool.json`` (the owner record a later pool's stale cleanup reads).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from dspex_nb._proto import bridge_pb2, bridge_pb2_grpc
from dspex_nb.errors import CallTimeout, DspexError, MessageTooLarge, WorkerStartError, call_error
from dspex_nb.pool import stale
from dspex_nb.pool.calls import Chunk, decode_chunks, show_output
from dspex_nb.pool.connection import BACKSTOP, ConnectionClosed, Died, Health, WorkerSpec, backstop, kernel_dir
from dspex_nb.pool.process import WORKER_SET, ProcessHandle, WorkerProcess, interpreter, worker_env
from dspex_nb.pool.template import FORK_TIMEOUT, Template
from dspex_nb.wire import LM_KWARGS_ENV, health_address, loads, message_options

DEFAULT_START = "template" if sys.platform == "linux" else "spawn"
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107  # bytes of a Unix socket's path (sun_path, its NUL
# included, holds 104 on macOS, 108 on Linux)
SOCKET_ROOM = len(f"/{stale.PREFIX}12345678/w999-99999.health.sock")  # a pool's directory and its longest socket
# name (1,000 workers, 100,000 restarts of one): a name grows with each restart, and one that no longer fits
# could not be bound, so the slot would fail for good
log = logging.getLogger(__name__)
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
             ("grpc.max_reconnect_backoff_ms", 500)]  # a replaced worker's socket is back within ms


class LocalBackend:
    """Worker processes of one pool (``run_id`` marks them for stale cleanup)."""

    name = "local"

    def __init__(self, python: str | None, start: str, env: dict[str, str] | None) -> None:
        self.python = interpreter(python)
        self.start_method = start
        self.env = env
        self.run_id = uuid.uuid4().hex[:12]
        self.dir: Path | None = None
        self.template: Template | None = None
        self.template_env: dict[str, str] = {}  # the environment the template started with
        self.template_cwd = ""  # and its working directory (forked workers inherit it)
        self._lock = threading.RLock()  # restarts run in parallel threads: one template for all of them
        self._spawned: list[int] = []  # pids of the live workers (for stale cleanup by a later pool)
        self._cleaned: list[dict[str, Any]] = []
        self._owner = os.getpid()  # the process that opened it; a forked child's copy leaves it alone

    def fresh(self) -> LocalBackend:
        """Itself once opened, else the template %load_ext started, if it matches the settings, environment and
        directory of now (``take``)."""
        return self if self.dir is not None else take(self.python, self.start_method, self.env)

    def open(self) -> list[dict[str, Any]]:
        if self.dir is None:
            self._owner = os.getpid()
            root = _socket_root()
            stale.check_dspy_cache()  # before the template imports DSPy
            self._cleaned = stale.cleanup(root)
            self.dir = Path(tempfile.mkdtemp(prefix=stale.PREFIX, dir=root))  # mode 0700
            self._record_owner()  # at once: a start killed midway leaves a directory stale cleanup can claim
        return self._cleaned

    @staticmethod
    def follows(name: str, value: str) -> bool:
        """Whether a worker takes the kernel's variable ``name`` as it changes (``environment.Changes``): as it
        got the kernel's environment, all but those it sets itself."""
        return name not in WORKER_SET

    def warm(self) -> None:
        """Start the template now, so that it has imported DSPy when the pool asks it for workers."""
        self.open()
        with self._lock:
            self._template(FORK_TIMEOUT)

    def spawn(self, worker_id: str, generation: int, spec: WorkerSpec) -> GrpcConnection:
        assert self.dir is not None
        address = f"unix:{self.dir}/{worker_id}-{generation}.sock"
        args = ["--worker-id", worker_id, "--run-id", spec.run_id, "--lm", spec.lm,
                "--max-message-mb", str(spec.max_message_bytes // 2**20), "--session-ttl", str(spec.session_ttl)]
        if spec.rate_limit:
            args += ["--rate-limit", str(spec.rate_limit)]
        process = self._start_process(address, args, self.dir / f"{worker_id}-{generation}.log", spec)
        return GrpcConnection(worker_id, process, address, spec.max_message_bytes)

    def _start_process(self, address: str, args: list[str], log_path: Path, spec: WorkerSpec) -> ProcessHandle:
        """A worker process, forked by the template or spawned, and recorded in pool.json."""
        assert self.dir is not None
        env = worker_env(self.env)
        lm_env = {LM_KWARGS_ENV: json.dumps(spec.lm_kwargs)}  # not on argv: it may hold an API key
        if self.start_method == "template":
            with self._lock:
                template = self._template(min(FORK_TIMEOUT, spec.start_timeout))
            process: ProcessHandle = template.spawn(["--address", address, *args], lm_env, log_path, address,
                                                    spec.start_timeout)
        else:
            process = WorkerProcess(self.python, address, log_path, {**env, **lm_env}, args)
        try:
            self._record_owner(process.pid)
        except BaseException:
            process.kill(grace=0)  # a worker nobody supervises must not serve the slot
            raise
        return process

    def _template(self, fork_timeout: float) -> Template:
        """The live template (a new one if there is none or it died); called under the lock."""
        assert self.dir is not None
        if self.template is None or not self.template.alive:
            if self.template is not None:
                self.template.close()
            self.template_env, self.template_cwd = worker_env(self.env), os.getcwd()
            self.template = Template(self.python, self.template_env, self.dir / "template.log", self.run_id)
            self._record_owner(self.template.proc.pid)
        self.template.fork_timeout = fork_timeout
        return self.template

    def _record_owner(self, pid: int | None = None) -> None:
        """Keep pool.json current (for a later pool's stale cleanup): this owner, its live children. Where it
        cannot be written (the runtime directory's disk is full), the workers run all the same, logged: a worker
        ends with its kernel by itself, and the record only helps a later pool end those of a stopped one."""
        assert self.dir is not None
        with self._lock:
            self._spawned = [p for p in self._spawned if stale.start_time(p)] + ([pid] if pid else [])
            try:
                stale.write_owner(self.dir, self.run_id, self._spawned)
            except OSError as exc:
                log.warning("dspex_nb: could not record the pool's workers in %s (%s); they run all the same",
                            self.dir / stale.OWNER_FILE, exc)

    def close(self) -> None:
        """End the template and remove the directory; in a child forked from the process that opened it, only
        forget them (they are the parent's: its pool, or the template warmed for its first one)."""
        if os.getpid() != self._owner:
            self.template, self.dir, self._spawned, self._cleaned = None, None, [], []
            return
        if self.template is not None:
            self.template.close()
            self.template = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self._spawned, self._cleaned = [], []


def _socket_root() -> Path:
    """``stale.runtime_dir()``, where it leaves room for the sockets' paths (at most 107 bytes): a longer
    ``$DSPEX_RUNTIME_DIR`` is refused, named, before any worker starts."""
    root = stale.runtime_dir()
    if len(os.fsencode(root)) + SOCKET_ROOM > MAX_SOCKET_PATH:
        raise WorkerStartError(
            f"the runtime directory {root} (${stale.RUNTIME_DIR_ENV}, else the temp directory) is "
            f"{len(os.fsencode(root))} bytes long: a worker's socket path there would be over the "
            f"{MAX_SOCKET_PATH} bytes a Unix socket's path may have; set ${stale.RUNTIME_DIR_ENV} to a directory "
            f"of your own whose path is at most {MAX_SOCKET_PATH - SOCKET_ROOM} bytes long")
    return root


_spare: LocalBackend | None = None  # warmed by warm(), taken by the next local pool that matches it
_spare_lock = threading.Lock()


def warm(python: str | None = None) -> None:
    """Start a template process now (``%load_ext dspex_nb`` does), so that the first local pool forks its
    workers from a process that has already imported DSPy (about 1.5 s on 2 cores). One at a time; it ends
    with the kernel, or is closed by ``take`` when a pool starts with other settings."""
    global _spare
    with _spare_lock:
        if _spare is None and DEFAULT_START == "template":
            spare = LocalBackend(python, "template", None)
            try:
                spare.warm()
            except BaseException:
                spare.close()
                raise
            _spare = spare


def take(python: str | None, start: str, env: dict[str, str] | None) -> LocalBackend:
    """The warmed backend when it matches these settings and neither the environment (DSPy reads some of
    it at import, e.g. DSPY_CACHEDIR) nor the working directory (its workers inherit it) changed since it
    started, else a new one (the warmed one is closed)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None:
        if ((spare.python, spare.start_method, spare.template_env, spare.template_cwd)
                == (interpreter(python), start, worker_env(env), os.getcwd())):
            return spare
        spare.close()
    return LocalBackend(python, start, env)


@atexit.register
def close_spare() -> None:
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None:
        spare.close()


class GrpcConnection:
    """A local worker: one channel for work, one to its health server (pings never wait behind work)."""

    def __init__(self, worker_id: str, process: ProcessHandle, address: str, max_message_bytes: int) -> None:
        self.worker_id = worker_id
        self.process = process
        self.address = address
        self.channel = grpc.insecure_channel(address, options=[*message_options(max_message_bytes), *RECONNECT])
        self.stub = bridge_pb2_grpc.BridgeStub(self.channel)
        self.health_channel = grpc.insecure_channel(health_address(address), options=RECONNECT)
        self.health = bridge_pb2_grpc.BridgeStub(self.health_channel)

    def ready(self) -> bool:
        if not Path(self.address.removeprefix("unix:")).exists():
            return False
        try:
            self.stub.Ping(bridge_pb2.PingRequest(), timeout=0.5, wait_for_ready=True)
            return True
        except grpc.RpcError:
            return False

    def ping(self, timeout: float) -> _Ping:
        try:
            return _Ping(self.health.Ping.future(bridge_pb2.PingRequest(), timeout=timeout))
        except ValueError:  # its channel was closed meanwhile
            raise ConnectionClosed() from None

    def execute(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
                died: Died) -> Any:
        request = _request(tool, args_json, session_id, timeout, waited)
        try:
            # A blocking call: gRPC turns Ctrl-C into KeyboardInterrupt and cancels the RPC. The worker keeps the
            # timeout (it answers CallTimeout); the deadline here only ends a wait for a worker that cannot answer.
            reply = self.stub.Execute(request, timeout=backstop(timeout, waited))
        except grpc.RpcError as err:
            raise translate(err, tool, timeout, died) from None
        except ValueError:  # its channel was closed: the worker is being replaced, or the pool shut down
            raise ConnectionClosed() from None
        return unary_result(reply, tool, self.worker_id)

    def stream(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
               died: Died) -> _Stream:
        request = _request(tool, args_json, session_id, timeout, waited)
        try:  # no deadline: one would count the time the reader spends in the caller's on_chunk (the worker keeps
            # the timeout; the health thread ends the stream of a worker that cannot answer, WorkerDied)
            return _Stream(self.stub.ExecuteStream(request), tool, timeout, died)
        except ValueError:
            raise ConnectionClosed() from None

    def describe(self, timeout: float, died: Died) -> dict[str, Any]:
        try:
            reply = self.stub.Describe(bridge_pb2.DescribeRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise translate(err, "Describe", timeout, died) from None
        except ValueError:
            raise ConnectionClosed() from None
        return json.loads(reply.json)

    def close(self) -> None:
        self.channel.close()
        self.health_channel.close()


def _request(tool: str, args_json: bytes, session_id: str, timeout: float | None,
             waited: float) -> bridge_pb2.ExecuteRequest:
    """A call as its worker gets it: with its timeout (what is left of it, which the worker keeps) and the kernel's
    working directory now, which the worker runs it in."""
    return bridge_pb2.ExecuteRequest(tool=tool, args_json=args_json, session_id=session_id, timeout_s=timeout or 0.0,
                                     waited_s=waited, cwd=os.fsencode(kernel_dir()))


def translate(err: grpc.RpcError, tool: str, timeout: float | None,
              worker_died: Died) -> DspexError:
    """The dspex_nb error for a failed gRPC call (``worker_died`` says whether its worker is gone)."""
    code = err.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CallTimeout(f"tool '{tool}' did not finish within its timeout of {timeout} s, and its worker did not "
                           f"answer within {BACKSTOP} s after it; the remote work was cancelled")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MessageTooLarge(f"a message of '{tool}' is over the gRPC size limit ({err.details()}); "
                               "raise it with Pool(max_message_mb=...)")
    died = worker_died()
    if died is not None:
        return died
    return DspexError(f"tool '{tool}': gRPC error {code.name}: {err.details()}")


def unary_result(reply: Any, tool: str, worker: str) -> Any:
    """The decoded result of an ExecuteReply, or its ToolError raised, once what the call wrote is written here."""
    show_output((out.stream, out.text) for out in reply.output)
    if reply.HasField("error"):
        raise call_error(tool, error_info(reply.error), worker)
    return loads(reply.result_json)


def error_info(e: Any) -> dict[str, Any]:
    """A proto ToolError as the worker's ``error_info`` gave it (an exception group's sub-exceptions nested)."""
    return {"type": e.type, "message": e.message, "traceback": e.traceback, "bases": e.bases,
            "attributes": json.loads(e.attributes_json) if e.attributes_json else None,
            "args": json.loads(e.args_json) if e.args_json else None,
            "group": {"message": e.group_message, "exceptions": [error_info(sub) for sub in e.exceptions]}
            if e.exceptions else None, "lm_state": json.loads(e.lm_state_json) if e.lm_state_json else None}


class _Ping:
    def __init__(self, future: Any) -> None:
        self._future = future

    def result(self) -> Health:
        try:
            reply = self._future.result()
            return Health(reply.rss_bytes, reply.cancelled_running_s)
        except (grpc.RpcError, ValueError) as err:  # ValueError: its channel was closed meanwhile
            raise ConnectionClosed(str(err)) from None


class _Stream:
    """A gRPC response stream as batches of chunks, its failures translated."""

    def __init__(self, call: Any, tool: str, timeout: float | None, died: Died) -> None:
        self._call, self._tool, self._timeout, self._died = call, tool, timeout, died
        self._cancelled = False

    def __iter__(self) -> Iterator[list[Chunk]]:
        try:
            for message in self._call:
                yield decode_chunks(message.chunks_json)
        except grpc.RpcError as err:
            if not self._cancelled:
                raise translate(err, self._tool, self._timeout, self._died) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
