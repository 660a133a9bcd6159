"""The Ray backend on a real two-node Ray cluster on this machine: `ray start --head` and a second
`ray start --address` with resources of its own, each a process of this test (`--block`), ended by pid.

A batch runs on actors of both nodes; an actor SIGKILLed mid-batch loses no item and returns none twice;
tokens stream from an actor; a define reaches the actor that replaces a dead one; `%dspex start --ray`
in a notebook run by a real kernel. Needs Ray (`pip install 'ray>=2.40'`): without it the module skips and
says why, unless DSPEX_REQUIRE_RAY=1 (set by .ci/run, which installs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TWO_STEP, pid_alive, wait_until

REQUIRED = os.environ.get("DSPEX_REQUIRE_RAY") == "1"
if not REQUIRED:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray>=2.40' to run the Ray tests")
import ray  # noqa: E402

from dspex_nb import Pool  # noqa: E402
from dspex_nb.errors import ToolError, WorkerStartError  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# A loopback-only test cluster. Ray's token authentication is off for it: in this environment a cluster
# started with `ray start` refused the driver's token (the same token, from RAY_AUTH_TOKEN or ~/.ray).
LOOPBACK_CLUSTER = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """One Ray node, its daemons the children of this `ray start --block` (so one pid ends them all)."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"]
    own = [f"{flag}={free_port()}" for flag in ports]  # two nodes on one machine: no shared default port
    with open(log, "wb") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=2",
                                 "--node-ip-address=127.0.0.1", *own, *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **LOOPBACK_CLUSTER})


def stop_node(node: subprocess.Popen) -> None:
    node.send_signal(signal.SIGTERM)  # `ray start --block` ends its node's processes on the way out
    try:
        node.wait(30)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()
    try:
        os.killpg(node.pid, signal.SIGKILL)  # its session: whatever of that node is left
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a two-node cluster; this process is connected to it as a driver."""
    temp = Path(tempfile.mkdtemp(prefix="dspex-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in LOOPBACK_CLUSTER}
    os.environ.update(LOOPBACK_CLUSTER)  # this driver's
    nodes = [start_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                         f"--ray-client-server-port={free_port()}", '--resources={"head": 4, "slot": 1}'],
                        temp / "head.log")]
    try:
        wait_until(lambda: _connect(address), timeout=90, what="the Ray head to accept a driver")
        nodes.append(start_node([f"--address={address}", '--resources={"second": 4, "slot": 1}'], temp / "second.log"))
        wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=90,
                   what="the second Ray node to join")
        yield address
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _connect(address: str) -> bool:
    try:
        ray.init(address=address, log_to_driver=False)
        return True
    except ConnectionError:
        return False


@pytest.fixture(scope="module")
def pool(cluster: str) -> Iterator[Pool]:
    # each node has one "slot": one actor on each, whatever Ray's SPREAD would have done
    with Pool(workers=2, backend="ray", address=cluster, journal=False, health_interval=0.3,
              resources={"slot": 1}) as p:
        yield p


def test_a_batch_runs_on_actors_of_both_nodes(pool: Pool) -> None:
    nodes = {w.process.node_id for w in pool.workers}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, nodes  # one actor on each node
    batch = pool.batch([f"question {i}?" for i in range(40)], "question -> answer")
    outputs = batch.result(120)
    assert [o["answer"].startswith(f"Demo LM answer to 'question {i}?'") for i, o in enumerate(outputs)] == [True] * 40
    assert set(batch.snapshot()["by_worker"]) == {"w0", "w1"}  # items ran on both actors


def test_tokens_stream_from_an_actor(pool: Pool) -> None:
    pool.configure_lm("demo", answer_tokens=200)
    try:
        run = pool.run_stream("question -> answer", question="stream me")
        tokens = [c for c in run if c.kind == "token"]
        assert len(tokens) >= 100 and run.result().answer == "".join(c["text"] for c in tokens).strip()
    finally:
        pool.configure_lm("demo")


def test_an_actor_killed_mid_batch_loses_no_item(pool: Pool) -> None:
    pool.configure_lm("demo", ttft=0.2)
    try:
        batch = pool.batch([f"item {i}?" for i in range(60)], "question -> answer")
        wait_until(lambda: batch.snapshot()["ok"] >= 5, timeout=60, what="the batch to make progress")
        victim = next(w for w in pool.workers if w.id == "w0")
        old_pid = victim.process.pid
        pool.kill_worker("w0", signal.SIGKILL)
        outputs = batch.result(180)
        records = [r for r in batch.records if r is not None]
        assert sorted(r["index"] for r in records) == list(range(60))  # every item, each once
        assert all(r["ok"] for r in records) and len(outputs) == 60
        replaced = wait_until(lambda: [w for w in pool.workers if w.id == "w0" and w.state == "ready"
                                       and w.process.pid != old_pid], timeout=120, what="w0 to be replaced")
        assert replaced[0].restarts >= 1
    finally:
        pool.configure_lm("demo")


def test_a_define_reaches_the_actor_that_replaces_a_dead_one(pool: Pool) -> None:
    pool.define("TwoStep", TWO_STEP)
    old_pid = next(w for w in pool.workers if w.id == "w1").process.pid
    pool.kill_worker("w1", signal.SIGKILL)
    wait_until(lambda: [w for w in pool.workers if w.id == "w1" and w.state == "ready" and w.process.pid != old_pid],
               timeout=120, what="w1 to be replaced")
    out = pool.execute("run_module", {"name": "TwoStep", "inputs": {"question": "Why?"}}, worker="w1")
    assert out["answer"].startswith("Demo LM answer to")


def _exits_by_itself() -> None:
    import os

    os._exit(7)


def test_an_actor_that_ends_by_itself_is_not_said_to_be_killed(pool: Pool) -> None:
    """A program that ends its actor's process (os._exit, a crash) is not reported as killed by SIGKILL, which Ray
    cannot know and which reads as the OOM killer: the error gives Ray's own reason."""
    from dspex_nb.errors import WorkerDied

    with pytest.raises(WorkerDied) as info:
        pool.run(_exits_by_itself)
    assert "SIGKILL" not in str(info.value) and "its process ended; Ray says SYSTEM_ERROR" in str(info.value)
    wait_until(lambda: [w.state for w in pool.workers] == ["ready", "ready"], timeout=120,
               what="the actor to be replaced")


