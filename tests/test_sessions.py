"""Backpressure (bounded queue, queue timeout), session affinity modes, and objects kept in sessions."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from helpers import wait_until

from dspex_nb import Pool
from dspex_nb.errors import ArgumentError, PoolSaturated, QueueTimeout, WorkerBusy

MODULE = '''
class Echo(dspy.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, text):
        self.calls += 1
        return dspy.Prediction(text=text, calls=self.calls)
'''


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """Two workers with room for one call each, a queue of two, a short queue timeout."""
    with Pool(workers=2, max_in_flight=1, max_queue=2, queue_timeout=0.5, journal=False) as p:
        yield p


def occupy(pool: Pool, worker: str):
    run = pool.execute_stream("sleep", {"seconds": 60}, worker=worker)
    wait_until(lambda: pool.describe(worker)["counters"]["active_requests"] == 1, what=f"{worker} to be busy")
    return run


def test_a_call_without_room_waits_then_times_out(pool: Pool) -> None:
    runs = [occupy(pool, "w0"), occupy(pool, "w1")]
    try:
        with pytest.raises(QueueTimeout, match=r"no worker had room within 0.5 s \(queue_timeout=0.5"):
            pool.execute("echo", {"x": 1})
    finally:
        for run in runs:
            run.cancel()
    assert pool.execute("echo", {"x": 2}) == {"x": 2}


def test_a_full_queue_refuses_at_once(pool: Pool) -> None:
    pool.queue_timeout = 30.0
    runs = [occupy(pool, "w0"), occupy(pool, "w1")]
    results: list[dict] = []
    waiting = [threading.Thread(target=lambda i=i: results.append(pool.execute("echo", {"i": i}))) for i in range(2)]
    try:
        for thread in waiting:
            thread.start()
        wait_until(lambda: pool.queue_length == 2, what="two calls to queue")
        with pytest.raises(PoolSaturated, match=r"2 calls wait for a worker \(max_queue=2\); raise Pool\(max_queue"):
            pool.execute("echo", {"x": 3})
    finally:
        for run in runs:
            run.cancel()
        for thread in waiting:
            thread.join()
        pool.queue_timeout = 0.5
    assert sorted(r["i"] for r in results) == [0, 1]  # the queued calls ran once room came


def test_affinity_modes(pool: Pool) -> None:
    hint = pool.session("w0")
    strict = pool.session("w0", affinity="strict_fail_fast")
    queue = pool.session("w0", affinity="strict_queue")
    busy = occupy(pool, "w0")
    try:
        assert hint.execute("whoami")["worker"] == "w1"  # falls back
        with pytest.raises(WorkerBusy, match="worker w0 has no room"):
            strict.execute("whoami")
        with pytest.raises(QueueTimeout):
            queue.execute("whoami")  # waits for w0 only
    finally:
        busy.cancel()
    assert queue.execute("whoami")["worker"] == "w0" == strict.execute("whoami")["worker"]
    with pytest.raises(ValueError, match="affinity must be one of"):
        pool.session(affinity="sticky")


def test_objects_live_in_their_session(pool: Pool) -> None:
    with pool.session("w1", affinity="strict_queue") as session:
        handle = session.execute("session_put", {"value": {"rows": [1, 2, 3]}})["handle"]
        assert handle.startswith("h:w1:")
        assert session.execute("session_get", {"handle": handle}) == {"value": {"rows": [1, 2, 3]}}
        other = pool.session("w1", affinity="strict_queue")
        with pytest.raises(ArgumentError, match=f"handle {handle} belongs to session {session.id}"):
            other.execute("session_get", {"handle": handle})
        elsewhere = pool.session("w0", affinity="strict_queue")
        with pytest.raises(ArgumentError, match="was made on worker w1, but this call ran on w0"):
            elsewhere.execute("session_get", {"handle": handle})
        with pytest.raises(ArgumentError, match="handles live in a session"):
            pool.execute("session_put", {"value": 1}, worker="w1")
    closed = f"handle {handle} is gone: its session {session.id} ended \\(it was closed\\)"
    with pytest.raises(ArgumentError, match=closed):
        session.execute("session_get", {"handle": handle})
    with pytest.raises(ArgumentError, match=closed):  # also used in another session, or in none
        pool.session("w1", affinity="strict_queue").execute("session_get", {"handle": handle})
    with pytest.raises(ArgumentError, match=closed):
        pool.execute("session_get", {"handle": handle}, worker="w1")
    assert pool.describe("w1")["counters"]["session_objects"] == 0


def test_a_kept_module_instance_keeps_its_state(pool: Pool) -> None:
    pool.define("Echo", MODULE)
    with pool.session("w0", affinity="strict_queue") as session:
        handle = session.execute("load_module", {"name": "Echo"})["handle"]
        counts = [session.execute("run_module", {"name": handle, "inputs": "hi"})["calls"] for _ in range(3)]
        assert counts == [1, 2, 3]  # the same instance every time
        assert session.execute("run_module", {"name": "Echo", "inputs": "hi"})["calls"] == 1  # a fresh one


def test_sessions_expire_after_their_ttl() -> None:
    with Pool(workers=1, session_ttl=0.2, journal=False) as short:
        session = short.session()
        handle = session.execute("session_put", {"value": 1})["handle"]
        wait_until(lambda: short.describe()["counters"]["session_objects"] == 0, what="the session to expire")
        with pytest.raises(ArgumentError, match=r"ended \(it expired after 0.2 s unused\)"):
            session.execute("session_get", {"handle": handle})
        with pytest.raises(ArgumentError, match=rf"{handle} is gone: its session {session.id} ended \(it expired"):
            short.session().execute("session_get", {"handle": handle})


def test_a_handle_from_a_replaced_worker_says_so(pool: Pool) -> None:
    import signal

    session = pool.session("w0", affinity="strict_queue")
    handle = session.execute("session_put", {"value": "kept"})["handle"]
    old = pool.status()[0]
    pool.kill_worker("w0", signal.SIGKILL)
    wait_until(lambda: pool.status()[0]["state"] == "ready" and pool.status()[0]["restarts"] == old["restarts"] + 1,
               timeout=30, what="w0 to be replaced")
    with pytest.raises(ArgumentError, match=rf"made by an earlier process of worker w0 \(pid {old['pid']}\); that "
                                            "process was replaced"):
        session.execute("session_get", {"handle": handle})
