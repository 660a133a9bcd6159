"""Cancellation, timeouts, dead and hung workers, and no orphans: real processes, real signals."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, pid_alive, wait_until

from dspex_nb import Chunk, Pool
from dspex_nb.errors import CallTimeout, Cancelled, WorkerDied
from dspex_nb.ui.render import show_pool
from dspex_nb.ui.widgets import PoolDashboard


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """A pool on a slow demo LM (20 ms to first token, 2 ms a token) with fast health checks."""
    with Pool(workers=2, lm="demo", lm_kwargs={"ttft": 0.02, "per_token": 0.002}, health_interval=0.2,
              ping_timeout=1.0) as p:
        yield p


def idle(pool: Pool, worker: str) -> dict:
    """Wait until ``worker`` runs no request; return its counters."""
    def counters() -> dict | None:
        c = pool.describe(worker)["counters"]
        return c if c["active_requests"] == 0 else None
    return wait_until(counters, what=f"{worker} to finish its requests")  # type: ignore[return-value]


def ready_again(pool: Pool, worker: str, restarts: int) -> dict:
    def row() -> dict | None:
        r = next(r for r in pool.status() if r["worker"] == worker)
        return r if r["state"] == "ready" and r["restarts"] == restarts else None
    return wait_until(row, timeout=30, what=f"{worker} to be replaced")  # type: ignore[return-value]


BATCH = {"signature": "question -> answer", "batch_items": [{"question": f"q{i}"} for i in range(60)],
         "concurrency": 2}


def test_cancel_mid_batch_stops_lm_calls(pool: Pool) -> None:
    before = idle(pool, "w0")["lm_calls"]
    first = threading.Event()
    run = pool.execute_stream("batch_inference", BATCH, worker="w0",
                              on_chunk=lambda c: first.set() if c.kind == "item" else None)
    assert first.wait(20)
    run.cancel()
    assert run.wait(20)
    with pytest.raises(Cancelled, match="batch_inference"):
        run.result()
    calls = idle(pool, "w0")["lm_calls"] - before
    received = sum(c.kind == "item" for c in run.chunks)
    assert 1 <= received < 60
    assert calls < 30, (calls, received)  # 60 if the cancel had not stopped it; ~received + 2 in practice
    assert run.status == "cancelled"


def test_cancel_right_after_the_call_starts_still_stops_the_tool(pool: Pool) -> None:
    for _ in range(5):  # the cancel may reach the worker before the tool has started: it must stop anyway
        run = pool.execute_stream("sleep", {"seconds": 60}, worker="w1")
        run.cancel()
        assert run.wait(20) and run.status == "cancelled"
    assert idle(pool, "w1")["active_requests"] == 0  # long before 60 s


def test_on_chunk_returning_false_cancels(pool: Pool) -> None:
    before = idle(pool, "w1")["lm_calls"]
    run = pool.execute_stream("batch_inference", BATCH, worker="w1", on_chunk=lambda c: c.kind != "item")
    assert run.wait(20) and run.status == "cancelled"
    assert sum(c.kind == "item" for c in run.chunks) >= 1
    assert idle(pool, "w1")["lm_calls"] - before < 60


def test_on_chunk_exception_stops_the_stream_and_is_raised(pool: Pool) -> None:
    def broken(chunk: Chunk) -> None:
        raise KeyError("my callback broke")

    run = pool.execute_stream("count", {"n": 10_000, "delay": 0.001}, on_chunk=broken)
    with pytest.raises(KeyError, match="my callback broke"):
        run.result(20)
    assert len(run.chunks) < 10_000


LOOP = """
class Loop(dspy.Module):
    def __init__(self):
        super().__init__()
        self.count = dspy.Predict("question -> n: int")  # no str output: its LM calls do not stream
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question):
        for _ in range(200):
            self.count(question=question)
        return self.answer(question=question)