def test_an_actor_that_cannot_start_says_why(cluster: str) -> None:
    """An actor whose start raises (the LM's settings refused by dspy.LM) gives that error, as a local worker's start
    does, not only Ray's first line ('an error raised in its creation task, ray::RayWorker.__init__()'), colours
    and all."""
    from dspex_nb.errors import WorkerStartError

    pool = Pool(workers=1, backend="ray", address=cluster, journal=False, resources={"head": 1}, lm="openai/o1",
                lm_kwargs={"api_key": "sk-not-to-be-shown", "temperature": 0.5, "max_tokens": 10})
    with pytest.raises(WorkerStartError) as info, pool:
        pass
    message = str(info.value)
    assert "LMConfigurationError: [openai/o1] OpenAI's reasoning models require passing temperature=1.0" in message
    assert "\x1b" not in message and "sk-not-to-be-shown" not in message


def test_an_actor_asking_for_resources_no_node_has_says_so(cluster: str) -> None:
    from dspex_nb.errors import WorkerStartError

    pool = Pool(workers=1, backend="ray", address=cluster, journal=False, resources={"unicorn": 1, "head": 1},
                start_timeout=4)
    with pytest.raises(WorkerStartError, match=r"no live node of the Ray cluster has the resources it asks for "
                                               r"\(Pool\(resources=...\)\): \{'unicorn': 1\}"), pool:
        pass


def test_a_setting_the_backend_would_not_use_is_refused() -> None:
    """Pool(python=...) on Ray (an actor runs its node's Python), address or resources without backend='ray': each
    was dropped without a word, so the pool ran elsewhere or otherwise than asked."""
    from dspex_nb.pool.settings import SettingError

    with pytest.raises(SettingError, match=r"Pool\(python='/opt/py/bin/python'\) chooses the local workers' Python"):
        Pool(backend="ray", python="/opt/py/bin/python")
    for where in ({"address": "auto"}, {"resources": {"GPU": 1}}):
        with pytest.raises(SettingError, match=rf"Pool\({next(iter(where))}=...\) places Ray actors"):
            Pool(**where)


def test_an_address_other_than_the_connected_clusters_is_refused(cluster: str) -> None:
    """This test process is connected to the module's cluster: a pool given another cluster's address would have
    run its actors here, without a word."""
    from dspex_nb.errors import WorkerStartError

    elsewhere = Pool(workers=1, backend="ray", address="10.9.8.7:6390", journal=False)
    with pytest.raises(WorkerStartError, match=r"Pool\(address='10.9.8.7:6390'\): this kernel is connected to the "
                                               r"Ray cluster at .*:\d+ already"), elsewhere:
        pass


