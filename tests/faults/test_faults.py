"""The fault suite: batches that lose nothing, under killed, hung and poisoned workers, a killed
kernel, a cancel, and LM rate limits. Each asserts exact counts (items, results, LM calls), never
timings; every wait is a poll with a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, pid_alive, wait_until

from dspex_nb import Pool
from dspex_nb.journal import Journal

SIGNATURE = "question -> answer"


def questions(n: int, tag: str) -> list[str]:
    return [f"{tag} question {i}?" for i in range(n)]


def check_complete(out: list[dict], items: list[str], seen: list[dict]) -> None:
    """Every item has exactly one result, in input order, each the answer to its own question."""
    assert len(out) == len(items)
    for item, result in zip(items, out, strict=True):
        assert "error" not in result, result
        assert result["answer"].startswith(f"Demo LM answer to '{item}'")
    indices = [record["index"] for record in seen]
    assert sorted(indices) == list(range(len(items))), "an item was lost or reported twice"


def lm_calls(pool: Pool) -> int:
    return sum(pool.describe(row["worker"])["counters"]["lm_calls"] for row in pool.status())


def all_ready(pool: Pool, restarts: int) -> bool:
    rows = pool.status()
    return all(r["state"] == "ready" for r in rows) and sum(r["restarts"] for r in rows) == restarts


@pytest.fixture(scope="module")
def pool4() -> Iterator[Pool]:
    with Pool(workers=4, lm="demo", lm_kwargs={"ttft": 0.01}, health_interval=0.2, ping_timeout=1.0,
              journal=False) as pool:
        yield pool


def start_batch(pool: Pool, items: list[str], **kwargs) -> tuple[object, list[dict]]:
    seen: list[dict] = []
    lock = threading.Lock()

    def on_item(record: dict) -> None:
        with lock:
            seen.append(record)

    return pool.batch(items, SIGNATURE, on_item=on_item, concurrency=2, **kwargs), seen


def restarts_of(pool: Pool) -> int:
    return sum(r["restarts"] for r in pool.status())


def test_1_sigkill_a_worker_mid_batch(pool4: Pool) -> None:
    items, before = questions(200, "kill"), restarts_of(pool4)
    batch, seen = start_batch(pool4, items)
    wait_until(lambda: len(seen) >= 40, what="the batch to be under way")
    busy = wait_until(lambda: next((w for w, n in batch.snapshot()["active"].items() if n), None),
                      what="a worker with items in flight")
    pool4.kill_worker(busy, signal.SIGKILL)  # one that has items in flight: they must come back
    check_complete(batch.result(120), items, seen)
    assert batch.snapshot()["retries"] >= 1
    wait_until(lambda: all_ready(pool4, before + 1), timeout=30, what="the pool to be back to 4 workers")


def test_2_sigstop_a_worker_mid_batch(pool4: Pool) -> None:
    items, before = questions(200, "stop"), restarts_of(pool4)
    batch, seen = start_batch(pool4, items)
    wait_until(lambda: len(seen) >= 40, what="the batch to be under way")
    pid = pool4.kill_worker("w1", signal.SIGSTOP)  # hung: it answers nothing, not even pings
    check_complete(batch.result(120), items, seen)
    wait_until(lambda: all_ready(pool4, before + 1), timeout=30, what="the hung worker to be replaced")
    wait_until(lambda: not pid_alive(pid), what="the hung process to be killed")


def test_2b_item_timeout_recovers_without_health_checks() -> None:
    """With health checks too slow to matter, the per-item timeout cancels, retries and replaces."""
    with Pool(workers=2, lm="demo", lm_kwargs={"ttft": 0.01}, health_interval=3600, ping_timeout=1.0,
              journal=False) as pool:
        items = questions(80, "item-timeout")
        batch, seen = start_batch(pool, items, item_timeout=1.0)
        wait_until(lambda: len(seen) >= 10, what="the batch to be under way")
        pool.kill_worker("w0", signal.SIGSTOP)
        check_complete(batch.result(120), items, seen)
        wait_until(lambda: all_ready(pool, 1), timeout=30, what="the hung worker to be replaced")
        assert "did not answer a ping after an item timeout" in pool.status()[0]["last_error"]


def test_3_poison_item_fails_alone() -> None:
    with Pool(workers=2, lm="demo", lm_kwargs={"kill_on": "POISON"}, health_interval=0.2, journal=False) as pool:
        items = questions(40, "poison")
        items[17] = "POISON pill?"
        batch, seen = start_batch(pool, items, max_retries=2)
        out = batch.result(120)
        failed = [i for i, r in enumerate(out) if "error" in r]
        assert failed == [17]
        assert "died (killed by SIGKILL)" in out[17]["error"] and "tried 3 times" in out[17]["error"]
        for i, (item, result) in enumerate(zip(items, out, strict=True)):
            assert i == 17 or result["answer"].startswith(f"Demo LM answer to '{item}'")
        assert sorted(r["index"] for r in seen) == list(range(40))
        assert batch.snapshot()["replaced"] == 3  # the poison killed a worker on each of its 3 tries


CHILD = """
import json, sys
from dspex_nb import Pool
pool = Pool(workers=2, lm="demo", lm_kwargs={"ttft": 0.02}, journal=sys.argv[1]).start()
print(json.dumps({"pids": [r["pid"] for r in pool.status()], "dir": str(pool.backend.dir)}), flush=True)
done = []
def on_item(record):
    done.append(record)
    if len(done) == 30:
        print("30 done", flush=True)
