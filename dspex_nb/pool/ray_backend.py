"""The Ray backend: each worker is a Ray actor (``dspex_nb.worker.ray_actor.RayWorker``) on a Ray cluster.

``Pool(backend="ray", address=None | "auto" | "host:port", resources={...})``. With no address the
pool starts a local Ray instance and ends it with the pool; with one, it joins that cluster and leaves it
running. Calls travel over Ray's own transport (a streamed call is an actor generator method), so the
pool opens no port of its own. Everything above the connection is the pool's, as for local workers:
scheduling, health pings, replacing a dead actor (a new actor in the slot, rather than Ray's restarts,
so calls in flight fail at once with ``WorkerDied`` and batches retry their items), define and
configure_lm broadcast to actors started later, the journal.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dspex_nb import redact
from dspex_nb.errors import CallTimeout, DspexError, WorkerDied, WorkerStartError, call_error
from dspex_nb.pool.calls import Chunk, decode_chunks, show_output
from dspex_nb.pool.connection import BACKSTOP, ConnectionClosed, Died, Health, WorkerSpec, backstop, kernel_dir
from dspex_nb.pool.local import MAX_SOCKET_PATH
from dspex_nb.pool.settings import SettingError
from dspex_nb.wire import owner_gone, owner_spec, start_time

try:
    import ray
    from ray._private import ray_constants
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.client import ray as ray_client
except ImportError as exc:  # reported at Pool(backend="ray"), never deep in a call
    raise ImportError(f"Pool(backend='ray') needs Ray in the kernel's Python ({exc}): "
                      "pip install 'ray>=2.40'") from exc

SLICE = 0.2  # seconds a stream's reader waits before it checks its deadline and cancellation
DEAD = -int(signal.SIGKILL)  # the exit code reported for an actor Ray says is dead (``ended`` says how it ended)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of Ray's messages
FRAME = re.compile(r'\s+File ".*", line \d+')  # a traceback's frame line
RAY_EXIT = re.compile(r"Worker exit type: (\w+) Worker exit detail: ([^.]*)")  # in Ray's error for a dead actor
CONTROL = {"concurrency_group": "control"}  # pings, cancels, describe: never behind the work
KERNEL_VARIABLES = ("PYTHONHASHSEED", "DSPY_CACHEDIR", "DSPY_CACHE_LIMIT", "LITELLM_LOCAL_MODEL_COST_MAP")  # a
# local worker inherits the kernel's, and what a program gives depends on them (its string hashes, DSPy's default
# cache, the prices its LM costs come from); some are read as a process starts
CLIENT_SCHEME = "ray://"
NO_CLIENT = ("Ray Client cannot run the pool's streamed calls (Ray: 'Streaming actor methods are not currently "
             "supported when using Ray Client'); run the kernel on a node of the cluster and give the head's GCS "
             "address (address='auto', or 'HEAD_IP:6379')")
_owners: set[RayBackend] = set()  # the pools using the Ray instance that one of them started
_owned = threading.Lock()
RAY_SOCKET_ROOM = len("/dspex-ray-12345678/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")  # a
# pool's private directory and the longest socket path Ray makes in it
_private_dir: list[str] = []  # that instance's directory, of this user only, removed when the instance ends
PRIVATE_PREFIX = "dspex-ray-"
KERNEL_FILE = "kernel"  # in that directory: the kernel that made it (wire.owner_spec), for ``_remove_stale_dirs``
_RAY_CODE = os.path.dirname(ray.__file__) + os.sep  # where Ray's own warnings are made
START_LOG = "ray-start.log"  # and there, Ray's messages and warnings in the kernel while that instance started
OWN_STARTS = 2  # tries of the pool's own instance where its raylet was late (Ray allows it 30 s, however busy the
RAYLET_LATE = "timed out during startup"  # machine is), in the error Ray then raises


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None, resources: dict[str, float] | None, max_in_flight: int) -> None:
        if isinstance(address, str) and address.startswith(CLIENT_SCHEME):
            raise SettingError(f"Pool(address={address!r}) is a Ray Client address: {NO_CLIENT}")
        self.address = address
        self.resources = dict(resources or {})
        self._actor = ray.remote(max_concurrency=max_in_flight + 8,  # every call a pool may send, and spare
                                 concurrency_groups={"control": 4})(_worker_class())
        self._ids = itertools.count()
        self.run_id = uuid.uuid4().hex[:12]
        self.cwd = os.getcwd()  # the actors' too, where their node has it, as local workers have the kernel's
        self.dashboard = ""  # the URL of the cluster's Ray dashboard, where it has one

    def fresh(self) -> RayBackend:
        return self

    def open(self) -> list[dict[str, Any]]:
        self.cwd = os.getcwd()
        if ray_client.is_connected():  # the kernel's own ray.init("ray://...")
            raise WorkerStartError(f"this kernel is connected to Ray through Ray Client: {NO_CLIENT}")
        with _owned:
            if not ray.is_initialized():
                _init(self.address or os.environ.get("RAY_ADDRESS") or None)
                _owners.clear()
                _owners.add(self)  # a Ray instance started here: ended when its last pool closes
            else:
                _same_cluster(self.address)
                if _owners:
                    _owners.add(self)
        self.dashboard = _dashboard()
        return []

    @property
    def log_path(self) -> Path | None:
        """Where Ray's messages and warnings of the start went, for the pool's own instance (None: a cluster's)."""
        return Path(_private_dir[-1], START_LOG) if self in _owners and _private_dir else None

    @staticmethod
    def follows(name: str, value: str) -> bool:
        """Whether an actor takes the kernel's variable ``name`` as it changes (``environment.Changes``): as it got
        them, those named as secrets or holding a URL's password; other variables are each node's own."""
        return _secret(name) or bool(redact.url_passwords(value))

    def spawn(self, worker_id: str, generation: int, spec: WorkerSpec) -> RayConnection:
        resources = dict(self.resources)
        options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}  # Ray's default: a CPU to place it, none held
        secrets, plain = _actor_env(spec.env)
        if plain:
            options["runtime_env"] = {"env_vars": plain}
        if "CPU" in resources:
            options["num_cpus"] = resources.pop("CPU")
        if "GPU" in resources:
            options["num_gpus"] = resources.pop("GPU")
        if resources:
            options["resources"] = resources
        actor = self._actor.options(**options).remote(
            worker_id, spec.run_id, spec.lm, spec.lm_kwargs, spec.max_message_bytes, spec.rate_limit,
            spec.session_ttl, secrets, self.cwd)
        connection = RayConnection(worker_id, actor, f"{spec.run_id}-{worker_id}-{generation}", self._ids)
        connection.process.wanted = self.resources  # named where it cannot start for want of them
        return connection

    def close(self) -> None:
        with _owned:
            if self in _owners:
                _owners.discard(self)
                if not _owners:
                    ray.shutdown()  # the instance a pool started, now unused (a cluster it joined keeps running)
                    _remove_private_dir()