def test_a_ray_client_address_is_refused_saying_why() -> None:
    """Ray Client cannot stream from an actor, as every run_stream, map and batch does: its address failed at the
    first ping with Ray's "Invalid option keyword: 'concurrency_group'"."""
    from dspex_nb.pool.settings import SettingError

    with pytest.raises(SettingError, match=r"Pool\(address='ray://head:10001'\) is a Ray Client address: Ray Client "
                                           r"cannot run the pool's streamed calls"):
        Pool(backend="ray", address="ray://head:10001")


def _prints_on_a_full_disk() -> str:
    import os

    full, saved = os.open("/dev/full", os.O_WRONLY), os.dup(1)
    os.dup2(full, 1)  # the actor's output, as on a node whose log disk is full: every write fails with ENOSPC
    try:
        print("x" * 100_000, flush=True)
        return "printed"
    finally:
        os.dup2(saved, 1)
        os.close(full)
        os.close(saved)


def test_a_print_on_a_full_log_disk_fails_no_call_on_an_actor(pool: Pool) -> None:
    # as on a local worker, and as the same print in the kernel succeeds
    assert pool.run(_prints_on_a_full_disk) == "printed"


def _says(question: str) -> str:
    import sys

    print(f"looking up {question}")
    print("noted", file=sys.stderr)
    return question


def test_an_actors_prints_reach_the_kernel(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    assert pool.run(_says, question="unary") == "unary"
    assert capsys.readouterr() == ("looking up unary\n", "noted\n")
    run = pool.run_stream(_says, question="streamed")
    assert run.result() == "streamed"
    assert capsys.readouterr() == ("looking up streamed\n", "noted\n")
    output = [chunk for chunk in run.chunks if chunk.kind == "output"]  # as many chunks as the writes' timing makes
    assert ["".join(c["text"] for c in output if c["stream"] == name) for name in ("stdout", "stderr")] == [
        "looking up streamed\n", "noted\n"]


def test_kill_worker_reaches_an_actor_on_another_node(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """pool.kill_worker on an actor of another node did nothing, silently: SIGKILL now ends it through Ray, and
    another signal is refused saying why."""
    from dspex_nb.pool import ray_backend

    monkeypatch.setattr(ray_backend, "_local_addresses", set)  # as if every node were another machine
    with pytest.raises(ValueError, match="cannot send SIGUSR1 to worker w0: its actor runs on another node"):
        pool.kill_worker("w0", signal.SIGUSR1)
    old_pid = pool.kill_worker("w1", signal.SIGKILL)
    replaced = wait_until(lambda: [w for w in pool.workers if w.id == "w1" and w.state == "ready"
                                   and w.process.pid != old_pid], timeout=120, what="w1 to be replaced")
    assert replaced[0].restarts >= 1 and "died (killed by SIGKILL)" in replaced[0].last_error, replaced[0].last_error


def test_a_notebook_cell_starts_a_pool_on_ray(cluster: str) -> None:
    """`%dspex start --ray ADDRESS` in a notebook run by a real Jupyter kernel (nbclient), then a cell that
    streams an answer from the actors."""
    import nbclient
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in (
        f"%load_ext dspex_nb\n%dspex start --ray {cluster} -n 2",
        '%%dspex predict "question -> answer" -o ans\nWhere does it run?',
        "print(ans.answer)",
        "%dspex stop",
    )])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DSPEX_NONINTERACTIVE"] = "1"  # the text views: deterministic output to read
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3")
    with client.setup_kernel(env=env):  # the kernel is shut down on the way out, whatever happened
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)

    def text(cell: int) -> str:
        return "".join(o.get("text", "") for o in nb.cells[cell].outputs if o.output_type == "stream")

    assert f"dspex: pool of 2 workers ready (lm='demo', Ray actors at {cluster})" in text(0)
    assert text(2).startswith("Demo LM answer to 'Where does it run?'")
    assert "dspex: pool stopped" in text(3)