"""


def test_cancel_stream_stops_lm_calls_that_do_not_stream(pool: Pool) -> None:
    # streamify runs the program under its own copy of the call's callbacks: a cancel must reach that copy
    pool.execute("define", {"name": "Loop", "source": LOOP}, worker="w1")
    before = idle(pool, "w1")["lm_calls"]
    run = pool.execute_stream("run_module", {"name": "Loop", "inputs": {"question": "q"}}, worker="w1")
    wait_until(lambda: pool.describe("w1")["counters"]["lm_calls"] > before, what="the program's first LM call")
    run.cancel()
    assert run.wait(20) and run.status == "cancelled"
    assert idle(pool, "w1")["lm_calls"] - before < 100  # 201 if the program went on after the cancel


def test_cancel_token_stream_stops_generation(pool: Pool) -> None:
    pool.execute("configure_lm", {"model": "demo", "kwargs": {"per_token": 0.002, "answer_tokens": 3000}},
                  worker="w0")
    try:
        before = idle(pool, "w0")["tokens_streamed"]
        tokens = threading.Event()
        run = pool.execute_stream("predict", {"signature": "question -> answer", "inputs": {"question": "long?"}},
                                  worker="w0", on_chunk=lambda c: tokens.set() if c.kind == "token" else None)
        assert tokens.wait(20)
        run.cancel()
        assert run.wait(20) and run.status == "cancelled"
        idle(pool, "w0")
        wait_until(lambda: pool.describe("w0")["counters"]["lm_streams_open"] == 0,
                   what="the LM stream to stop")  # an abandoned stream would go on to its 3000th token
        streamed = pool.describe("w0")["counters"]["tokens_streamed"] - before
        assert 0 < streamed < 3000
    finally:
        pool.execute("configure_lm", {"model": "demo", "kwargs": {"ttft": 0.02, "per_token": 0.002}}, worker="w0")


def test_timeout_names_tool_and_limit_and_cancels_remote_work(pool: Pool) -> None:
    with pytest.raises(CallTimeout, match=r"tool 'sleep' did not finish within its timeout of 0.3 s"):
        pool.execute("sleep", {"seconds": 60}, timeout=0.3, worker="w1")
    run = pool.execute_stream("sleep", {"seconds": 60}, timeout=0.3, worker="w1")
    with pytest.raises(TimeoutError, match="0.3 s"):
        run.result()
    assert idle(pool, "w1")["active_requests"] == 0  # the remote sleeps ended well before 60 s


def test_ctrl_c_during_a_blocking_wait_cancels_the_call(pool: Pool) -> None:
    run = pool.execute_stream("sleep", {"seconds": 60}, worker="w1")
    timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run.result()
    assert run.wait(20) and run.status == "cancelled"
    assert idle(pool, "w1")["active_requests"] == 0


def test_ctrl_c_during_a_blocking_execute_cancels_the_call(pool: Pool) -> None:
    timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt) as stopped:
        pool.execute("sleep", {"seconds": 60}, worker="w0")
    assert stopped.value.__notes__ == ["interrupted; 'sleep' on worker w0 was cancelled"]
    assert "grpc" not in "".join(traceback.format_tb(stopped.tb))  # not gRPC's frames, which tell nothing
    assert idle(pool, "w0")["active_requests"] == 0
    assert pool.execute("whoami", worker="w0")["worker"] == "w0"


def test_workers_run_in_their_own_session(pool: Pool) -> None:
    for row in pool.status():
        assert os.getsid(row["pid"]) == row["pid"] != os.getsid(0)


def test_sigkill_worker_mid_call_is_reported_and_replaced(pool: Pool) -> None:
    old = next(r for r in pool.status() if r["worker"] == "w1")
    run = pool.execute_stream("sleep", {"seconds": 60}, worker="w1")
    wait_until(lambda: idle_count(pool, "w1") == 1, what="the sleep to start")
    pool.kill_worker("w1", signal.SIGKILL)
    with pytest.raises(WorkerDied, match=rf"worker w1 \(pid {old['pid']}\) died \(killed by SIGKILL\) during the call"):
        run.result(30)
    row = ready_again(pool, "w1", old["restarts"] + 1)
    assert row["pid"] != old["pid"] and not pid_alive(old["pid"])
    assert pool.execute("whoami", worker="w1") == {"worker": "w1", "pid": row["pid"], "session": ""}
    assert "killed by SIGKILL" in row["last_error"]
    # was: only pool.status() said why; %dspex status and the pool dashboard showed the restart count alone
    text = io.StringIO()
    show_pool(pool, mode="text", out=text)
    why = f"last error: w1 (pid {old['pid']}) died (killed by SIGKILL)"
    assert why in text.getvalue().splitlines()
    dashboard = PoolDashboard(pool).rendering()
    assert why in dashboard["text/plain"].splitlines() and f"<div>{why}</div>" in dashboard["text/html"]


def test_hung_worker_is_replaced(pool: Pool) -> None:
    old = next(r for r in pool.status() if r["worker"] == "w0")
    run = pool.execute_stream("sleep", {"seconds": 60}, worker="w0")
    wait_until(lambda: idle_count(pool, "w0") == 1, what="the sleep to start")
    pool.kill_worker("w0", signal.SIGSTOP)
    with pytest.raises(WorkerDied, match=r"worker w0 \(pid \d+\) stopped answering pings"):
        run.result(60)
    row = ready_again(pool, "w0", old["restarts"] + 1)
    assert "stopped answering pings" in row["last_error"]
    wait_until(lambda: not pid_alive(old["pid"]), what="the hung process to be killed")
    assert pool.execute("whoami", worker="w0")["worker"] == "w0"


def idle_count(pool: Pool, worker: str) -> int:
    return pool.describe(worker)["counters"]["active_requests"]


CHILD = """
import json, sys
from dspex_nb import Pool
pool = Pool(workers=2).start()
print(json.dumps({"pids": [row["pid"] for row in pool.status()], "dir": str(pool.backend.dir)}), flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_pool_owner_leaves_no_worker() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=ROOT, text=True)
    try:
        started = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        pids, socket_dir = started["pids"], started["dir"]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        child.kill()
        child.wait()
        wait_until(lambda: not any(pid_alive(p) for p in pids), what="the orphaned workers to exit")
    finally:
        child.kill()
        child.wait()
        if "socket_dir" in locals():
            shutil.rmtree(socket_dir, ignore_errors=True)