def _init(address: str | None) -> None:
    """Connect this kernel to the cluster at ``address``, or (None) start a Ray instance of its own.

    Ray's own default for None joins the cluster whose address the last `ray start` on this machine wrote to
    /tmp/ray/ray_current_cluster, a directory any user may write to (Ray makes its directories 0777, and its
    logs, which hold what actors print, world-readable): another user's cluster would get the programs and
    the LM keys. So None (and "local") starts a local instance in a directory of this user's own, and "auto" is
    refused where that file is another user's, or where there is none (Ray would join any cluster it sees
    running on the machine, whoever started it).
    """
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
    local = address in (None, "local")
    if local:
        root = _ray_temp_root()
        if len(os.fsencode(root)) + RAY_SOCKET_ROOM > MAX_SOCKET_PATH:
            raise WorkerStartError(f"Pool(backend='ray'): Ray's socket paths under {root} ($RAY_TMPDIR, else "
                                   f"$TMPDIR) would be longer than the {MAX_SOCKET_PATH} bytes a Unix socket's "
                                   "path may have; set RAY_TMPDIR to a short directory of your own (e.g. /tmp)")
        _remove_stale_dirs(root)
        kwargs["address"] = "local"
    else:
        if address == "auto":
            _refuse_anothers_cluster()
        kwargs["address"] = address
    for attempt in range(1, (OWN_STARTS if local else 1) + 1):
        if local:
            _make_private_dir(root)
            kwargs["_temp_dir"] = os.path.join(_private_dir[-1], "ray")  # Ray chmods that 0777
        try:
            with _loopback_only(local), _messages_to(_private_dir[-1] if local else None):
                ray.init(**kwargs)
            return
        except Exception as exc:  # Ray's own: a WorkerStartError, as a local worker's start gives, said in a cell
            _end_unfinished_instance()
            if local and attempt < OWN_STARTS and RAYLET_LATE in str(exc):
                continue
            raise WorkerStartError(f"{_joining(kwargs['address'])}: {type(exc).__name__}: "
                                   f"{redact.text(str(exc))}") from exc
        except BaseException:  # Ctrl-C
            _end_unfinished_instance()
            raise