def test_a_pool_starts_a_local_ray_of_its_own_and_ends_it(cluster: str) -> None:
    """Without an address the pool starts a Ray instance in a directory of this user's own, not joining the
    cluster the last `ray start` recorded in Ray's shared directory (any user may write there: another user's
    cluster would get the programs and keys), and shutting the pool down ends it and removes its directory.
    Was: each SIGKILLed kernel left its pool's Ray directory (Ray's session logs, what its actors printed) for
    good: the start removes it; not one whose kernel lives, nor one a process still uses (the agents of the killed
    kernel's raylet linger a minute)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))  # Ray's socket paths must stay short
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(cluster)  # as `ray start` records the latest cluster
    env = {**os.environ, **LOOPBACK_CLUSTER, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    started: list[subprocess.Popen] = []

    def kernel(how: str) -> Path:  # one that made its Ray directory, then was killed or lives on
        started.append(subprocess.Popen([sys.executable, "-c", MAKES_ITS_RAY_DIR, str(ray_tmp), how],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        return Path(started[-1].stdout.readline().strip())  # type: ignore[union-attr]

    code = ("import glob, os, ray, sys\n"
            "from dspex_nb import Pool\n"
            "def own():\n"
            "    return [d for d in glob.glob(os.path.join(os.environ['RAY_TMPDIR'], 'dspex-ray-*'))\n"
            "            if d not in sys.argv[1:]]\n"
            "with Pool(workers=1, backend='ray', journal=False) as p:\n"
            "    print(p.execute('echo', {'x': 1}), flush=True)\n"
            "    print(ray.get_runtime_context().gcs_address)\n"
            "    print([oct(os.stat(d).st_mode & 0o777) for d in own()])\n"
            "print(ray.is_initialized(), own())\n")
    try:
        killed, alive, used = kernel("killed"), kernel("alive"), kernel("killed")
        assert killed.is_dir() and started[0].wait() == -signal.SIGKILL
        with open(used / "agent.log", "wb") as log:
            started.append(subprocess.Popen(["sleep", "600"], stdout=log))  # a process that still writes there
        proc = subprocess.Popen([sys.executable, "-c", code, str(killed), str(alive), str(used)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=env)
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        remaining = sorted(ray_tmp.glob("dspex-ray-*"))
    finally:
        for process in started:
            process.kill()
            process.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0] == "{'x': 1}", err[-3000:]
    assert lines[1].rpartition(":")[2] != cluster.rpartition(":")[2]  # not the recorded cluster
    assert lines[2] == "['0o700']"
    assert lines[3] == "False []"
    assert remaining == sorted([alive, used])  # the killed kernel's directory went

    def session_empty() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return False
        except ProcessLookupError:
            return True

    wait_until(session_empty, timeout=30, what="the pool's Ray instance to end")


MAKES_ITS_RAY_DIR = """
import os, signal, sys
from dspex_nb.pool import ray_backend
ray_backend._make_private_dir(sys.argv[1])  # as its pool's Ray start does
print(ray_backend._private_dir[-1], flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)  # before its pool ended: the directory stays
sys.stdin.read()
"""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


INTERRUPTED_START = """
import sys
from dspex_nb import Pool
try:
    Pool(workers=1, backend="ray", journal=False).start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
sys.stdin.read()  # a kernel that lives on
"""


def test_a_ray_start_interrupted_midway_leaves_no_ray_process(tmp_path: Path) -> None:
    """Was: Ctrl-C during the pool's own Ray instance's start (20 s on this machine), or a raylet that did not
    register in time on a loaded machine, left its gcs_server, dashboard and monitors running for the kernel's
    life: Ray forgets the processes of a start that failed. The kernel lives on here, as a notebook's does."""
    from dspex_nb.pool.process import group_members

    ray_tmp = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, **LOOPBACK_CLUSTER, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED_START], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True, env=env)

    def others() -> list[int]:  # the Ray processes it started: of its session's group, alive
        return [pid for pid in group_members(kernel.pid) if pid != kernel.pid and pid_alive(pid)]

    def raylet_started() -> bool:
        return any(b"raylet" in _cmdline(pid) for pid in others())

    try:
        wait_until(raylet_started, timeout=120, what="the pool's Ray instance to start its raylet")
        kernel.send_signal(signal.SIGINT)
        assert kernel.stdout.readline() == "interrupted\n"  # type: ignore[union-attr]
        wait_until(lambda: not others(), timeout=30, what="the interrupted start's Ray processes to end")
        assert not list(ray_tmp.glob("dspex-ray-*"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel.pid, signal.SIGKILL)
        kernel.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)




