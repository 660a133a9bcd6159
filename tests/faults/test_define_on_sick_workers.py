"""A definition or an LM switch sent while a worker is hung or dead goes on on its replacement; one that ends every
worker it reaches fails once, with its own reason."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from helpers import pid_alive, wait_until, worker_pids

from dspex_nb import Pool
from dspex_nb.errors import WorkerDied


def stops_its_worker(question: str) -> str:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)  # hung: it answers nothing, not even pings
    return question


def answers(question: str) -> str:
    return f"answered {question}"


@pytest.fixture
def watched() -> Iterator[list[Pool]]:
    """Pools to check for leftover workers once the test ended, however it ended."""
    pools: list[Pool] = []
    yield pools
    pids = {pid for pool in pools for pid in worker_pids(pool)}
    for pool in pools:
        pool.shutdown()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), what="the pools' workers to exit")


def _pool(watched: list[Pool], workers: int) -> Pool:
    pool = Pool(workers=workers, lm="demo", health_interval=0.2, ping_timeout=1.0, journal=False)
    watched.append(pool)
    return pool.start()


def test_a_program_that_hangs_its_only_worker_does_not_fail_the_next_definition(watched: list[Pool]) -> None:
    pool = _pool(watched, 1)
    hung = pool.run_stream(stops_its_worker, question="q")
    wait_until(lambda: pool.status()[0]["in_flight"] == 1, what="the hanging program to start")
    run = pool.run_stream(answers, question="hi")  # was: WorkerDied ... stopped answering pings, from broadcast
    assert run.result(60) == "answered hi"
    with pytest.raises(WorkerDied, match="stopped answering pings"):
        hung.result(60)
    assert pool.status()[0]["restarts"] == 1


def test_a_hung_worker_of_two_does_not_fail_a_definition(watched: list[Pool]) -> None:
    pool = _pool(watched, 2)
    pool.kill_worker("w1", signal.SIGSTOP)  # w0 takes the definition first, then w1 hangs it
    pool.define("Answers", answers)
    assert [pool.run("Answers", question=w) for w in ("a", "b")] == ["answered a", "answered b"]
    assert [pool.execute("run_module", {"name": "Answers", "inputs": {"question": "x"}}, worker=w)["value"]
            for w in ("w0", "w1")] == ["answered x", "answered x"]  # the replacement of w1 has it too
    assert [row["restarts"] for row in pool.status()] == [0, 1]


def test_a_definition_that_ends_every_worker_fails_once_with_its_reason(watched: list[Pool]) -> None:
    pool = _pool(watched, 2)
    with pytest.raises(WorkerDied, match=r"w0 \(pid \d+\) died \(exit code 3\)") as caught:
        pool.define("Boom", "import os\nos._exit(3)\n")
    assert "the definition of 'Boom' itself ends the worker" in "\n".join(caught.value.__notes__)
    assert "Boom" not in pool.definitions
    assert pool.status()[1]["restarts"] == 0  # it went no further than the first worker (and its replacement)
    wait_until(lambda: pool.status()[0]["state"] == "ready", what="w0 to be restarted without the definition")


def test_a_hung_worker_of_two_does_not_fail_an_lm_switch(watched: list[Pool]) -> None:
    pool = _pool(watched, 2)
    pool.kill_worker("w1", signal.SIGSTOP)
    pool.configure_lm("demo", answer_tokens=3)  # was: WorkerDied ... stopped answering pings, and w0 alone switched
    switched = {"model": "demo", "kwargs": {"answer_tokens": 3}}
    assert [pool.describe(worker=w)["lm"] for w in ("w0", "w1")] == [switched, switched]
    assert [row["restarts"] for row in pool.status()] == [0, 1]


def test_a_bad_lm_fails_with_its_reason_and_switches_no_worker(watched: list[Pool]) -> None:
    pool = _pool(watched, 2)
    pool.kill_worker("w0", signal.SIGSTOP)  # the bad LM reaches the replacement of w0 first, as it starts
    with pytest.raises(WorkerDied) as caught:
        pool.configure_lm("openai/o1", temperature=0.5)  # DSPy refuses this temperature for a reasoning model
    assert "LMConfigurationError: [openai/o1] OpenAI's reasoning models require" in "\n".join(caught.value.__notes__)
    assert pool.lm == "demo"
    wait_until(lambda: pool.status()[0]["state"] == "ready", timeout=30, what="w0 to be restarted on the demo LM")
    assert [pool.describe(worker=w)["lm"]["model"] for w in ("w0", "w1")] == ["demo", "demo"]