@contextlib.contextmanager
def _loopback_only(local: bool) -> Iterator[None]:
    """While the pool's own instance starts (``local``), Ray's single-node mode, as on macOS and Windows: its node
    address is the loopback one, so its gcs_server, raylet, object manager, agents and actors listen on loopback only
    (Ray binds them to all interfaces for any other address; it takes a given ``_node_ip_address="127.0.0.1"`` for
    the machine's network address on Linux). Ray reads that mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) as it is
    imported; it is this instance's only, so a cluster the kernel joins later is reached at its network address."""
    clustered = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = clustered and not local
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clustered


@contextlib.contextmanager
def _messages_to(directory: str | None) -> Iterator[None]:
    """Ray's messages and warnings in the kernel while the pool's own instance (in ``directory``) starts (its banner,
    its token-authentication notice, deprecations) go to ``START_LOG`` there, not into the cell that starts the pool;
    Ray's errors still show there, and a start that fails says why in its WorkerStartError."""
    if directory is None:
        yield
        return
    ray_logger = logging.getLogger("ray")
    shown = [(handler, handler.level) for handler in ray_logger.handlers]
    fd = os.open(os.path.join(directory, START_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as log, warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                        file: Any = None, line: str | None = None) -> None:
            """Ray's (made in its code, or attributed to this module's call): to the log; another thread's: shown."""
            if filename.startswith(_RAY_CODE) or filename == __file__:
                log.write(warnings.formatwarning(message, category, filename, lineno, line))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        logged = logging.StreamHandler(log)
        logged.setFormatter(logging.Formatter(ray_constants.LOGGER_FORMAT))
        ray_logger.addHandler(logged)
        for handler, level in shown:
            handler.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            ray_logger.removeHandler(logged)
            for handler, level in shown:
                handler.setLevel(level)


def _dashboard() -> str:
    """The URL of the Ray dashboard of the cluster this kernel is connected to ("" where it has none)."""
    with contextlib.suppress(Exception):  # none, or a Ray without one
        url = ray._private.worker.get_dashboard_url() or ""
        return url if not url or "://" in url else f"http://{url}"
    return ""


def _joining(address: str) -> str:
    if address != "local":
        return f"Pool(address={address!r}): this kernel could not join that Ray cluster"
    return (f"Pool(backend='ray'): the pool's own Ray instance did not start (on a busy machine, Ray may not see its "
            f"raylet register within the 30 s it allows; it was tried {OWN_STARTS} times: try again when the machine "
            "is less busy)")


def _end_unfinished_instance() -> None:
    """End what a ``ray.init`` that failed midway had started of the pool's own instance (a raylet that did not
    register in time on a loaded machine, Ctrl-C during its 20 s start): Ray forgets those processes (its
    gcs_server, dashboard, monitors), which then ran for the kernel's life and wrote their logs into the
    directory again, readable by all, once it was removed. They are this user's processes that name the
    instance's private directory on their command line or have a file open in it; then the directory goes."""
    with contextlib.suppress(Exception):  # one that got as far as a node Ray knows of: Ray's own shutdown
        ray.shutdown()
    started = [pid for directory in _private_dir for pid in _processes_using(directory)]
    for pid in started:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(start_time(pid) for pid in started) and time.monotonic() < deadline:  # none writes there after this
        time.sleep(0.01)
    _remove_private_dir()


def _processes_using(directory: str) -> list[int]:
    """This user's processes, other than this one, that name ``directory`` on their command line or have a file
    open in it (none where /proc cannot be read)."""
    inside = os.path.join(directory, "")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):  # it ended meanwhile, or is not ours to read
                if entry.stat().st_uid == os.getuid() and (
                        os.fsencode(inside) in Path(entry.path, "cmdline").read_bytes()
                        or any(_link(fd.path).startswith(inside) for fd in os.scandir(f"{entry.path}/fd"))):
                    found.append(int(entry.name))
    return found


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def _make_private_dir(root: str) -> None:
    """A directory of this user only (0700) for the pool's own Ray instance, naming this kernel (``KERNEL_FILE``)."""
    _private_dir.append(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=root))
    try:
        fd = os.open(os.path.join(_private_dir[-1], KERNEL_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(owner_spec())
    except BaseException:  # a full disk
        _remove_private_dir()
        raise


def _remove_stale_dirs(root: str) -> None:
    """Remove the Ray directories that this user's kernels left when they ended without closing their pools (a
    SIGKILLed kernel: its instance ends with it, its directory of logs stayed for good): one that is this user's,
    private and not a link, whose kernel (``KERNEL_FILE``) is gone (``wire.owner_gone``: one of this host and PID
    namespace), and that no process uses any more."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not entry.name.startswith(PRIVATE_PREFIX):
                continue
            with contextlib.suppress(OSError, ValueError):  # not such a directory, or not one of ours to read
                info = os.lstat(entry.path)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                    continue
                fd = os.open(os.path.join(entry.path, KERNEL_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as record:
                    kernel = record.read(512).decode()
                if owner_gone(kernel) and not _processes_using(entry.path):
                    shutil.rmtree(entry.path, ignore_errors=True)


def _remove_private_dir() -> None:
    while _private_dir:
        shutil.rmtree(_private_dir.pop(), ignore_errors=True)


def _ray_temp_root() -> str:
    """Where Ray makes its ``ray`` directory: $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp (on macOS too, whose
    $TMPDIR under /var/folders is too long for the socket paths Ray makes there), as Ray's own rule is."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()


def _refuse_anothers_cluster() -> None:
    if (os.environ.get("RAY_ADDRESS") or "auto") != "auto":  # Ray's "auto" is that address then, not the record
        return
    latest = os.path.join(_ray_temp_root(), "ray", "ray_current_cluster")
    try:
        owner = os.stat(latest).st_uid
    except FileNotFoundError:
        raise WorkerStartError(f"Pool(address='auto'): no `ray start` on this machine recorded a cluster in {latest}"
                               " (Ray would then join any cluster it sees running here, whoever started it); give "
                               "your cluster's address (HEAD_IP:6379), or None for a Ray instance of the pool's own") \
            from None
    if owner not in (os.getuid(), 0):
        raise WorkerStartError(f"Pool(address='auto'): the latest Ray cluster on this machine was recorded in "
                               f"{latest} by another user (uid {owner}), who could then run the pool's programs "
                               "and read its LM keys; give the address of your own cluster (HEAD_IP:6379), or "
                               "None for a Ray instance of the pool's own")


def _same_cluster(address: str | None) -> None:
    """Refuse an ``address`` (``host:port``) whose port is not that of the cluster this kernel is connected to
    already (by ``ray.init`` or an earlier pool): Ray keeps one connection, so the pool would run there instead."""
    port = (address or "").rpartition(":")[2]
    if port.isdigit():
        connected = ray.get_runtime_context().gcs_address
        if connected.rpartition(":")[2] != port:
            raise WorkerStartError(f"Pool(address={address!r}): this kernel is connected to the Ray cluster at "
                                   f"{connected} already (ray.init, or another pool), and Ray keeps one connection: "
                                   "give that address or 'auto', or end that connection first (ray.shutdown(), "
                                   "after closing its pools)")


def _actor_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """An actor's environment as (secrets, the rest): the kernel's secret-named variables with ``Pool(env=...)``'s
    and those of its variables whose value holds a URL's password (which win), passed to its constructor; the
    kernel's ``KERNEL_VARIABLES`` with the rest of ``Pool(env=...)`` (which wins), for its ``runtime_env``, which
    Ray's dashboard shows to whoever can open it, and which Ray sets before the actor's Python starts."""
    secret = {k: v for k, v in env.items() if _secret(k) or redact.url_passwords(v)}  # HTTPS_PROXY's password
    kernel = {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}
    return {**_kernel_secrets(), **secret}, {**kernel, **{k: v for k, v in env.items() if k not in secret}}


def _secret(name: str) -> bool:
    """Named as a secret (``redact``'s rule), and not one of Ray's own (``RAY_AUTH_TOKEN``: each node has its own)."""
    return redact.is_secret_name(name) and not name.startswith("RAY_")


def _kernel_secrets() -> dict[str, str]:
    """The kernel's environment variables named as secrets (``redact``'s rule: ``OPENAI_API_KEY``, ``HF_TOKEN``...),
    as they are now: a local worker has the kernel's environment, and an actor gets these (an API key a notebook
    set in ``os.environ``), as an argument rather than in its ``runtime_env``, which Ray's dashboard shows. Ray's
    own (``RAY_AUTH_TOKEN``) stay as each node has them. ``Pool(env=...)``'s secret-named variables travel the same
    way (``_actor_env``), never in the ``runtime_env``."""
    return {name: value for name, value in os.environ.items() if _secret(name)}


def _worker_class() -> type:
    from dspex_nb.worker.ray_actor import RayWorker

    return RayWorker


class ActorProcess:
    """What the pool needs of a worker process, for an actor: its pid, whether it is dead, how to end it."""

    def __init__(self, actor: Any, worker_id: str) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.pid = 0  # known from its first ping
        self.node = ""  # its node's IP address
        self.node_id = ""  # and Ray's id of that node
        self.python = "ray actor"
        self.dead: str = ""  # why Ray says it is dead
        self.signalled = ""  # the signal the pool sent to end it
        self.wanted: dict[str, float] = {}  # the resources it asks for (Pool(resources=...))

    def exit_code(self) -> int | None:
        return DEAD if self.dead else None

    def died(self, err: BaseException) -> None:
        """Ray says the actor is gone (``err``): the first reason is kept, as Ray gives it (its exit type and
        detail: ``NODE_OUT_OF_MEMORY``, ``SYSTEM_ERROR``...), or the first line of its error."""
        if not self.dead:
            text = ANSI.sub("", str(err))
            found = RAY_EXIT.search(text)
            if getattr(err, "actor_init_failed", False):  # Ray's first line names only __init__; the error is last
                self.dead = redact.text(_raised(text))
            elif found:
                self.dead = f"its process ended; Ray says {found[1]}: {found[2].strip()}"
            else:
                self.dead = text.splitlines()[0] if text else type(err).__name__

    def ended(self) -> str:
        """How it ended: Ray knows no exit code, so the signal the pool sent it, else Ray's reason (a process that
        ended by itself, with ``os._exit`` or a crash, is Ray's ``SYSTEM_ERROR``)."""
        return self.signalled or self.dead or "ended"

    def wait(self, timeout: float) -> int:
        """Its exit code, once a ping within ``timeout`` says it is dead (TimeoutError while it answers)."""
        if not self.dead:
            try:
                ray.get(self.actor.ping.options(**CONTROL).remote(), timeout=timeout)
            except GetTimeoutError:
                pass
            except Exception as err:  # RayActorError, or an actor Ray no longer knows
                self.died(err)
        if not self.dead:
            raise TimeoutError(f"actor {self.worker_id} still answers")
        return DEAD

    def terminate(self) -> None:
        """Nothing: ``kill`` (Ray's ``ray.kill``) ends it at once."""

    def kill(self, grace: float = 2.0) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self.dead = self.dead or "killed by the pool"

    def signal(self, sig: int) -> None:
        """A signal to the actor's process (fault tests and demos): sent where it runs on this machine; on another
        node, SIGKILL is Ray's ``ray.kill`` and any other signal an error (it was dropped without a word)."""
        if self.pid and self.node in _local_addresses():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        elif sig == signal.SIGKILL:
            with contextlib.suppress(Exception):  # gone already
                ray.kill(self.actor, no_restart=True)
        else:
            raise ValueError(f"cannot send {signal.Signals(sig).name} to worker {self.worker_id}: its actor runs on "
                             f"another node ({self.node or 'not placed yet'}); only SIGKILL reaches it (ray.kill)")
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.signalled = f"killed by {signal.Signals(sig).name}"

    def log_tail(self, lines: int = 30) -> str:
        lacking = _lacking(self.wanted)
        return ("(the actor's output is in Ray's logs: `ray logs` or the Ray dashboard; an actor that never starts "
                "may be waiting for the resources it asks for: `ray status`)"
                + (f"\nno live node of the Ray cluster has the resources it asks for (Pool(resources=...)): "
                   f"{lacking}; an autoscaling cluster may yet add one" if lacking else ""))

    def trim_log(self) -> None:
        """Nothing to do: Ray keeps an actor's output (and rotates it)."""

    def start_failure(self, worker_id: str) -> Exception:
        return WorkerStartError(f"Ray actor {worker_id} could not start: {self.dead}")


def _lacking(wanted: dict[str, float]) -> dict[str, float]:
    """Those of the ``wanted`` resources that no live node of the cluster has as much of (an actor asking for them
    waits until one joins)."""
    with contextlib.suppress(Exception):  # a cluster gone meanwhile: nothing to say
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        return {name: amount for name, amount in wanted.items()
                if not any(have.get(name, 0) >= amount for have in nodes)}
    return {}


def _raised(traceback: str) -> str:
    """The exception a traceback ends with (its message may span lines): what follows its last frame."""
    lines = traceback.splitlines()
    frames = [i for i, line in enumerate(lines) if FRAME.match(line)]
    rest = lines[frames[-1] + 1:] if frames else lines[-1:]
    return "\n".join(itertools.dropwhile(lambda line: line[:1].isspace(), rest)).strip() or traceback.strip()


def _local_addresses() -> set[str]:
    return {"127.0.0.1", socket.gethostbyname(socket.gethostname()), ray.util.get_node_ip_address()}


class RayConnection:
    """One actor, reached with Ray calls; a Ray ``RayActorError`` marks it dead."""

    def __init__(self, worker_id: str, actor: Any, prefix: str, ids: Iterator[int]) -> None:
        self.worker_id = worker_id
        self.actor = actor
        self.process = ActorProcess(actor, worker_id)
        self._prefix = prefix
        self._ids = ids
        self._closed = False

    def _call_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _lost(self, err: Exception, died: Died) -> DspexError:
        self.process.died(err)
        return died() or WorkerDied(f"worker {self.worker_id} (Ray actor) died during the call")

    def _submit(self, method: Any, *args: Any) -> Any:
        """``method.remote(*args)``; a connection closed, or an actor Ray no longer knows, is ConnectionClosed."""
        if self._closed:
            raise ConnectionClosed()
        try:
            return method.remote(*args)
        except Exception as err:  # e.g. "Can't find actor" once the Ray instance is gone
            self.process.died(err)
            raise ConnectionClosed(str(err)) from None

    def ready(self) -> bool:
        try:
            pinged = ray.get(self._submit(self.actor.ping.options(**CONTROL)), timeout=0.5)
        except GetTimeoutError:
            return False
        except (RayActorError, RayTaskError, ConnectionClosed) as err:
            self.process.died(err)
            return False
        self.process.pid, _, self.process.node, self.process.node_id, _ = pinged
        return True

    def ping(self, timeout: float) -> _Ping:
        return _Ping(self, self._submit(self.actor.ping.options(**CONTROL)), timeout)

    def execute(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
                died: Died) -> Any:
        call_id = self._call_id()
        ref = self._submit(self.actor.execute, call_id, tool, args_json, session_id, timeout, waited, kernel_dir())
        try:  # the actor keeps the timeout (it answers CallTimeout); this only ends a wait for one that cannot answer
            result, error, output = ray.get(ref, timeout=backstop(timeout, waited))
        except GetTimeoutError:
            self.actor.cancel.options(**CONTROL).remote(call_id)
            raise CallTimeout(f"tool '{tool}' did not finish within its timeout of {timeout} s, and its actor did not "
                              f"answer within {BACKSTOP} s after it; the remote work was cancelled") from None
        except KeyboardInterrupt:
            self.actor.cancel.options(**CONTROL).remote(call_id)
            raise
        except RayActorError as err:
            raise self._lost(err, died) from None
        show_output(output)
        if error is not None:
            raise call_error(tool, error, self.worker_id)
        return json.loads(result)

    def stream(self, tool: str, args_json: bytes, session_id: str, timeout: float | None, waited: float,
               died: Died) -> _Stream:
        call_id = self._call_id()
        generator = self._submit(self.actor.stream.options(num_returns="streaming"), call_id, tool, args_json,
                                 session_id, timeout, waited, kernel_dir())
        return _Stream(self, generator, call_id, tool, died)

    def describe(self, timeout: float, died: Died) -> dict[str, Any]:
        try:
            return ray.get(self._submit(self.actor.describe.options(**CONTROL)), timeout=timeout)
        except GetTimeoutError:
            raise CallTimeout(f"worker {self.worker_id} did not describe itself within {timeout} s") from None
        except RayActorError as err:
            raise self._lost(err, died) from None

    def close(self) -> None:
        self._closed = True


class _Ping:
    def __init__(self, conn: RayConnection, ref: Any, timeout: float) -> None:
        self._conn, self._ref, self._timeout = conn, ref, timeout

    def result(self) -> Health:
        try:
            _, rss, _, _, cancelled_running = ray.get(self._ref, timeout=self._timeout)
            return Health(rss, cancelled_running)
        except RayActorError as err:
            self._conn.process.died(err)
            raise ConnectionClosed(str(err)) from None
        except (GetTimeoutError, RayTaskError) as err:
            raise ConnectionClosed(str(err)) from None


class _Stream:
    """An actor generator's items (batches of chunks) as they come; cancel and death checked between them. The actor
    keeps the call's timeout (its stream ends with CallTimeout): a deadline here would count the time the reader
    spends in the caller's ``on_chunk``."""

    def __init__(self, conn: RayConnection, generator: Any, call_id: str, tool: str, died: Died) -> None:
        self._conn, self._generator, self._call_id, self._tool = conn, generator, call_id, tool
        self._died = died
        self._cancelled = False

    def __iter__(self) -> Iterator[list[Chunk]]:
        try:
            while not self._cancelled:  # a cancelled call ends here at once; the actor stops the tool
                ready, _ = ray.wait([self._generator], timeout=SLICE)
                if not ready:
                    continue
                try:
                    ref = next(self._generator)
                except StopIteration:
                    return
                yield decode_chunks(ray.get(ref))
        except RayActorError as err:
            if not self._cancelled:
                raise self._conn._lost(err, self._died) from None
        except RayTaskError as err:
            if not self._cancelled:
                raise DspexError(f"tool '{self._tool}' on worker {self._conn.worker_id}: {err}") from None

    def cancel(self) -> None:
        self._cancelled = True
        with contextlib.suppress(Exception):
            self._conn.actor.cancel.options(**CONTROL).remote(self._call_id)