def test_a_ray_directory_is_judged_by_its_kernel_only_where_its_pid_means_that_kernel(tmp_path: Path) -> None:
    """Was: the next pool's Ray start removed the directory of a kernel whose pid is no process here (a kernel in a
    container sharing /tmp, with pids of its own; another host on a shared file system), its Ray instance live."""
    from dspex_nb.pool import ray_backend
    from dspex_nb.wire import pid_space

    ended = subprocess.run([sys.executable, "-c", "from dspex_nb.wire import kernel_spec; print(kernel_spec())"],
                           capture_output=True, text=True, check=True).stdout.strip()  # a kernel that has ended

    def ray_dir(name: str, owner: str) -> Path:
        directory = tmp_path / f"{ray_backend.PRIVATE_PREFIX}{name}"
        directory.mkdir(mode=0o700)
        (directory / ray_backend.KERNEL_FILE).write_text(owner)
        return directory

    elsewhere = ray_dir("container", f"{ended} {pid_space()}-of-a-container")
    ray_dir("here", f"{ended} {pid_space()}")
    ray_backend._remove_stale_dirs(str(tmp_path))
    assert list(tmp_path.iterdir()) == [elsewhere]


@pytest.mark.parametrize("platform", ["linux", "darwin"])
@pytest.mark.parametrize("variables", [{}, {"TMPDIR": "/var/folders/zz/zyxvpxvq6csfxvn_n0000000000000/T/"},
                                       {"TMPDIR": "/a", "RAY_TMPDIR": "/b"}])