pool.batch([f"resume question {i}?" for i in range(100)], "question -> answer", concurrency=2,
           on_item=on_item).result()
print("finished", flush=True)
"""


def test_4_sigkill_the_kernel_mid_batch_then_resume(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(journal_path)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        started = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        assert child.stdout.readline() == "30 done\n"  # type: ignore[union-attr]
        child.kill()
        child.wait()
    finally:
        child.kill()
        child.wait()
    wait_until(lambda: not any(pid_alive(p) for p in started["pids"]), what="the orphaned workers to exit")
    shutil.rmtree(started["dir"], ignore_errors=True)

    journal = Journal(journal_path)
    [kept] = journal.batches()  # readable after the kill
    assert 30 <= kept["items"] < 100
    journal.close()

    items = [f"resume question {i}?" for i in range(100)]
    with Pool(workers=2, lm="demo", lm_kwargs={"ttft": 0.02}, journal=journal_path) as pool:
        batch, seen = start_batch(pool, items)
        check_complete(batch.result(120), items, seen)
        assert batch.from_journal == kept["items"]
        assert lm_calls(pool) == 100 - kept["items"]  # only the unfinished items reached the LM


def test_5_cancel_mid_batch_then_resume(tmp_path: Path) -> None:
    items = questions(100, "cancel")
    with Pool(workers=2, lm="demo", lm_kwargs={"ttft": 0.02}, journal=tmp_path / "j.sqlite3") as pool:
        batch, seen = start_batch(pool, items)
        wait_until(lambda: len(seen) >= 25, what="the batch to be under way")
        batch.cancel()
        assert batch.wait(30) and batch.status == "cancelled"
        finished = sum(1 for r in batch.records if r is not None and r["ok"])
        assert 25 <= finished < 100
        calls_before = lm_calls(pool)

        again, seen_again = start_batch(pool, items)
        check_complete(again.result(120), items, seen_again)
        assert again.from_journal == finished
        assert lm_calls(pool) - calls_before == 100 - finished


def test_6_rate_limited_lm_is_waited_out() -> None:
    with Pool(workers=2, lm="demo", lm_kwargs={"rate_limit_first": 5}, journal=False) as pool:
        items = questions(40, "429")
        batch, seen = start_batch(pool, items)
        check_complete(batch.result(120), items, seen)
        counters = [pool.describe(w)["counters"] for w in ("w0", "w1")]
        used = [c for c in counters if c["lm_calls"] > 0]
        assert [c["lm_rate_limited"] for c in used] == [5] * len(used)  # each 429 retried by dspy.LM, none failed
        assert sum(c["lm_calls"] for c in counters) == 40 + 5 * len(used)


@pytest.fixture()
def full_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$DSPEX_RUNTIME_DIR on a small tmpfs of its own (root only: it is mounted), filled by ``fill``."""
    if os.getuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small full file system needs root to mount (a 64 KB tmpfs)")
    base = Path(tempfile.mkdtemp(prefix="full-", dir=os.environ["DSPEX_RUNTIME_DIR"]))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(base)],
                             capture_output=True, text=True)
    if mounted.returncode:  # root without the right to mount, as in many containers
        base.rmdir()
        pytest.skip(f"a small full file system could not be mounted: {mounted.stderr.strip()}")
    try:
        monkeypatch.setenv("DSPEX_RUNTIME_DIR", str(base))
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], check=True)
        base.rmdir()


def fill(directory: Path) -> None:
    """Write into ``directory`` until its file system is full."""
    with contextlib.suppress(OSError), open(directory / "filler", "wb", buffering=0) as out:
        while True:
            out.write(b"\0" * 4096)


def test_a_full_runtime_dir_costs_no_worker(full_runtime_dir: Path) -> None:
    # Was: once the disk of the runtime directory was full, every recycle or restart of a worker failed writing
    # pool.json ("w0 could not be restarted: [Errno 28] No space left on device"), so the pool lost its workers and
    # every later call failed with QueueTimeout
    with Pool(workers=1, max_requests=1, health_interval=0.1, journal=False) as pool:
        fill(full_runtime_dir)
        for recycles in (1, 2):
            assert pool.execute("echo", {"i": recycles}, timeout=30) == {"i": recycles}
            wait_until(lambda n=recycles: (row := pool.status()[0])["recycles"] >= n and row["state"] == "ready",
                       what=f"w0 recycled {recycles} times, on a full disk")
        assert pool.execute("echo", {"i": 3}, timeout=30) == {"i": 3}
    assert not list(full_runtime_dir.glob("dspex-*"))  # the pool's directory went with it