def test_a_slot_that_fails_to_restart_is_tried_again() -> None:
    with Pool(workers=1, health_interval=0.1, journal=False, start="spawn") as p:
        python, p.backend.python = p.backend.python, "/no/such/python"  # the next start of a worker fails
        p.kill_worker("w0", signal.SIGKILL)
        row = wait_until(lambda: p.status()[0]["state"] == "failed" and p.status()[0], what="the restart to fail")
        assert "could not be restarted" in row["last_error"] and "/no/such/python" in row["last_error"]
        p.backend.python = python
        wait_until(lambda: p.status()[0]["state"] == "ready", timeout=30, what="the slot to be tried again")
        assert p.execute("echo", {"back": True}) == {"back": True}


def test_shutdown_during_a_call_says_so() -> None:
    from dspex_nb.errors import PoolClosed

    p = Pool(workers=1, journal=False).start()
    run = p.execute_stream("sleep", {"seconds": 60})
    wait_until(lambda: p.describe()["counters"]["active_requests"] == 1, what="the sleep to start")
    p.shutdown()
    with pytest.raises(PoolClosed, match="shut down during the call"):
        run.result(30)


def test_lm_settings_stay_off_the_command_line() -> None:
    with Pool(workers=1, lm_kwargs={"answer_tokens": 31337}, journal=False) as p:
        pid = p.status()[0]["pid"]
        assert b"31337" not in Path(f"/proc/{pid}/cmdline").read_bytes()  # any local user can read argv
        assert p.describe()["lm"]["kwargs"] == {"answer_tokens": 31337}


def test_a_killed_template_takes_its_workers_and_is_replaced() -> None:
    with Pool(workers=2, health_interval=0.1, journal=False, start="template") as p:
        template = p.backend.template.proc.pid
        workers = [r["pid"] for r in p.status()]
        assert all(os.getsid(w) == w for w in workers)  # forked, yet each in its own session
        os.kill(template, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(w) for w in workers), what="the forked workers to exit with it")
        wait_until(lambda: [r["state"] for r in p.status()] == ["ready", "ready"] and
                   all(r["restarts"] == 1 for r in p.status()), timeout=30, what="both workers to be replaced")
        assert p.backend.template.proc.pid != template
        assert p.execute("predict", {"signature": "q -> a", "inputs": "again"})["a"].startswith("Demo LM answer")


def test_both_start_methods_serve_the_same_answers() -> None:
    answers = []
    for start in ("spawn", "template"):
        with Pool(workers=1, journal=False, start=start) as p:
            answers.append(p.execute("predict", {"signature": "q -> a", "inputs": "same"}))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError, match=r"start=...\) must be one of"):
        Pool(start="fork")


def test_concurrent_restarts_keep_one_template_and_the_right_pids() -> None:
    def templates(run_id: str) -> list[int]:
        """This process's live template processes of the pool ``run_id``."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"dspex_nb.worker.template" in argv and run_id.encode() in argv and ppid == os.getpid() \
                    and pid_alive(int(proc.name)):
                found.append(int(proc.name))  # a template (its forked workers keep its argv, not its parent)
        return found

    with Pool(workers=4, health_interval=0.1, ping_timeout=1.0, journal=False, start="template") as p:
        for round_ in range(3):
            for row in p.status():
                os.kill(row["pid"], signal.SIGKILL)
            wait_until(lambda r=round_: all(row["state"] == "ready" and row["restarts"] == r + 1
                                            for row in p.status()), timeout=30, what="all four to be replaced")
            for row in p.status():  # each slot supervises the process that answers for it
                assert p.execute("whoami", worker=row["worker"])["pid"] == row["pid"]
        os.kill(p.backend.template.proc.pid, signal.SIGKILL)
        wait_until(lambda: all(row["state"] == "ready" and row["restarts"] == 4 for row in p.status()),
                   timeout=30, what="all four to be replaced after the template died")
        assert templates(p.run_id) == [p.backend.template.proc.pid]  # one new template, not one per slot