def test_the_pools_ray_directory_is_where_ray_looks(platform: str, variables: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # was: $TMPDIR on macOS too, where Ray uses /tmp: the Ray instance of a pool without an address failed to start
    # on every Mac (its socket paths under /var/folders/.../T/dspex-ray-*/ray/session_*/ passed Ray's 103 bytes), and
    # address='auto' read no record of the latest cluster, so it refused none
    from ray._common.utils import get_default_system_temp_dir

    from dspex_nb.pool.ray_backend import _ray_temp_root

    for name in ("TMPDIR", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert _ray_temp_root() == get_default_system_temp_dir()


def test_a_temp_directory_too_long_for_rays_sockets_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: Ray's own "AF_UNIX path length cannot exceed 107 bytes" from deep inside ray.init."""
    from dspex_nb.pool.ray_backend import _init

    monkeypatch.setenv("RAY_TMPDIR", "/tmp/" + "d" * 40)
    with pytest.raises(WorkerStartError, match=r"set RAY_TMPDIR to a short directory"):
        _init(None)
    assert not Path("/tmp/" + "d" * 40).exists()  # nothing made there


def test_auto_without_a_recorded_cluster_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: Ray then joins any cluster it sees running on the machine (its processes), whoever started it."""
    from dspex_nb.pool.ray_backend import _refuse_anothers_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(WorkerStartError, match=r"address='auto'\): no `ray start` on this machine recorded a cluster"):
        _refuse_anothers_cluster()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_auto_refuses_the_latest_cluster_another_user_recorded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex_nb.pool.ray_backend import _refuse_anothers_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    latest = tmp_path / "ray" / "ray_current_cluster"
    latest.write_text("127.0.0.1:6379")
    _refuse_anothers_cluster()  # this user's own: used
    os.chown(latest, 4321, 4321)
    with pytest.raises(WorkerStartError, match=r"address='auto'.*another user \(uid 4321\)"):
        _refuse_anothers_cluster()
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(WorkerStartError):
        _refuse_anothers_cluster()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # was refused: Ray's 'auto' is RAY_ADDRESS then, not the record
    _refuse_anothers_cluster()


def test_a_ray_stream_keeps_its_timeout_and_its_cancel(pool: Pool) -> None:
    """A stream whose chunks keep coming still ends at its timeout; a cancel ends the call at once and the
    actor stops the tool (also a cancel sent before the call reached the actor)."""
    from dspex_nb.errors import CallTimeout

    steady = pool.execute_stream("count", {"n": 100, "delay": 0.1}, timeout=1.0)
    with pytest.raises(CallTimeout):
        steady.result(30)
    assert steady.received < 50
    for _ in range(5):
        run = pool.execute_stream("sleep", {"seconds": 60}, worker="w0")
        run.cancel()  # at once: often before the actor has the call
        assert run.wait(10) and run.status == "cancelled"
    wait_until(lambda: pool.describe("w0")["counters"]["active_requests"] == 0, timeout=30,
               what="the actor to stop the cancelled sleeps")


def _provider_settings() -> list[str]:
    import os

    return [os.environ.get(name, "<unset>") for name in ("DSPEX_PROBE_API_KEY", "DSPEX_PROBE_CREDENTIALS",
                                                         "DSPEX_PROBE_CREDENTIALS_FILE")]


def _process_settings(words: list[str]) -> list[str]:
    import os

    import dspy

    return [str(list(set(words))), str(dspy.cache.disk_cache_dir), open("notes.txt").read(), os.getcwd(),
            os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "<unset>")]


def _pool_env() -> list[str]:
    import os

    import ray

    return [os.environ["DSPEX_PROBE_PROXY"], os.environ["DSPEX_PROBE_PLAIN"],
            ray.get_runtime_context().get_runtime_env_string()]


def test_the_kernels_api_keys_reach_the_actors(cluster: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """An API key a notebook puts in its environment after the cluster started (`os.environ["OPENAI_API_KEY"] =
    ...`, as DSPy's tutorials do) reaches the actors, as it reaches local workers: else their LM calls fail. A
    credential file's path reaches them only where their node has that file. The kernel's PYTHONHASHSEED (the
    order of a set of strings) and DSPy's cache folder (DSPY_CACHEDIR) reach them too, as local workers inherit
    them: the cluster's nodes were started with others; and so does the kernel's working directory (a program
    opens a relative path as in the kernel). Like local workers, actors read the LMs' prices offline."""
    monkeypatch.setenv("DSPEX_PROBE_API_KEY", "sk-set-in-the-notebook")
    monkeypatch.setenv("DSPEX_PROBE_CREDENTIALS", str(tmp_path / "only-on-the-kernels-machine.json"))
    (tmp_path / "here.json").write_text("{}")
    monkeypatch.setenv("DSPEX_PROBE_CREDENTIALS_FILE", str(tmp_path / "here.json"))
    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))
    words = [f"word{i}" for i in range(20)]
    kernel = subprocess.run([sys.executable, "-c", f"print(list(set({words!r})))"], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": "1234"}).stdout.strip()  # a kernel so
    (tmp_path / "notes.txt").write_text("the notebook's notes")
    monkeypatch.chdir(tmp_path)
    proxy = "http://user:hunter2-proxy@proxy.invalid:3128"  # Pool(env=...)'s: its password stays out of runtime_env
    with Pool(workers=1, backend="ray", address=cluster, journal=False, resources={"head": 1},
              env={"DSPEX_PROBE_PROXY": proxy, "DSPEX_PROBE_PLAIN": "plain-value"}) as p:
        assert p.run(_provider_settings) == ["sk-set-in-the-notebook", "<unset>", str(tmp_path / "here.json")]
        assert p.run(_process_settings, words=words) == [kernel, str(tmp_path / "dspy-cache"), "the notebook's notes",
                                                          str(tmp_path), "True"]  # prices as local workers read them
        reached, plain, runtime_env = p.run(_pool_env)
        assert (reached, plain) == (proxy, "plain-value") and "plain-value" in runtime_env
        assert "hunter2-proxy" not in runtime_env and "sk-set-in-the-notebook" not in runtime_env


class CodedError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"failed with {code}")
        self.code = code


def test_a_programs_exception_keeps_its_attributes_from_an_actor(pool: Pool) -> None:
    def program(code: int) -> None:
        raise CodedError(code)

    for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result(60)):
        with pytest.raises(CodedError) as info:
            call(program, code=7)
        assert info.value.code == 7 and isinstance(info.value, ToolError)
        assert (str(info.value), info.value.args) == ("failed with 7", ("failed with 7",))  # as in the kernel
        assert "raised on worker" in info.value.__notes__[-1] and "in program" in info.value.__notes__[-1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11's")
def test_a_programs_exception_group_comes_back_from_an_actor_as_a_group(pool: Pool) -> None:
    def program(code: int) -> None:
        raise ExceptionGroup("several", [CodedError(code), KeyError("k")])  # noqa: F821

    for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result(60)):
        with pytest.raises(ExceptionGroup) as info:  # noqa: F821
            call(program, code=7)
        assert isinstance(info.value, ToolError) and str(info.value) == "several (2 sub-exceptions)"
        coded, _ = info.value.split(CodedError)
        assert coded is not None and coded.exceptions[0].code == 7


def _read_variables() -> list[str | None]:
    return [os.environ.get("DSPEX_TEST_LATER_API_KEY"), os.environ.get("DSPEX_TEST_LATER_PLAIN")]


def test_a_key_the_kernel_sets_after_the_start_reaches_the_actors(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # as the kernel's secret-named variables reach an actor when it starts; other variables are each node's own
    monkeypatch.setenv("DSPEX_TEST_LATER_API_KEY", "sk-set-later-4711")
    monkeypatch.setenv("DSPEX_TEST_LATER_PLAIN", "kernel's")
    assert pool.map(_read_variables, [{}] * 4, journal=False).result(60) == [["sk-set-later-4711", None]] * 4


def test_a_call_inside_dspy_context_runs_on_its_lm_on_an_actor(pool: Pool) -> None:
    import dspy

    from dspex_nb import demo_lm

    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=demo_lm(answer_tokens=2)):  # the pool's LM is demo_lm(): this one answers shorter
        expected = qa(question="Which LM?")
        assert pool.run(qa, question="Which LM?").answer == expected.answer


def _item_class() -> type:
    @dataclasses.dataclass
    class Item:
        name: str

    return Item


def test_two_classes_of_one_path_come_back_each_as_itself_from_an_actor(pool: Pool) -> None:
    # as a class cell run again: a value came back as the class of its path the kernel had seen last
    old, new = _item_class(), _item_class()

    def program(item: Any) -> dict[str, Any]:
        return {"item": item, "made": old(name="made")}

    for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result(60),
                 lambda p, **kw: pool.map(p, [kw], journal=False).result(60)[0]):
        got = call(program, item=new(name="sent"))
        assert (type(got["item"]), type(got["made"])) == (new, old)


UNPARSABLE_ADDRESS = """
from dspex_nb import Pool
from dspex_nb.errors import WorkerStartError
try:
    Pool(workers=1, backend="ray", address="127.0.0.1:notaport", journal=False).start()
except WorkerStartError as exc:
    print(exc)
"""


def test_a_ray_that_does_not_start_is_a_worker_start_error() -> None:
    """Was: Ray's own exception (a ValueError here; a bare Exception for a local instance whose raylet did not
    register in Ray's 30 s on a busy machine): `%dspex start --ray` showed a traceback where a local pool that does
    not start is a WorkerStartError, its `dspex: ...` lines. In a process of its own: this one is connected."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", UNPARSABLE_ADDRESS], capture_output=True, text=True, timeout=120,
                         env=env)
    said = "Pool(address='127.0.0.1:notaport'): this kernel could not join that Ray cluster: ValueError: Unable"
    assert out.stdout.startswith(said), (out.stdout, out.stderr[-2000:])


RAYLET_LATE_TWICE = """
import json, os, sys
import ray
from dspex_nb import Pool
from dspex_nb.errors import WorkerStartError
from dspex_nb.pool import ray_backend
tries = []

def late(**kwargs):  # Ray's own error where its raylet does not register within the 30 s Ray allows
    tries.append(kwargs["_temp_dir"])
    assert os.path.isdir(kwargs["_temp_dir"].rsplit("/", 1)[0])
    raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")

ray.init = late
try:
    Pool(workers=1, backend="ray", journal=False).start()
except WorkerStartError as exc:
    print(json.dumps({"error": str(exc), "tries": tries, "left": os.listdir(sys.argv[1])}))
"""


def test_a_late_raylet_gets_a_second_start_before_the_pool_says_so() -> None:
    """Was: one try. On a busy 2-core machine Ray's raylet of the pool's own instance missed the 30 s Ray gives it
    (hard-coded in Ray) now and then, and the start failed where a second one succeeds. In a process of its own,
    whose Ray start fails so (Ray's error, as Ray raises it) both times: no Ray starts."""
    root = tempfile.mkdtemp(prefix="dx-", dir="/tmp")  # short: Ray's socket paths go under it
    try:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": root}
        out = subprocess.run([sys.executable, "-c", RAYLET_LATE_TWICE, root], capture_output=True, text=True,
                             timeout=120, env=env)
    finally:
        shutil.rmtree(root)
    assert out.returncode == 0 and out.stdout, out.stderr[-2000:]
    said = json.loads(out.stdout.splitlines()[-1])
    assert len(said["tries"]) == 2 and said["tries"][0] != said["tries"][1]  # each in a fresh private directory
    assert "it was tried 2 times" in said["error"] and "timed out during startup" in said["error"]
    assert said["left"] == []  # both directories removed


OWN_RAY_CELL = """
import sys
from IPython.terminal.interactiveshell import TerminalInteractiveShell
shell = TerminalInteractiveShell.instance()
print("<cell>", flush=True)
shell.run_cell("%load_ext dspex_nb\\n%dspex start --ray -n 1 --lm demo")
sys.stderr.flush()
print("</cell>", flush=True)
sys.stdin.readline()  # the test reads the pool's processes meanwhile
shell.run_cell("%dspex stop")
"""


@dataclasses.dataclass
class OwnRay:
    kernel: subprocess.Popen
    cell: str  # what the cell that started the pool showed, stdout and stderr as a terminal shows them
    ray_dir: Path  # the pool's private Ray directory


@pytest.fixture(scope="module")
def own_ray() -> Iterator[OwnRay]:
    """An IPython shell, in a session of its own, whose `%dspex start --ray -n 1 --lm demo` started the pool's own
    Ray (with Ray's defaults: its token authentication on, as a user has it); the pool runs until the module ends."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOOPBACK_CLUSTER)}
    env["RAY_TMPDIR"] = str(ray_tmp)
    output = ray_tmp / "terminal.txt"
    with open(output, "wb") as terminal:
        kernel = subprocess.Popen([sys.executable, "-c", OWN_RAY_CELL], stdin=subprocess.PIPE, stdout=terminal,
                                  stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_until(lambda: "</cell>" in output.read_text() or kernel.poll() is not None, timeout=240,
                   what="the cell that starts the pool's own Ray")
        text = output.read_text()
        started = list(ray_tmp.glob("dspex-ray-*"))
        assert "</cell>" in text and started, text[-3000:]
        yield OwnRay(kernel, text.partition("<cell>\n")[2].partition("</cell>")[0], started[0])
        kernel.communicate(b"\n", timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel.pid, signal.SIGKILL)
        kernel.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _listening(pid: int) -> list[str]:
    """The addresses process ``pid`` listens on with TCP (its sockets, found in its network namespace's tables)."""
    sockets = set()
    with contextlib.suppress(OSError):  # it ended meanwhile
        for fd in os.scandir(f"/proc/{pid}/fd"):
            link = os.readlink(fd.path)
            if link.startswith("socket:["):
                sockets.add(link[len("socket:["):-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in sockets:  # LISTEN
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)  # each 32-bit word in host (little-endian) order
                    ip = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                    found.append(f"[{ip}]:{int(port, 16)}")
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address[1:].partition("]")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_the_pools_own_ray_listens_on_loopback_only(own_ray: OwnRay) -> None:
    """Was: the Ray instance the pool starts for itself (no address) had its gcs_server, raylet, object manager,
    agents and actors listen on every interface (`*:port`), so other hosts of the network could reach a notebook's
    pool (behind Ray's token only): Ray takes 127.0.0.1 for this machine's network address on Linux. Every process of
    that start (of the kernel's session, or using its Ray directory), the kernel's own Ray driver included, is read."""
    from dspex_nb.pool.process import group_members
    from dspex_nb.pool.ray_backend import _processes_using

    pids = {*group_members(own_ray.kernel.pid), *_processes_using(str(own_ray.ray_dir))}
    listening = {pid: _listening(pid) for pid in pids}
    names = {_cmdline(pid).split(b"\0")[0].decode().rpartition("/")[2] for pid, found in listening.items() if found}
    assert {"gcs_server", "raylet", "ray::RayWorker"} <= names, names  # the start's processes were read
    assert not {pid: [a for a in found if not _loopback(a)] for pid, found in listening.items()
                if not all(map(_loopback, found))}


def test_the_cell_that_starts_the_pools_own_ray_shows_our_line_only(own_ray: OwnRay) -> None:
    """Was: `%dspex start --ray` printed Ray's start messages into the cell (its token-authentication WARNING,
    "Started a local Ray instance.") around the pool's line. Now they go to the instance's start log (README says
    where), and the cell shows the pool's line (with the dashboard's address where Ray has one)."""
    assert re.fullmatch(r"dspex: pool of 1 worker ready \(lm='demo', Ray actors at a local Ray instance"
                        r"(, dashboard http://127\.0\.0\.1:\d+)?\) in \d+\.\d s\n", own_ray.cell), own_ray.cell
    assert "Started a local Ray instance" in (own_ray.ray_dir / "ray-start.log").read_text()
